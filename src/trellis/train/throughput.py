"""Measuring training speed: real (non-padding) tokens/s, padding efficiency, step time, peak memory, MFU.

Every training stage attaches a `ThroughputMeter` (see stage.train_and_evaluate), so each run record
holds these figures; scripts/benchmark.py compares them across runs.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from trellis.train import padding_free

logger = logging.getLogger("trellis")

WARMUP_STEPS = 3  # first steps of a run left out of its figures (allocation, compilation)


@dataclass
class BatchTokens:
    real: int  # tokens of the examples themselves
    processed: int  # tokens the model computes on, padding included
    row_length: int  # the sequence length attention runs over


COUNTS_KEY = "trellis_token_counts"  # rides in the batch from the collator to the training step


class CountingCollator:
    """Wraps a data collator and adds the token counts of every batch it builds to the batch itself.

    What the model processes is every `*input_ids` tensor of the batch, padding and all; the real
    tokens are those its attention mask keeps (`input_ids` with `attention_mask`, DPO's or ORPO's
    `chosen_input_ids` with `chosen_attention_mask`, ...). A batch without a mask is padding-free
    (packed SFT, pretraining blocks): its real tokens are the examples' own. The counts travel in
    the batch (as `COUNTS_KEY`) because the collator runs in the dataloader's worker processes when
    there are any; the meter takes them out before the trainer sees the batch. With `packs_sequences`
    (trellis.train.padding_free) the model computes on the packed rows, not the padded batch, and with
    `shares_prefixes` on each shared prefix once.
    """

    def __init__(self, collator, packs_sequences: bool = False, shares_prefixes: bool = False) -> None:
        self.collator = collator
        self.packs_sequences = packs_sequences
        self.shares_prefixes = shares_prefixes

    def __call__(self, examples):
        batch = self.collator(examples)
        real = processed = row_length = 0
        for key, ids in batch.items():
            if not (key.endswith("input_ids") and isinstance(ids, torch.Tensor)):
                continue
            mask = batch.get(key.replace("input_ids", "attention_mask"))
            if mask is not None:
                real += int(mask.sum())
            else:
                real += sum(len(example[key]) for example in examples if key in example) or ids.numel()
            packed = self.packs_sequences and mask is not None
            processed += (
                padding_free.processed_tokens(ids, mask, self.shares_prefixes) if packed else ids.numel()
            )
            row_length = max(row_length, ids.shape[-1])
        batch[COUNTS_KEY] = torch.tensor([real, processed, row_length])
        return batch

    def __getattr__(self, name):  # trainers read settings off their collator (e.g. padding_free)
        if name.startswith("__") or name == "collator":  # unpickling in a worker, before __init__ ran
            raise AttributeError(name)
        return getattr(self.collator, name)


def take_counts(batch: dict) -> BatchTokens:
    """Remove the counting collator's token counts from a batch and return them."""
    real, processed, row_length = (int(value) for value in batch.pop(COUNTS_KEY))
    return BatchTokens(real, processed, row_length)


