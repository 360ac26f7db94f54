"""Pretraining on the data stage's packed blocks (see trellis.corpus): EMA weights and a divergence guard."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from trellis.errors import TrellisError

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"


@dataclass
class PretrainArguments:
    """What the pretraining stage reads, and the EMA, averaging and guard settings."""

    dataset_path: str = field(
        metadata={"help": "Output directory of the data stage (holds packed/ and tokenizer/)."}
    )
    ema_decay: float | None = field(
        default=None,
        metadata={"help": "Keep an fp32 exponential moving average of the weights with this decay."},
    )
    ema_start_step: int = field(default=0, metadata={"help": "Start averaging after this optimizer step."})
    ema_update_every: int = field(default=1, metadata={"help": "Update the EMA every this many steps."})
    average_last_checkpoints: int = field(
        default=0, metadata={"help": "At the end, also average the weights of the last N checkpoints."}
    )
    loss_spike_factor: float | None = field(
        default=None,
        metadata={
            "help": "Stop if a step's loss exceeds this factor times the running mean (NaN/inf always stop)."
        },
    )


@dataclass
class PretrainConfig(TrainingArguments):
    """transformers' TrainingArguments plus `trust_remote_code`, as TRL's stage configs have it."""

    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model repository's own code (only for repositories you trust)."},
    )


class DivergenceError(TrellisError):
    """Training produced a non-finite loss or a loss spike."""


class GuardedTrainer(Trainer):
    """A Trainer that stops before the optimizer step on a NaN/inf loss or a loss spike.

    The check sits between backward and the optimizer step, so the bad update is never applied and
    the last checkpoint on disk stays the last good one.
    """

    def __init__(self, *args, loss_spike_factor: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_spike_factor = loss_spike_factor
        self._running_loss: float | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = loss.item() * self.current_gradient_accumulation_steps
        step = self.state.global_step + 1
        if not math.isfinite(value):
            raise DivergenceError(
                f"loss is {value} at step {step}; stopped before applying the update. The last good checkpoint "
                f"is kept in {self.args.output_dir}; lower the learning rate or raise warmup, then rerun to resume."
            )
        spiked = (
            self.loss_spike_factor
            and self._running_loss
            and value > self.loss_spike_factor * self._running_loss
        )
        if spiked and step > 10:  # the first steps' losses fall too fast for a running mean
            raise DivergenceError(
                f"loss spiked to {value:.3f} at step {step}, over {self.loss_spike_factor}x its running mean "
                f"{self._running_loss:.3f}; stopped before applying the update (last good checkpoint kept)."
            )
        self._running_loss = value if self._running_loss is None else 0.9 * self._running_loss + 0.1 * value
        return loss


class EMACallback(TrainerCallback):
    """An fp32 exponential moving average of the weights, checkpointed with the run.

    The copies are taken of the parameters as the process holds them, so under FSDP2 (DTensor
    shards) they would be sharded the same way; sharded runs are not tested yet.
    """

    def __init__(
        self, decay: float, start_step: int = 0, update_every: int = 1, resume_from: str | None = None
    ):
        self.decay, self.start_step, self.update_every = decay, start_step, update_every
        self.resume_from = resume_from
        self.shadow: dict[str, torch.Tensor] = {}
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        if self.resume_from and os.path.exists(os.path.join(self.resume_from, EMA_FILE)):
            from safetensors.torch import load_file

            saved = load_file(os.path.join(self.resume_from, EMA_FILE))
            self.shadow = {name: saved[name] for name in self.shadow}
            logger.info("Resumed the EMA weights from %s", self.resume_from)
        elif self.resume_from:
            logger.warning(
                "%s has no EMA weights (EMA was off?): the EMA restarts from the resumed weights",
                self.resume_from,
            )

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        step, first = state.global_step, max(self.start_step, 1)
        if step >= first and (step - first) % self.update_every == 0:
            decay = (
                0.0 if step == first else self.decay
            )  # start from the trained weights, not the initial ones
            for name, param in self.model.named_parameters():
                if name in self.shadow:
                    self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)
        if control.should_save and args.should_save:
            self._save(os.path.join(args.output_dir, f"checkpoint-{step}"))

    def _save(self, checkpoint_dir: str) -> None:
        """Write the EMA into the checkpoint the Trainer is about to write.

        on_save would come after the Trainer's trainer_state.json, which marks a checkpoint complete;
        a kill in between would leave a "complete" checkpoint without its EMA.
        """
        from safetensors.torch import save_file

        os.makedirs(checkpoint_dir, exist_ok=True)
        tmp = os.path.join(checkpoint_dir, EMA_FILE + ".tmp")
        save_file({name: t.contiguous() for name, t in self.shadow.items()}, tmp)
        os.replace(tmp, os.path.join(checkpoint_dir, EMA_FILE))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class BlockCollator:
    """Batches packed blocks: labels are the inputs (the model shifts them), EOS included.

    Only the last block of a split ends in padding (see trellis.corpus); those trailing pad
    tokens are left out of the loss.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([example["input_ids"] for example in examples], dtype=torch.long)
        trailing_pad = (input_ids == self.pad_token_id).flip(1).cumprod(1).flip(1).bool()
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(trailing_pad, -100)}


@torch.no_grad()
def swap_weights(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy `weights` into the model's parameters (cast to their dtype); return the old ones."""
    old = {}
    for name, param in model.named_parameters():
        if name in weights:
            old[name] = param.detach().clone()
            param.copy_(weights[name].to(param.dtype))
    return old
