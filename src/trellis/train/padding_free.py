"""Padding-free forward passes for the stages whose batches TRL pads (SFT, reward, DPO, KTO, ORPO).

TRL's collators pad every sequence of a batch (a conversation, or a prompt with its chosen or rejected
answer) to the batch's longest. `pack_sequences(model)` hooks the model's decoder (the `model.model` that
both a causal LM and a sequence classifier call): a right-padded batch is laid end to end in one row,
without padding, with position ids that restart at each sequence, and attention is kept within each
sequence: by flash attention's varlen kernels where the model uses them (the `cu_seq_lens_*` keywords
transformers passes down), otherwise by `packed_sdpa`, which runs PyTorch's SDPA on the sequences padded
again for attention alone (a mask over the whole row would cost the square of its length). On
`packed_sdpa` a prefix that rows share (the prompt of a chosen and a rejected answer) is computed once
(`PackedLayout`). The decoder's output is scattered back to the padded layout, so the heads, TRL's losses
and metrics run unchanged on the same values, computed without the padding. Anything else (left padding,
a cache, hidden states or attentions asked for) runs as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis.train import last_layer


def decoder_of(model):
    """The transformer body a task model (causal LM, sequence classifier, a peft or DDP wrapper) calls."""
    task_model = _task_model(model)
    return getattr(task_model, task_model.base_model_prefix)


def _task_model(model):
    """The transformers model with the task's head (a causal LM, a sequence classifier) under any wrappers."""
    while hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def pack_trainer_models(trainer) -> None:
    """Padding-free forward passes for a trainer's model and, where it has one, its reference model."""
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            pack_sequences(model)


def pack_sequences(model) -> None:
    """Run `model`'s decoder on right-padded batches packed without padding (see the module docstring).

    Called through a causal LM's own forward (as DPO, KTO and ORPO call it), the LM head runs packed too
    and its logits are scattered back; where the instance's forward was replaced (TRL's SFT loss takes the
    head itself; accelerate's mixed-precision wrapper), or the model has no LM head, the decoder's output is.
    """
    if is_packing(model):
        return
    task_model = _task_model(model)
    decoder = decoder_of(model)
    lm_head = task_model.get_output_embeddings()
    _use_packed_sdpa(decoder.config)
    share = shares_prefixes(model)
    # The layout of the call under way (set by the decoder's pre-hook, None: not packed) and, inside the
    # causal LM's own forward, its LM head, which then takes the packed output.
    packed_call: dict[str, object] = {"layout": None, "head": None}

    def enter_task_forward(module, args, kwargs):
        own_forward = "forward" not in vars(module)  # not replaced on the instance
        packed_call["head"] = lm_head if own_forward else None

    def leave_task_forward(module, args, kwargs, output):
        packed_call["head"] = packed_call["layout"] = None

    def pack(module, args, kwargs):
        packed_call["layout"] = None
        packable = _packable(args, kwargs)
        if packable is None:
            return None
        input_ids, lengths = packable
        layout = PackedLayout.of(input_ids, lengths, share)
        if layout.tokens == input_ids.numel():  # no padding and nothing shared: nothing to remove
            return None
        packed_call["layout"] = layout
        request = last_layer.requested_rows()
        if request is not None:  # the caller reads some positions of the padded batch: where they are packed
            request.rows = layout.gather_index[request.rows]
        positions = torch.arange(layout.width, device=input_ids.device).expand_as(input_ids)
        packed = {
            "input_ids": layout.to_packed(input_ids)[None],
            "position_ids": layout.to_packed(positions)[None],
            "use_cache": False,  # with a cache, transformers would ignore the sequence boundaries
        }
        if _uses_packed_sdpa(module):
            # transformers uses a 4D mask as it is: this empty one says the layout is in the keywords
            packed |= {"attention_mask": _LAYOUT_IN_KWARGS.to(input_ids.device), PACKED_LAYOUT: layout}
        else:  # flash attention reads the sequence boundaries
            bounds = torch.tensor([0, *lengths], device=input_ids.device).cumsum(0, dtype=torch.int32)
            packed |= {"attention_mask": None, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds}
            packed |= {"max_length_q": max(lengths), "max_length_k": max(lengths)}
        return (), {**kwargs, **packed}

    def unpack(module, args, kwargs, output):
        layout = packed_call["layout"]
        if layout is None or packed_call["head"] is not None:  # not packed, or the LM head unpacks
            return None
        packed_call["layout"] = None
        request = last_layer.requested_rows()
        if request is not None and request.taken:  # the last layer gave the requested rows alone
            return None
        output.last_hidden_state = layout.to_padded(output.last_hidden_state[0])
        return output

    def unpack_logits(module, args, output):
        layout = packed_call["layout"]
        if layout is None or packed_call["head"] is not module:
            return None
        packed_call["layout"] = None
        if output.shape[:2] != (1, layout.tokens):
            raise RuntimeError(
                f"a packed forward pass took logits of {output.shape[1]} of its {layout.tokens} tokens "
                "(logits_to_keep?); set padding_free_forward: false"
            )
        return layout.to_padded(output[0])

    decoder.register_forward_pre_hook(pack, with_kwargs=True)
    decoder.register_forward_hook(unpack, with_kwargs=True)
    if lm_head is not None:
        task_model.register_forward_pre_hook(enter_task_forward, with_kwargs=True)
        task_model.register_forward_hook(leave_task_forward, with_kwargs=True, always_call=True)
        lm_head.register_forward_hook(unpack_logits)
    decoder._trellis_padding_free = True


