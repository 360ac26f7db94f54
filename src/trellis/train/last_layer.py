"""The last decoder layer computed only at the positions whose hidden states the loss reads.

SFT's loss reads the final hidden states at its target positions only: the assistant's tokens, under half
of those a tiny SFT batch computes. Every layer but the last must run on every token, since later tokens
attend to their keys and values; after the last layer's attention, though, the rest of it (the residual,
the MLP) and the final norm work token by token: `hidden_states_at` runs them on the read positions alone,
as transformers' `logits_to_keep` does for the LM head. That saves the last layer's MLP on the other
tokens: about a fifth of a step's matmuls with the tiny SFT's 2 layers, a fortieth with 16
(docs/benchmarks.md).

Layers whose forward is Llama's pre-norm residual block, the same bytecode (Llama, Mistral, Qwen 2 and 3,
Gemma, SmolLM3), are split; other layers, and layers under activation checkpointing (whose recomputation in
the backward pass would not see the positions), run whole and the positions are taken from their output.
"""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass

import torch


@dataclass
class RowsRequest:
    """The rows, flat over the last layer's (batch x sequence) input, whose output a decoder call returns."""

    rows: torch.Tensor
    taken: bool = False  # the last layer computed those rows alone


_REQUEST = contextvars.ContextVar("trellis_last_layer_rows", default=None)


def requested_rows() -> RowsRequest | None:
    """The request of the decoder call under way: `padding_free` maps its rows to the packed layout."""
    return _REQUEST.get()


def hidden_states_at(decoder, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """`decoder(**inputs)`'s last hidden states at `positions`, flat indices into its input's (batch x
    sequence) positions: (len(positions), hidden), the last layer computed at those positions alone
    where it can be."""
    request = RowsRequest(positions) if _splits_last_layer(decoder) else None
    token = _REQUEST.set(request)
    try:
        hidden = decoder(**inputs).last_hidden_state
    finally:
        _REQUEST.reset(token)
    if request is not None and request.taken:
        return hidden[0]
    return hidden.flatten(0, 1).index_select(0, positions)


def _splits_last_layer(decoder) -> bool:
    """Whether `decoder`'s last layer can run on requested rows (decided, and the split forward installed,
    at its first call)."""
    layers = getattr(decoder, "layers", None)
    if not layers or getattr(decoder, "gradient_checkpointing", False):
        return False
    layer = layers[-1]
    if not hasattr(layer, "_trellis_splits_rows"):
        layer._trellis_splits_rows = _has_llamas_code(type(layer))
        if layer._trellis_splits_rows:
            layer.forward = _rows_alone_forward(layer, layer.forward)
    return layer._trellis_splits_rows


def _has_llamas_code(layer_class) -> bool:
    """Whether `layer_class.forward` is Llama's decoder layer's, compiled from the same code."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    code, llama = (inspect.unwrap(cls.forward).__code__ for cls in (layer_class, LlamaDecoderLayer))
    return (code.co_code, code.co_names, code.co_consts) == (llama.co_code, llama.co_names, llama.co_consts)


def _rows_alone_forward(layer, whole_forward):
    def forward(hidden_states, *args, **kwargs):
        request = _REQUEST.get()
        if request is None or request.taken or args:
            return whole_forward(hidden_states, *args, **kwargs)
        request.taken = True
        # Llama's decoder layer (kwargs: what the decoder passes it, which it passes on to attention),
        # the rows selected after attention
        rows = request.rows
        residual = hidden_states.flatten(0, 1).index_select(0, rows)[None]
        hidden_states = layer.input_layernorm(hidden_states)
        hidden_states, _ = layer.self_attn(hidden_states=hidden_states, **kwargs)
        hidden_states = residual + hidden_states.flatten(0, 1).index_select(0, rows)[None]
        residual = hidden_states
        hidden_states = layer.post_attention_layernorm(hidden_states)
        hidden_states = layer.mlp(hidden_states)
        return residual + hidden_states

    return forward
