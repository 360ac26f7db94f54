"""The SFT trainer as the sft stage and the distill stage's cot mode build it: TRL's SFTTrainer, the loss's
logits in one piece when small, padding-free forward passes if asked, and the end-of-turn token checked to
be trained."""

from __future__ import annotations

import trl

from trellis.data import chat
from trellis.train import lm_head_loss, models, padding_free
from trellis.train.distributed import CpuShardingMixin


class SFTTrainer(CpuShardingMixin, trl.SFTTrainer):
    """TRL's SFTTrainer, sharded on CPU processes as the launch config asks (FSDP2, tensor parallel)."""


def sft_trainer(model, tokenizer, training_args, model_args, dataset, script_args) -> SFTTrainer:
    """A checked SFTTrainer on `dataset` (its `train` split, and `test` when there is one), with the speed
    settings of `script_args` (a TokenLossScriptArguments)."""
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset.get("test"),
        processing_class=tokenizer,
        peft_config=models.peft_config(model_args),
    )
    lm_head_loss.compute_small_logits_at_once(trainer, script_args.unchunked_loss_max_mib)
    if script_args.padding_free_forward:
        padding_free.pack_trainer_models(trainer)
    chat.check_eos_in_loss_mask(trainer)
    return trainer
