"""Padding-free forward passes for the stages whose batches TRL pads (SFT, reward, DPO, KTO, ORPO).

TRL's collators pad every sequence of a batch (a conversation, or a prompt with its chosen or rejected
answer) to the batch's longest. `pack_sequences(model)` hooks the model's decoder (the `model.model` that
both a causal LM and a sequence classifier call): a right-padded batch is laid end to end in one row,
without padding, with position ids that restart at each sequence, and attention is kept within each
sequence: by flash attention's varlen kernels where the model uses them (the `cu_seq_lens_*` keywords
transformers passes down), otherwise by `packed_sdpa`, which runs PyTorch's SDPA on the sequences padded
again for attention alone (a mask over the whole row would cost the square of its length). The decoder's
output is scattered back to the padded layout, so the heads, TRL's losses and metrics run unchanged on
the same values, computed without the padding. Anything else (left padding, a cache, hidden states or
attentions asked for) runs as before.
"""

from __future__ import annotations

import torch


def decoder_of(model):
    """The transformer body a task model (causal LM, sequence classifier, a peft or DDP wrapper) calls."""
    while hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def pack_trainer_models(trainer) -> None:
    """Padding-free forward passes for a trainer's model and, where it has one, its reference model."""
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            pack_sequences(model)


def pack_sequences(model) -> None:
    """Run `model`'s decoder on right-padded batches packed without padding (see the module docstring)."""
    if is_packing(model):
        return
    decoder = decoder_of(model)
    _use_packed_sdpa(decoder.config)
    # Set by every call's pre-hook (None: not packed), read by the same call's post-hook.
    packed_call: dict[str, tuple | None] = {"layout": None}

    def pack(module, args, kwargs):
        layout = _packable(args, kwargs)
        packed_call["layout"] = None
        if layout is None:
            return None
        input_ids, lengths = layout
        packed_ids, position_ids, padded_index = _pack(input_ids, lengths)
        packed_call["layout"] = (padded_index, tuple(input_ids.shape))
        bounds = torch.tensor([0, *lengths], device=input_ids.device).cumsum(0, dtype=torch.int32)
        packed = {
            "input_ids": packed_ids,
            "position_ids": position_ids,
            # transformers uses a 4D mask as it is: this empty one says the boundaries are in cu_seq_lens
            "attention_mask": _BOUNDARIES_IN_KWARGS.to(input_ids.device)
            if _uses_packed_sdpa(module)
            else None,
            "use_cache": False,  # with a cache, transformers would ignore the sequence boundaries
            **{"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds},
            **{"max_length_q": max(lengths), "max_length_k": max(lengths)},
        }
        return (), {**kwargs, **packed}

    def unpack(module, args, kwargs, output):
        if packed_call["layout"] is None:
            return None
        padded_index, (batch, width) = packed_call["layout"]
        packed_call["layout"] = None
        flat = output.last_hidden_state[0]
        padded = flat.new_zeros(batch * width, flat.shape[-1]).index_copy(0, padded_index, flat)
        output.last_hidden_state = padded.view(batch, width, -1)
        return output

    decoder.register_forward_pre_hook(pack, with_kwargs=True)
    decoder.register_forward_hook(unpack, with_kwargs=True)
    decoder._trellis_padding_free = True


PACKED_SDPA = "trellis_packed_sdpa"
_BOUNDARIES_IN_KWARGS = torch.ones(1, 1, 0, 0, dtype=torch.bool)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention; on a packed row (cu_seq_lens_q: the boundaries), one causal SDPA call
    over the sequences laid out right-padded again.

    Causal attention on right-padded rows needs no mask: a real token sees only earlier positions, which
    are all real. Only attention runs padded; the projections and MLPs, most of the work, stay packed.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or attention_mask is None or attention_mask.numel() != 0:  # not a packed call
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lengths = bounds.diff()
    width = int(kwargs["max_length_q"])
    starts = bounds[:-1].repeat_interleave(lengths)
    rows = torch.arange(len(lengths), device=query.device).repeat_interleave(lengths)
    padded_index = rows * width + torch.arange(query.shape[2], device=query.device) - starts

    def padded(states):  # (1, heads, tokens, dim) -> (sequences, heads, width, dim)
        tokens = states[0].transpose(0, 1)
        out = tokens.new_zeros(len(lengths) * width, *tokens.shape[1:]).index_copy(0, padded_index, tokens)
        return out.view(len(lengths), width, *tokens.shape[1:]).transpose(1, 2)

    output = torch.nn.functional.scaled_dot_product_attention(
        padded(query), padded(key), padded(value), dropout_p=dropout, scale=scaling, is_causal=True
    )
    return output.transpose(1, 2).flatten(0, 1).index_select(0, padded_index)[None], None


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


def processed_tokens(attention_mask: torch.Tensor) -> int:
    """Tokens a packed forward pass computes on for this batch: the real ones, unless it cannot be packed."""
    lengths = _right_padded_lengths(attention_mask)
    return attention_mask.numel() if lengths is None else sum(lengths)


def _packable(args, kwargs) -> tuple[torch.Tensor, list[int]] | None:
    """(input_ids, sequence lengths) of a right-padded training-style call that has padding, else None."""
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
    """Each row's length if the rows are right-padded and some have padding, else None."""
    if attention_mask.dim() != 2:
        return None
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    right_padded = torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])
    if not right_padded or bool(mask.all()):
        return None
    return lengths.tolist()


def _pack(input_ids: torch.Tensor, lengths: list[int]):
    """The real tokens of a right-padded batch in one row, their position ids (restarting at each sequence),
    and where each came from in the flattened padded batch."""
    device = input_ids.device
    mask = torch.arange(input_ids.shape[1], device=device) < torch.tensor(lengths, device=device)[:, None]
    position_ids = torch.arange(input_ids.shape[1], device=device).expand_as(mask)[mask]
    padded_index = mask.flatten().nonzero().squeeze(1)
    return input_ids[mask][None], position_ids[None], padded_index
