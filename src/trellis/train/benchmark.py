"""Benchmarking a stage recipe against the plain TRL/transformers trainer (scripts/benchmark.py).

Both sides run the same stage script on the same model, data and hyperparameters; the baseline
resets every speed setting (`SPEED_KEYS`) to the trainer config's own default, which is what a
thin recipe repository gets from TRL. Runs alternate (trellis, baseline, trellis, ...) so machine
noise hits both, and each figure's ratio is reported as the median and spread over the pairs.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import statistics

from trellis.core.tables import markdown_table, number

# Recipe keys that change speed, not what is learned (up to float rounding and document isolation).
SPEED_KEYS = (
    "packing",
    "packing_strategy",
    "padding_free",
    "padding_free_forward",
    "pad_to_multiple_of",
    "gradient_checkpointing",
    "activation_checkpointing",
    "activation_offloading",
    "train_sampling_strategy",
    "torch_compile",
    "use_liger_kernel",
    "optim",
    "dataloader_num_workers",
    "attn_implementation",
    "use_logits_to_keep",
    "unchunked_loss_max_mib",
)
# SFT's loss_type picks between two implementations of the same loss (elsewhere it changes the loss).
SAME_LOSS_TYPES = {"nll", "chunked_nll"}

# Figures per run, with the direction that is better.
FIGURES = {
    "tokens_per_second": "higher",
    "padding_efficiency": "higher",
    "step_seconds": "lower",
    "peak_rss_gib": "lower",
    "peak_allocated_gib": "lower",
    "peak_reserved_gib": "lower",
    "mfu": "higher",
    "loss_at_equal_tokens": "lower",
}


def baseline_overrides(stage_types: tuple[type, ...], recipe: dict) -> dict[str, object]:
    """The speed keys the recipe sets, each put back to the value the stage's config resolves by default.

    Defaults are read off a default-constructed config (TRL's SFTConfig turns activation checkpointing
    on through its `gradient_checkpointing` alias, for instance); a key whose default is None (the
    library decides) stays as the recipe has it, since None cannot be passed on a command line.
    """
    speed_keys = set(SPEED_KEYS)
    if isinstance(recipe.get("loss_type"), str) and recipe["loss_type"] in SAME_LOSS_TYPES:
        speed_keys.add("loss_type")
    defaults = {}
    for cls in stage_types:
        names = _field_names(cls) & speed_keys & set(recipe)
        if names:
            # (on CPU and without bf16, so that constructing it checks no hardware)
            is_training_config = "output_dir" in _field_names(cls)
            instance = cls(output_dir="unused", use_cpu=True, bf16=False) if is_training_config else cls()
            for name in names:
                value = getattr(instance, name)
                defaults[name] = value.value if isinstance(value, enum.Enum) else value  # e.g. OptimizerNames
    changed = {key: value for key, value in defaults.items() if value is not None and recipe[key] != value}
    return {key: changed[key] for key in sorted(changed, key=list(recipe).index)}  # in the recipe's order


def timed_run_arguments(stage: str, steps: int) -> list[str]:
    """Command-line overrides of a timed run: `steps` optimizer steps, no evaluation, checkpoints or reporting."""
    return [
        *("--max_steps", str(steps), "--eval_strategy", "no", "--save_strategy", "no"),
        *("--logging_steps", "1", "--report_to", "none"),
        # Checkpoint averaging needs the checkpoints a timed run does not write.
        *(("--average_last_checkpoints", "0") if stage == "pretrain" else ()),
    ]


def _field_names(cls: type) -> set[str]:
    return {spec.name for spec in dataclasses.fields(cls)}


def loss_at_tokens(curve: list[list[float]], tokens: float, window: float = 0.2) -> float | None:
    """Mean logged training loss over the last `window` fraction of the first `tokens` tokens."""
    losses = [loss for seen, loss in curve if (1 - window) * tokens < seen <= tokens]
    return statistics.fmean(losses) if losses else None


def add_equal_token_loss(pair: dict[str, dict]) -> None:
    """Give each run of a (trellis, baseline) pair its loss at the tokens both have seen."""
    tokens = min(run["loss_curve"][-1][0] for run in pair.values() if run.get("loss_curve"))
    for run in pair.values():
        value = loss_at_tokens(run.get("loss_curve", []), tokens)
        if value is not None:
            run["figures"]["loss_at_equal_tokens"] = value
        run["figures"]["equal_tokens"] = tokens


def ratios(trellis_runs: list[dict], baseline_runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per figure: trellis / baseline for each alternating pair, as median, min and max."""
    result = {}
    for figure in FIGURES:
        values = [
            mine[figure] / theirs[figure]
            for mine, theirs in zip(trellis_runs, baseline_runs, strict=True)
            if theirs.get(figure) and figure in mine
        ]
        if values:
            result[figure] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return result


def table(runs: dict[str, list[dict]], comparison: dict[str, dict[str, float]] | None) -> str:
    """A markdown table: the median of each figure per variant, and the ratio column."""
    names = list(runs)
    figures = [f for f in FIGURES if any(f in run for variant in runs.values() for run in variant)]
    header = ["figure", *(f"{name} (median of {len(runs[name])})" for name in names)]
    if comparison:
        header.append(f"{names[0]} / {names[1]}: median [min, max]")
    rows = []
    for figure in figures:
        cells = [f"{figure} ({FIGURES[figure]} is better)"]
        for name in names:
            values = [run[figure] for run in runs[name] if figure in run]
            cells.append(number(statistics.median(values)) if values else "-")
        if comparison:
            ratio = comparison.get(figure)
            cells.append(f"{ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]" if ratio else "-")
        rows.append(cells)
    return markdown_table(header, rows)


def write_synthetic_corpus(
    output_dir: str,
    vocab_size: int,
    block_size: int,
    train_blocks: int,
    validation_blocks: int,
    seed: int = 0,
) -> None:
    """A data-stage output of uniformly random tokens, for speed measurements of pretraining.

    Uniform tokens make the loss meaningless but the work identical to real text of that length.
    """
    import datasets
    import numpy as np
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from trellis.core.run_record import RunRecord
    from trellis.data.packing import PACKED_DIR, TOKENIZER_DIR

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(os.path.join(output_dir, TOKENIZER_DIR))
    rng = np.random.default_rng(seed)
    splits = {"train": train_blocks, "validation": validation_blocks}
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"input_ids": rng.integers(2, vocab_size, size=(blocks, block_size), dtype=np.int32)}
            )
            for split, blocks in splits.items()
        }
    ).save_to_disk(os.path.join(output_dir, PACKED_DIR))
    with RunRecord("data", output_dir, {}) as record:
        record.data["synthetic"] = {
            "vocab_size": vocab_size,
            "block_size": block_size,
            **splits,
            "seed": seed,
        }


def read_run(output_dir: str) -> dict:
    """The measured figures and the loss curve of one benchmark run, from its run record."""
    with open(os.path.join(output_dir, "trellis_run.json")) as handle:
        record = json.load(handle)
    return {"figures": record["metrics"].get("throughput", {}), "loss_curve": record.get("loss_curve", [])}