@dataclass(frozen=True)
class PackedLayout:
    """Where each position of a right-padded batch (rows x width) is computed in the packed row.

    Every real token is computed once: with `share_prefixes`, a token whose row agrees with an earlier row
    up to and including it (a pair's shared prompt) is computed in the earliest such row only. Causal
    attention makes that exact: a token's hidden states depend on the tokens up to it alone.
    """

    rows: int
    width: int
    packed_positions: torch.Tensor  # (tokens,): the flat padded position each packed token is computed at
    gather_index: torch.Tensor  # (rows * width,): the packed token of each padded position; padding: `tokens`

    @property
    def tokens(self) -> int:
        return len(self.packed_positions)

    @classmethod
    def of(cls, input_ids: torch.Tensor, lengths: list[int], share_prefixes: bool) -> PackedLayout:
        rows, width = input_ids.shape
        device = input_ids.device
        positions = torch.arange(width, device=device)
        real = positions < torch.tensor(lengths, device=device)[:, None]
        row_ids = torch.arange(rows, device=device)[:, None]
        computed_in = row_ids.expand(rows, width)  # the row whose copy of each token is computed
        if share_prefixes:
            shared = _shared_prefix_lengths(input_ids, real)
            # the first row that agrees with this one up to and including the token
            computed_in = (shared[:, None, :] > positions[None, :, None]).to(torch.uint8).argmax(2)
        packed_positions = (real & (computed_in == row_ids)).flatten().nonzero().squeeze(1)
        tokens = len(packed_positions)
        rank = torch.full((rows * width,), tokens, device=device)
        rank[packed_positions] = torch.arange(tokens, device=device)
        gather_index = torch.where(real, rank.view(rows, width).gather(0, computed_in), tokens)
        return cls(rows, width, packed_positions, gather_index.flatten())

    def to_packed(self, padded: torch.Tensor) -> torch.Tensor:
        """(rows, width, ...) -> (tokens, ...): each packed token's value, from the row that computes it."""
        return padded.flatten(0, 1).index_select(0, self.packed_positions)

    def to_padded(self, packed: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (rows, width, ...): every row's tokens, shared ones repeated, zeros for padding."""
        with_zeros = torch.cat([packed, packed.new_zeros(1, *packed.shape[1:])])
        return with_zeros.index_select(0, self.gather_index).view(self.rows, self.width, *packed.shape[1:])


PACKED_SDPA = "trellis_packed_sdpa"
PACKED_LAYOUT = "trellis_packed_layout"  # the keyword that carries a call's PackedLayout down to packed_sdpa
_LAYOUT_IN_KWARGS = torch.ones(1, 1, 0, 0, dtype=torch.bool)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention; on a packed row, one causal SDPA call over its sequences laid out
    right-padded again (shared prefixes repeated in each row that shares them).

    Causal attention on right-padded rows needs no mask: a real token sees only earlier positions, which
    are all real. Only attention runs padded; the projections and MLPs, most of the work, stay packed.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    layout = kwargs.pop(PACKED_LAYOUT, None)
    if layout is None:
        if attention_mask is not None and attention_mask.numel() == 0:
            raise RuntimeError(
                f"{type(module).__name__} does not pass attention keywords down to its attention function, "
                "so it cannot run packed: set padding_free_forward: false"
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)

    def padded(states):  # (1, heads, tokens, dim) -> (rows, heads, width, dim)
        return layout.to_padded(states[0].transpose(0, 1)).transpose(1, 2)

    output = torch.nn.functional.scaled_dot_product_attention(
        padded(query), padded(key), padded(value), dropout_p=dropout, scale=scaling, is_causal=True
    )
    return layout.to_packed(output.transpose(1, 2))[None], None


def _use_packed_sdpa(config) -> None:
    """Models on SDPA attention switch to `packed_sdpa` (the same attention on unpacked calls).

    Flash attention reads the boundaries itself; eager and flex attention get transformers' block-diagonal
    mask from the restarting position ids; sliding-window attention keeps SDPA with that mask too.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if config._attn_implementation != "sdpa" or sliding:
        return
    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    config._attn_implementation = PACKED_SDPA


def _uses_packed_sdpa(decoder) -> bool:
    return decoder.config._attn_implementation == PACKED_SDPA


def is_packing(model) -> bool:
    """Whether `pack_sequences` hooked this model's decoder."""
    return getattr(decoder_of(model), "_trellis_padding_free", False)


def shares_prefixes(model) -> bool:
    """Whether `model`'s packed forward passes compute a prefix rows share once: on `packed_sdpa`, the only
    attention here that takes a shared layout, and without dropout, which would differ between the copies."""
    decoder = decoder_of(model)
    dropout = getattr(decoder.config, "attention_dropout", 0.0) or any(
        isinstance(module, torch.nn.Dropout) and module.p > 0 for module in decoder.modules()
    )
    return _uses_packed_sdpa(decoder) and not dropout


def processed_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefixes: bool) -> int:
    """Tokens a packed forward pass computes on for this batch: each real one once, unless it cannot pack."""
    lengths = _right_padded_lengths(attention_mask)
    if lengths is None:
        return attention_mask.numel()
    if not share_prefixes:
        return sum(lengths)
    shared = _shared_prefix_lengths(input_ids, attention_mask.bool()).tril(-1)  # with earlier rows
    return sum(lengths) - int(shared.amax(1).sum())  # a row computes what it shares with no earlier row


def _shared_prefix_lengths(input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(rows, rows): how many leading real tokens each two rows have in common."""
    same = (input_ids[:, None] == input_ids[None]) & real[:, None] & real[None]
    return same.to(torch.uint8).cumprod(2).sum(2)


def _packable(args, kwargs) -> tuple[torch.Tensor, list[int]] | None:
    """(input_ids, sequence lengths) of a right-padded training-style call, else None."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if len(args) > 2 or input_ids is None or attention_mask is None:
        return None
    if kwargs.get("position_ids") is not None or kwargs.get("inputs_embeds") is not None:
        return None
    if (
        kwargs.get("past_key_values") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("use_cache")
    ):
        return None
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return None
    lengths = _right_padded_lengths(attention_mask)
    return None if lengths is None else (input_ids, lengths)


def _right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Each row's length if the rows are right-padded, else None."""
    if attention_mask.dim() != 2:
        return None
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
        return None
    return lengths.tolist()
