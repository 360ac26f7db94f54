"""The SFT trainer as the sft stage and the distill stage's cot mode build it: TRL's SFTTrainer, the loss's
logits in one piece when small, and the end-of-turn token checked to be trained."""

from __future__ import annotations

import trl

from trellis.data import chat
from trellis.train import lm_head_loss, models
from trellis.train.distributed import CpuShardingMixin


class SFTTrainer(CpuShardingMixin, trl.SFTTrainer):
    """TRL's SFTTrainer, sharded on CPU processes as the launch config asks (FSDP2, tensor parallel)."""


def sft_trainer(
    model, tokenizer, training_args, model_args, dataset, unchunked_loss_max_mib: float
) -> SFTTrainer:
    """A checked SFTTrainer on `dataset` (its `train` split, and `test` when there is one)."""
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset.get("test"),
        processing_class=tokenizer,
        peft_config=models.peft_config(model_args),
    )
    lm_head_loss.compute_small_logits_at_once(trainer, unchunked_loss_max_mib)
    chat.check_eos_in_loss_mask(trainer)
    return trainer
