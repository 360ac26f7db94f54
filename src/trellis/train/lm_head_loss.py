"""Loss-token log-probabilities computed in one piece where their logits are small.

TRL bounds the memory of the logits its losses take log-probabilities of by splitting them. SFT's
default loss (`chunked_nll`) runs the LM head on the loss tokens only, 256 tokens at a time, each chunk
checkpointed and recomputed in the backward pass, so the logits of a 128k vocabulary never exist for a
whole batch; DPO, KTO and ORPO take each sequence's log-softmax in a Python loop (`selective_log_softmax`).
Where the logits are small (small vocabularies, short sequences) that costs more than it saves: the
tiny SFT spends about a fifth of its forward and backward time in the chunks, the tiny DPO a tenth in
the loop. `compute_small_logits_at_once` (SFT) and `log_probs_at_once` (DPO, KTO, ORPO) keep TRL's
losses, metrics and special cases and compute the same values in one piece when the logits take at most
`max_mib` MiB; larger batches still go TRL's way. SFT's then also runs the last decoder layer, after its
attention, on the loss tokens alone (trellis.train.last_layer): no other token's final hidden state is read.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import types

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from trellis.train import last_layer

IGNORE_INDEX = -100


def compute_small_logits_at_once(trainer, max_mib: float) -> None:
    """Patch the model TRL's SFTTrainer patched for `chunked_nll` (call after building the trainer).

    Nothing changes when `max_mib` is 0 or the loss is not `chunked_nll`; models whose head TRL
    treats specially (logit soft-capping or scaling, MoE auxiliary losses) keep TRL's chunks.
    The replacement forward is a closure over the model TRL patched, kept in one piece so it reads
    beside TRL's own `chunked_nll` forward, line for line.
    """
    if not max_mib or trainer.args.loss_type != "chunked_nll":
        return
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    text_config = model.config.get_text_config()
    if (
        getattr(text_config, "final_logit_softcapping", None) is not None  # Gemma 2: leave it to TRL
        or getattr(text_config, "logit_scale", None) not in (None, 1.0)
        or getattr(text_config, "output_router_logits", False)  # MoE: the aux loss is added in TRL's forward
        or model.base_model is model  # no separate backbone to run without the head
    ):
        return
    from trl.trainer.sft_trainer import _ChunkedCELMHeadOutput

    chunked_forward = model.forward  # TRL's: the fallback for large logits
    lm_head = model.get_output_embeddings()
    max_tokens = int(max_mib * 2**20 // (4 * lm_head.weight.shape[0]))

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        at_once = (
            labels is not None
            and kwargs.get("shift_labels") is None  # context/sequence parallelism: TRL's path
            and not isinstance(lm_head.weight, DTensor)
        )
        if at_once:
            targets = labels[..., 1:]
            valid = targets != IGNORE_INDEX
            num_valid = valid.sum()
            at_once = 0 < int(num_valid) <= max_tokens
        if not at_once:
            return chunked_forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs.pop("use_cache", None)
        rows, columns = valid.nonzero(as_tuple=True)  # the positions whose hidden states predict a target
        hidden = last_layer.hidden_states_at(
            self.base_model,
            rows * labels.shape[-1] + columns,
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **kwargs,
        )
        log_probs = lm_head(hidden).float().log_softmax(dim=-1)
        targets = targets[valid]
        # Divided by the loss tokens of the whole accumulated batch when the Trainer passes their count, as TRL does.
        denominator = num_valid if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = F.nll_loss(log_probs, targets, reduction="sum") / denominator.to(log_probs.device)
        with torch.no_grad():  # the metrics TRL logs for chunked_nll
            log_probs = log_probs.detach()
            entropy_sum = -(log_probs.exp() * log_probs).sum()
            correct = (log_probs.argmax(dim=-1) == targets).sum().float()
        return _ChunkedCELMHeadOutput(
            loss=loss,
            logits=None,
            num_correct_tokens=correct,
            entropy_sum=entropy_sum,
            num_valid_tokens=num_valid,
        )

    forward.__signature__ = inspect.signature(chunked_forward.__func__)  # generate() checks its kwargs on it
    model.forward = types.MethodType(forward, model)


# The bound `log_probs_at_once` set for the loss being computed (0: TRL's loop); read by _selective_log_softmax.
_AT_ONCE_MAX_BYTES = contextvars.ContextVar("trellis_log_probs_at_once_max_bytes", default=0)


def log_probs_at_once(trainer, max_mib: float) -> None:
    """Take the log-softmax of a whole batch's logits at once in `trainer`'s loss when they take at most
    `max_mib` MiB, not TRL's per-sequence loop (DPO, KTO, ORPO; call after building the trainer).

    The modules of the trainer's classes get `_selective_log_softmax` for TRL's `selective_log_softmax`. It
    follows TRL's own unless called inside this trainer's `compute_loss`, so other trainers are unaffected.
    """
    from trl.trainer import utils as trl_utils

    if not max_mib:
        return
    for cls in type(trainer).__mro__:
        module = sys.modules[cls.__module__]
        if getattr(module, "selective_log_softmax", None) is trl_utils.selective_log_softmax:
            module.selective_log_softmax = _selective_log_softmax
    compute_loss = trainer.compute_loss
    max_bytes = int(max_mib * 2**20)

    @functools.wraps(compute_loss)
    def compute_loss_at_once(*args, **kwargs):
        bound = _AT_ONCE_MAX_BYTES.set(max_bytes)
        try:
            return compute_loss(*args, **kwargs)
        finally:
            _AT_ONCE_MAX_BYTES.reset(bound)

    trainer.compute_loss = compute_loss_at_once


def _selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's `selective_log_softmax` (log_softmax(logits) at `index`), in one piece when `log_probs_at_once`
    allows it: the same float32 formula as TRL's (the logit minus its row's logsumexp), without the loop."""
    from trl.trainer.utils import selective_log_softmax

    small = logits.numel() * logits.element_size() <= _AT_ONCE_MAX_BYTES.get()
    if not small or logits.dtype not in (torch.float32, torch.float64) or index.ndim != logits.ndim - 1:
        return selective_log_softmax(logits, index)
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
