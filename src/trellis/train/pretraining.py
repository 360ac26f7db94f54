"""Pretraining on the data stage's packed blocks (see trellis.corpus): EMA weights and a divergence guard."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from trellis.core.errors import TrellisError
from trellis.train.averaging import average_checkpoints, last_checkpoints
from trellis.train.distributed import CpuShardingMixin, local_shard, reshard
from trellis.train.run import save_model_directory

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
    """transformers' TrainingArguments plus `trust_remote_code`, as TRL's stage configs have it, counting
    the tokens seen by default (logged with tokens/s)."""

    # True means 'all'. (The recipe parser reads this field as a boolean: a default of "all" would not parse.)
    include_num_input_tokens_seen: str | bool = field(
        default=True, metadata={"help": "Count the input tokens seen (true: all of them)."}
    )

    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model repository's own code (only for repositories you trust)."},
    )


class DivergenceError(TrellisError):
    """Training produced a non-finite loss or a loss spike."""


class GuardedTrainer(CpuShardingMixin, Trainer):
    """A Trainer that stops before the optimizer step on a NaN/inf loss or a loss spike.

    The check sits between backward and the optimizer step, so the bad update is never applied and
    the last checkpoint on disk stays the last good one.
    """

    def __init__(self, *args, loss_spike_factor: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_spike_factor = loss_spike_factor
        self._running_loss: float | None = None
        self._last_log: tuple[float, int] | None = None  # (time, tokens seen) at the previous training log

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add training throughput (tokens/s since the previous log, over all processes) and validation
        perplexity to what the Trainer logs, so the console and TensorBoard/W&B show them."""
        if "loss" in logs and self._last_log is not None:
            now, seen = time.monotonic(), self.state.num_input_tokens_seen
            logs["tokens_per_second"] = round(
                (seen - self._last_log[1]) / max(now - self._last_log[0], 1e-9), 1
            )
            self._last_log = (now, seen)
        for key in [k for k in logs if k.startswith("eval") and k.endswith("_loss")]:  # eval_ema_loss too
            logs[key.removesuffix("loss") + "perplexity"] = perplexity(logs[key])
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._last_log is None:
            self._last_log = (time.monotonic(), self.state.num_input_tokens_seen)
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

    It averages each process's local shards (see local_shard), so under FSDP2 and ZeRO-3 the EMA is
    sharded like the parameters, and each process writes its own shard into the checkpoint.
    """

    def __init__(
        self, decay: float, start_step: int = 0, update_every: int = 1, resume_from: str | None = None
    ):
        self.decay, self.start_step, self.update_every = decay, start_step, update_every
        self.resume_from = resume_from
        self.shadow: dict[str, torch.Tensor] = {}
        self.model = None
        self.sharded = False

    def _file(self, args) -> str:
        return f"ema-rank{args.process_index}-of-{args.world_size}.safetensors" if self.sharded else EMA_FILE

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.sharded = args.world_size > 1 and any(local_shard(p) is not p for _, p in params)
        self.shadow = {name: local_shard(p).detach().float().clone() for name, p in params}
        if not self.resume_from:
            return
        path = os.path.join(self.resume_from, self._file(args))
        if os.path.exists(path):
            from safetensors.torch import load_file

            saved = load_file(path)
            self.shadow = {name: saved[name] for name in self.shadow}
            logger.info("Resumed the EMA weights from %s", path)
        elif any(name.startswith("ema") for name in os.listdir(self.resume_from)):
            raise TrellisError(
                f"{self.resume_from} holds EMA weights saved by another number of processes or another "
                f"sharding than this run ({args.world_size} process(es)); resume with the same launch config"
            )
        else:
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
                    self.shadow[name].lerp_(local_shard(param).detach().float(), 1.0 - decay)
        if control.should_save and (args.should_save or self.sharded):
            self._save(os.path.join(args.output_dir, f"checkpoint-{step}"), self._file(args))

    def _save(self, checkpoint_dir: str, file: str) -> None:
        """Write the EMA (this process's shard of it, when sharded) into the checkpoint the Trainer is
        about to write.

        on_save would come after the Trainer's trainer_state.json, which marks a checkpoint complete;
        a kill in between would leave a "complete" checkpoint without its EMA.
        """
        from safetensors.torch import save_file

        os.makedirs(checkpoint_dir, exist_ok=True)
        tmp = os.path.join(checkpoint_dir, file + ".tmp")
        save_file({name: t.contiguous() for name, t in self.shadow.items()}, tmp)
        os.replace(tmp, os.path.join(checkpoint_dir, file))


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
def swap_weights(model, weights: dict[str, torch.Tensor], full: bool = False) -> dict[str, torch.Tensor]:
    """Copy `weights` into the model's parameters (cast to their dtype); return the old ones.

    The weights are this process's local shards, as EMACallback keeps them and this returns them, or,
    with `full`, whole tensors, of which each DTensor parameter (FSDP2) takes its own shard.
    """
    reshard(model)
    old = {}
    for name, param in model.named_parameters():
        if name in weights:
            shard, new = local_shard(param), weights[name]
            if full and hasattr(param, "device_mesh"):
                # Redistributed from a replica (distribute_tensor cannot cut FSDP2's _StridedShard over TP).
                from torch.distributed.tensor import DTensor, Replicate

                mesh = param.device_mesh
                whole = DTensor.from_local(
                    new.to(param.dtype), mesh, [Replicate()] * mesh.ndim, run_check=False
                )
                new = whole.redistribute(mesh, param.placements).to_local()
            elif full and hasattr(param, "ds_tensor"):  # ZeRO-3: an even split of the flattened parameter
                start = torch.distributed.get_rank() * shard.numel()
                part = new.flatten()[start : start + shard.numel()]
                new = torch.zeros_like(shard)
                new[: part.numel()] = part
            old[name] = shard.detach().clone()
            shard.copy_(new.to(shard.dtype))
            if getattr(getattr(param, "ds_status", None), "name", None) == "AVAILABLE":
                # ZeRO-3 keeps small parameters gathered between steps; drop that stale copy so the next
                # forward pass gathers the partitions just written.
                param.partition()
    return old


def evaluate_weight_variants(trainer, record, ema: EMACallback | None, average_last: int) -> None:
    """Evaluate the EMA weights (saved to output_dir/ema) and the average of the last `average_last`
    checkpoints (output_dir/averaged) on the validation blocks, recorded as `eval_ema` and `eval_averaged`
    beside the final weights' `eval`."""
    output_dir = trainer.args.output_dir
    variants = {}
    if ema:
        variants["ema"] = ema.shadow
    if average_last:
        from safetensors.torch import load_file

        averaged = os.path.join(output_dir, "averaged")
        if trainer.accelerator.is_main_process:
            average_checkpoints(
                last_checkpoints(output_dir, average_last), averaged, model_files_from=output_dir
            )
        trainer.accelerator.wait_for_everyone()
        variants["averaged"] = load_file(os.path.join(averaged, "model.safetensors"))
    for name, weights in variants.items():
        raw = swap_weights(trainer.model, weights, full=name == "averaged")
        if name == "ema":
            save_model_directory(trainer, os.path.join(output_dir, "ema"))
        # Logged as eval/ema_loss, eval/averaged_loss, ... (TensorBoard); recorded under the usual keys.
        metrics = trainer.evaluate(metric_key_prefix=f"eval_{name}")
        record.set_metrics(
            f"eval_{name}", {k.replace(f"eval_{name}", "eval", 1): v for k, v in metrics.items()}
        )
        swap_weights(trainer.model, raw)
    for name in ("eval", *(f"eval_{v}" for v in variants)):
        metrics = record.data["metrics"][name]  # the trainer's log added the perplexity
        logger.info(
            "%-14s validation loss %.4f, perplexity %.2f",
            name,
            metrics["eval_loss"],
            metrics["eval_perplexity"],
        )
