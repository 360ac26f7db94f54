"""What the datatrove runs of the data stage kept and removed, per step and reason, and the quality model's
scores, read from the files the runs wrote (so the report is the same whichever executor ran them), and
the documents they kept."""

from __future__ import annotations

import glob
import heapq
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from trellis.data.arguments import DataArguments
from trellis.data.datatrove_blocks import (
    EXAMPLE_CHARS,
    PEAK_RSS,
    QUALITY_SCORE,
    PeakMemory,
    QualityFilter,
    read_records,
)
from trellis.data.sources import DataError


def count_documents(work: str, folder: str) -> int:
    return sum(
        sum(1 for _ in open(p, encoding="utf-8")) for p in glob.glob(os.path.join(work, folder, "*.jsonl"))
    )


def removed_records(work: str, step: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(work, "removed", step, "*.jsonl")))
    return [record for name in files for record in read_records(name)]


def _stat(work: str, run: str, block: str, key: str) -> int:
    total = 0
    for name in glob.glob(os.path.join(work, "logs", run, "stats", "*.json")):
        for entry in json.loads(Path(name).read_text()):
            if entry["name"].endswith(block):
                value = entry["stats"].get(key, 0)
                total += value["total"] if isinstance(value, dict) else value
    return int(total)


def example_text(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "..."


def report_steps(args: DataArguments, work: str, report, wall: dict[str, float]) -> int:
    """Append the datatrove steps to the report (from the files they left); return the documents read.
    (One paragraph per step, in the order the runs make them.)

    A step's `seconds` are task-seconds: the time its blocks took, summed over the tasks that ran them
    (one core each), wherever they ran; `wall` holds each run's wall-clock seconds.
    """
    filtered, filtered_bytes = count_documents(work, "filtered"), _bytes(work, "filtered")
    entries = _filter_entries(args, work, report, filtered, filtered_bytes)
    entries += _dedup_entries(args, work, report, filtered, filtered_bytes)
    seconds = task_seconds(work)
    for entry in entries:
        entry["seconds"] = round(seconds.get(entry["step"], 0.0), 3)
    report.details["datatrove"] = {
        "executor": args.executor_spec.kind,
        "tasks": args.executor_spec.tasks,
        "wall_seconds": {run: round(value, 3) for run, value in wall.items()},
        "task_seconds": {step: round(value, 3) for step, value in seconds.items()},
        "peak_task_rss_mb": peak_task_rss(work),
    }
    report.steps.extend(entries)
    return entries[0]["documents_out"]  # what `load` read


def _filter_entries(args: DataArguments, work: str, report, filtered: int, filtered_bytes: int) -> list[dict]:
    """The steps of run 1: load, clean, filter (the rules) and quality_score."""
    removals = filter_removals(args, work)
    loaded = filtered + sum(r["removed"] for r in removals.values())
    loaded_bytes = filtered_bytes + sum(_bytes(work, f"removed/{step}") for step in _FILTER_STEPS)
    unscored = removed_records(work, "quality")  # under the threshold
    ruled = filtered + len(unscored)  # what the rules kept, all of it scored
    pii = _stat(work, "filter", "pii", "pii_redacted")
    entries = [
        _entry("load", 0, 0, loaded, bytes_out=loaded_bytes),
        _entry("clean", loaded, loaded_bytes, loaded, pii_redacted=pii),
        _entry("filter", loaded, loaded_bytes, ruled),
    ]
    report.details["filters"] = removals
    if args.quality_model:
        entries.append(_entry("quality_score", ruled, filtered_bytes + _text_bytes(unscored), filtered))
        report.details["quality_scores"] = quality_details(args, work, unscored)
    return entries


def _dedup_entries(args: DataArguments, work: str, report, filtered: int, filtered_bytes: int) -> list[dict]:
    """The steps of runs 3 to 7: exact_dedup, decontaminate and near_dedup."""
    contaminated = removed_records(work, "decontaminate")
    deduped, deduped_bytes = count_documents(work, "deduped"), _bytes(work, "deduped")
    entries = []
    if args.exact_dedup:
        entries.append(_entry("exact_dedup", filtered, filtered_bytes, deduped + len(contaminated)))
    if args.decontamination_datasets:
        bytes_in = deduped_bytes + _text_bytes(contaminated)
        entries.append(_entry("decontaminate", deduped + len(contaminated), bytes_in, deduped))
        report.details["decontamination"] = {
            "removed": len(contaminated),
            "examples": [example_text(r["text"]) for r in contaminated[: args.report_examples]],
        }
    if args.near_dedup:
        entries.append(_entry("near_dedup", deduped, deduped_bytes, count_documents(work, "final")))
        report.details["near_duplicates"] = _near_duplicate_details(args, work)
    return entries


def _entry(step: str, documents_in: int, bytes_in: int, documents_out: int, **more: int) -> dict:
    return {
        "step": step,
        "documents_in": documents_in,
        "bytes_in": bytes_in,
        "documents_out": documents_out,
        **more,
    }


def _text_bytes(records: Iterable[dict]) -> int:
    return sum(len(r["text"].encode()) for r in records)


_FILTER_STEPS = ("length", "gopher", "repetition", "c4", "fineweb", "blocklist", "quality")


def quality_details(args: DataArguments, work: str, removed: list[dict]) -> dict[str, Any]:
    """The scores of every scored document: summary, histogram, and the documents on either side of the
    threshold (what it cut, and what it let through)."""
    kept_scores: list[float] = []

    def scored(records: Iterable[dict]) -> Iterable[dict]:
        for record in records:
            kept_scores.append(_score(record))
            yield record

    # streamed: only the scores and the few lowest kept documents stay in memory, however large the corpus
    kept = (
        r for name in sorted(glob.glob(os.path.join(work, "filtered", "*.jsonl"))) for r in read_records(name)
    )
    lowest_kept = heapq.nsmallest(args.report_examples, scored(kept), key=_score)
    scores = np.array(kept_scores + [_score(r) for r in removed])

    def shown(records: list[dict]) -> list[dict]:
        return [
            {"score": round(_score(r), 3), "text": example_text(r["text"])}
            for r in records[: args.report_examples]
        ]

    return {
        "model": args.quality_model,
        "revision": args.quality_model_revision,
        "threshold": args.quality_threshold,
        "scored": len(scores),
        "removed": len(removed),
        "mean": round(float(scores.mean()), 3),
        "quantiles": {f"p{q}": round(float(np.percentile(scores, q)), 3) for q in (10, 50, 90)},
        "histogram": score_histogram(scores, args.quality_threshold),
        "removed_just_below": shown(sorted(removed, key=_score, reverse=True)),
        "kept_just_above": shown(lowest_kept),
    }


def _score(record: dict) -> float:
    return record["metadata"][QUALITY_SCORE]


_WIDTHS = [m * 10.0**k for k in range(-3, 7) for m in (1, 2, 5)]


def score_histogram(scores: np.ndarray, threshold: float, max_bins: int = 20) -> dict[str, int]:
    """Documents per score bin: bins of a round width, at most `max_bins`, one edge on the threshold
    (the bins under it hold what it removed)."""
    spread = float(scores.max() - scores.min())
    width = next((w for w in _WIDTHS if spread / w <= max_bins - 2), _WIDTHS[-1])
    first = threshold - width * math.ceil((threshold - float(scores.min())) / width)
    counts = np.bincount(np.floor((scores - first) / width).astype(int))
    edge = lambda i: round(first + i * width, 6)  # noqa: E731
    return {f"[{edge(i):g}, {edge(i + 1):g})": int(count) for i, count in enumerate(counts)}


def _bytes(work: str, folder: str) -> int:
    files = glob.glob(os.path.join(work, folder, "*.jsonl"))
    return _text_bytes(r for name in files for r in read_records(name))


# Blocks whose timer spans the whole run (they iterate their input, and yield, inside it).
_SPANNING = ("exact-deduplication stage 3", "MinHash stage 1")


RUNS = (
    "filter",
    "exact_find",
    "exact_filter",
    "minhash_signature",
    "minhash_buckets",
    "minhash_cluster",
    "minhash_filter",
)


def task_seconds(work: str) -> dict[str, float]:
    """Seconds per report step, summed over blocks and tasks; reading and writing the intermediate
    files between runs is `intermediate_io`. A block whose timer spans its run is given its run's time
    less the other blocks' time."""
    totals: Counter = Counter()
    for run in RUNS:
        for name in glob.glob(os.path.join(work, "logs", run, "stats", "*.json")):
            blocks = {
                block["name"]: block["time_stats"].get("total", 0.0)
                for block in json.loads(Path(name).read_text())
                if isinstance(block.get("time_stats"), dict) and not block["name"].endswith(PeakMemory.name)
            }
            spanning = [block for block in blocks if block.endswith(_SPANNING)]
            own = sum(seconds for block, seconds in blocks.items() if block not in spanning)
            for block, seconds in blocks.items():
                totals[_step_of(run, block)] += max(seconds - own, 0.0) if block in spanning else seconds
    return dict(totals)


def peak_task_rss(work: str) -> dict[str, int]:
    """Run -> the largest peak resident memory (MB) of its tasks, as their PeakMemory blocks recorded."""
    peaks: dict[str, int] = {}
    for run in RUNS:
        for name in glob.glob(os.path.join(work, "logs", run, "stats", "*.json")):
            for block in json.loads(Path(name).read_text()):
                if block["name"].endswith(PeakMemory.name) and PEAK_RSS in block["stats"]:
                    peaks[run] = max(peaks.get(run, 0), int(block["stats"][PEAK_RSS]["total"]))
    return peaks


def _step_of(run: str, block: str) -> str:
    if "READER" in block:
        return "load" if run == "filter" else "intermediate_io"
    if "WRITER" in block:
        return "intermediate_io"
    if run.startswith("minhash") or "MinHash" in block or "minhash" in block.lower():
        return "near_dedup"
    if block.endswith(QualityFilter.name):
        return "quality_score"
    if "FORMAT" in block:
        return "clean"
    if "FILTER" in block:
        return "filter"
    if "DECONT" in block:
        return "decontaminate"
    return "exact_dedup"


def filter_removals(args: DataArguments, work: str) -> dict[str, dict]:
    """reason -> documents removed and the first few of them, from the filters' exclusion files."""
    reasons: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for step in _FILTER_STEPS:
        for record in _records(work, f"removed/{step}"):
            reason = _reason(step, record["metadata"].get("filter_reason", step))
            reasons[reason] += 1
            shown = examples.setdefault(reason, [])
            if len(shown) < args.report_examples:
                shown.append(example_text(record["text"]))
    return {r: {"removed": reasons[r], "examples": examples[r]} for r in sorted(reasons)}


def _reason(step: str, reason: str) -> str:
    return reason if ":" in reason else f"{step}: {reason}"


def raise_if_empty(step: str, removed: dict) -> None:
    why = ", ".join(f"{reason}: {count}" for reason, count in sorted(removed.items())) or "nothing"
    raise DataError(
        f"no documents left after step '{step}' (removed: {why}); relax the thresholds of that step "
        f"in the recipe (or turn it off) or check the input data"
    )


def _near_duplicate_details(args: DataArguments, work: str) -> dict[str, Any]:
    """Clusters and examples of the near duplicates, read in passes over the files: only counts per
    cluster and the shown examples stay in memory."""
    sizes: Counter = Counter()
    for record in _records(work, "removed/near_dedup"):
        sizes[record["metadata"]["minhash_cluster_id"]] += 1
    shown = sorted(sizes)[: args.report_examples]
    removed: dict[int, str] = {}  # each shown cluster's first removed document
    for record in _records(work, "removed/near_dedup"):
        if (cluster := record["metadata"]["minhash_cluster_id"]) in shown:
            removed.setdefault(cluster, record["text"])
    kept = {}
    for record in _records(work, "final"):
        cluster = record["metadata"].get("minhash_cluster_id", -1)
        if cluster in shown:
            kept[cluster] = record["text"]
    return {
        "clusters": len(sizes),
        "removed": sum(sizes.values()),
        "largest_cluster": 1 + max(sizes.values()) if sizes else 0,
        "examples": [[example_text(kept.get(c, "")), example_text(removed[c])] for c in shown],
    }


def _records(work: str, folder: str) -> Iterable[dict]:
    """The records of a folder's per-task files, streamed in task order."""
    for name in sorted(glob.glob(os.path.join(work, folder, "*.jsonl"))):
        yield from read_records(name)


def kept_documents(args: DataArguments, work: str):
    """The documents that survived, in task order, as a `text` dataset: streamed into an Arrow file under
    the work folder, so memory does not grow with the corpus."""
    import datasets

    folder = "final" if args.near_dedup else "deduped"

    def texts():
        for record in _records(work, folder):
            yield {"text": record["text"]}

    return datasets.Dataset.from_generator(texts, cache_dir=os.path.join(work, "kept"), keep_in_memory=False)
