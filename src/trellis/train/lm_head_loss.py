"""SFT's loss with the LM head computed at once on the loss tokens, where their logits are small.

TRL's default SFT loss (`chunked_nll`) runs the LM head on the tokens the loss is taken on only,
256 tokens at a time, each chunk checkpointed and recomputed in the backward pass, so the logits
of a 128k vocabulary never exist for a whole batch. Where they would be small (small vocabularies,
short completions) that costs more than it saves: the tiny default spends about a fifth of its
forward and backward time in it. `compute_small_logits_at_once` keeps TRL's loss, metrics and every
special case, and computes a batch's loss-token logits in one piece, without recomputation, when
they take at most `max_mib` MiB in float32; larger batches still go through TRL's chunks.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

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
        hidden = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        ).last_hidden_state
        log_probs = lm_head(hidden[..., :-1, :][valid]).float().log_softmax(dim=-1)
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