def flops_per_token(config, row_length: int) -> float:
    """Training FLOPs per token of a decoder (forward + backward), PaLM appendix B / nanochat.

    6 per matmul parameter (the input embedding is a lookup, the LM head a matmul; tied weights
    count once) plus 12 * layers * hidden * sequence length for attention scores and values.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    vocab = config.vocab_size
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v projections
    mlp = 3 * hidden * intermediate  # gate, up, down
    matmul_params = layers * (attention + mlp) + vocab * hidden  # + the LM head
    return 6.0 * matmul_params + 12.0 * layers * heads * head_dim * row_length


def matmul_peak_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul throughput of this GPU (the peak MFU is taken against)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


@dataclass
class StepRecord:
    seconds: float
    real_tokens: int
    processed_tokens: int
    flops: float


@dataclass
class ThroughputMeter(TrainerCallback):
    """Times each optimizer step (wall clock between step ends, so data loading and the optimizer
    count) and the tokens of the micro-batches it consumed (`count` them as the trainer takes them);
    steps that contained an evaluation or a checkpoint save, and the first `warmup_steps`, are left
    out of the figures."""

    warmup_steps: int = WARMUP_STEPS
    restore: Callable[[], None] | None = None  # puts the trainer's own collator back for evaluation
    peak_tflops: float | None = None
    steps: list[StepRecord] = field(default_factory=list)
    loss_curve: list[list[float]] = field(default_factory=list)  # [real tokens seen, logged loss]

    def __post_init__(self) -> None:
        self._batches: list[BatchTokens] = []  # the micro-batches of the step under way
        self._last_end: float | None = None
        self._skip_next = False
        self._config = None
        self._tokens_seen = 0

    def _now(self, args) -> float:
        _synchronize(args.device)
        return time.perf_counter()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.restore:
            self.restore()
        self._config = getattr(model, "config", None)
        self._device = args.device
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
            if self.peak_tflops is None:
                self.peak_tflops = matmul_peak_tflops(args.device)
        self._last_end = self._now(args)

    def count(self, batch: BatchTokens) -> None:
        self._batches.append(batch)

    def on_step_end(self, args, state, control, **kwargs):
        end = self._now(args)
        batches, self._batches = self._batches, []
        real = sum(batch.real for batch in batches)
        self._tokens_seen += real
        flops = 0.0
        if self._config is not None:
            flops = sum(batch.real * flops_per_token(self._config, batch.row_length) for batch in batches)
        record = StepRecord(end - self._last_end, real, sum(b.processed for b in batches), flops)
        if not self._skip_next:
            self.steps.append(record)
        self._skip_next = False
        self._last_end = end

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss_curve.append([self._tokens_seen, logs["loss"]])

    def on_evaluate(self, args, state, control, **kwargs):
        self._skip_next = True

    def on_save(self, args, state, control, **kwargs):
        self._skip_next = True

    def summary(self) -> dict[str, float]:
        """The run's figures (an empty dict if it took no more steps than the warm-up)."""
        steps = self.steps[self.warmup_steps :]
        if not steps:
            return {}
        seconds = sum(step.seconds for step in steps)
        real = sum(step.real_tokens for step in steps)
        processed = sum(step.processed_tokens for step in steps)
        figures = {
            "tokens_per_second": real / seconds,
            "padding_efficiency": real / processed,
            "step_seconds": statistics.median(step.seconds for step in steps),
            "measured_steps": len(steps),
            "measured_tokens": real,
            **peak_memory_gib(self._device),
        }
        flops = sum(step.flops for step in steps)
        if flops and self.peak_tflops:
            figures["model_tflops"] = flops / seconds / 1e12
            figures["peak_tflops"] = self.peak_tflops
            figures["mfu"] = figures["model_tflops"] / self.peak_tflops
        return figures


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated/reserved, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_gib": rss_kib / (2**30 if sys.platform == "darwin" else 2**20)}


def attach(trainer, warmup_steps: int = WARMUP_STEPS) -> ThroughputMeter:
    """Count the tokens of every training batch and time the steps of the next `trainer.train()`.

    The training dataloader is built with the counting collator, and the trainer's training step
    hands each batch's counts to the meter; evaluation keeps the original collator (restored once
    training begins, after the training dataloader exists).
    """
    packing = padding_free.is_packing(trainer.model)
    collator = CountingCollator(
        trainer.data_collator, packing, packing and padding_free.shares_prefixes(trainer.model)
    )
    trainer.data_collator = collator
    meter = ThroughputMeter(
        warmup_steps, restore=lambda: setattr(trainer, "data_collator", collator.collator)
    )
    training_step = trainer.training_step

    def counted_training_step(model, inputs, *args, **kwargs):
        meter.count(take_counts(inputs))
        return training_step(model, inputs, *args, **kwargs)

    trainer.training_step = counted_training_step
    trainer.add_callback(meter)
    return meter


class GenerationTimeSplit(TrainerCallback):
    """Splits each update of an online-RL trainer (PPO, GRPO, RLOO) into generation and the rest.

    The policy's `generate` is wrapped to add up its wall time; the rest of an update (scoring,
    the reference and value passes, the optimisation epochs) counts as training.
    """

    def __init__(self, policy) -> None:
        self.generation_seconds = self.training_seconds = 0.0
        self._generating = 0.0
        self._last_end: float | None = None
        generate = policy.generate

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                _synchronize(policy.device)
                self._generating += time.perf_counter() - start

        policy.generate = timed_generate

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_end = time.perf_counter()
        self._generating = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize(args.device)
        end = time.perf_counter()
        generation, total = self._generating, end - self._last_end
        self.generation_seconds += generation
        self.training_seconds += total - generation
        self._generating, self._last_end = 0.0, end
        if args.logging_steps and state.global_step % max(int(args.logging_steps), 1) == 0:
            logger.info(
                "update %d: %.2f s generating, %.2f s training (%.0f%% generation)",
                state.global_step,
                generation,
                total - generation,
                100 * generation / max(total, 1e-9),
            )

    def summary(self) -> dict[str, float]:
        total = self.generation_seconds + self.training_seconds
        return {
            "generation_seconds": self.generation_seconds,
            "training_seconds": self.training_seconds,
            "generation_fraction": self.generation_seconds / total if total else 0.0,
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
