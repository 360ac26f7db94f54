"""Datasets: load Hub or local sources, convert common formats to TRL's, mix them by weight, hold out a test split.

What a record becomes depends on what the stage trains on (its `task`):
- "messages" (SFT): TRL's `messages` column (a list of {role, content}), from Alpaca, ShareGPT and
  Anthropic HH transcripts (the chosen one), or TRL's prompt/completion and text columns as they are;
- "preference" (reward, DPO): TRL's `prompt` (optional: an implicit prompt is part of both answers;
  conversational pairs get their shared turns split off as the prompt), `chosen` and `rejected`
  columns, from TRL's preference format (UltraFeedback binarized too) or Anthropic HH transcript pairs;
- "unpaired" (KTO): TRL's unpaired `prompt`, `completion` and `label` columns, as they are or from
  preference pairs (in any format the "preference" task reads): chosen -> True, rejected -> False;
- "prompts" (PPO, GRPO, RLOO): a `prompt` column only.

Real datasets hold records no converter can use (a line of broken UTF-8, an empty reply, a turn
without a role, an HH pair whose dialogues differ before the last reply). Such a record is dropped and
counted per reason (BAD_REASONS) with where the first of each reason is and what it looked like; the
counts go to the log and the run record, and a source with more than `max_bad_record_fraction` of its
records dropped stops the stage before training. A recipe-level mistake (a format none of the records
is in) fails as before.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import logging
import lzma
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from trellis.data.arguments import DatasetSource, ScriptArguments
from trellis.data.bad_records import (
    DEFAULT_MAX_BAD_FRACTION,
    BadRecord,
    DataError,
    SourceReport,
    TooManyBadRecords,
    bad_record_sink,
    check_fraction,
    require_some,
)
from trellis.data.formats import (
    check_records,
    convert_record,
    implicit_prompt,
    plan_conversion,
    unpair_preferences,
)

logger = logging.getLogger(__name__)


# File suffix -> the `datasets` builder that reads it (compression suffixes are stripped first).
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _rows_of(dataset, name: str):
    """A loaded dataset's records as check_records reads them: (file, position, record)."""
    return ((name, {"record": index}, row) for index, row in enumerate(dataset))


def _convert_dataset(dataset, fmt: str, source: str, task: str, max_bad_fraction: float):
    """A loaded dataset converted for the stage's task without its unusable records: (dataset, report).

    The records are checked one by one, then the good ones are selected and converted with
    `datasets.map`, so that a large dataset stays in Arrow (memory-mapped) rather than in Python objects.
    """
    if len(dataset) == 0:
        raise DataError(f"dataset {source!r} is empty")
    plan = plan_conversion(dataset.column_names, dataset[0], fmt, source, task)
    kept, report = check_records(_rows_of(dataset, source), plan, source, keep_rows=False)
    check_fraction(report, max_bad_fraction)
    require_some(kept, report)
    if len(kept) < len(dataset):
        dataset = dataset.select(kept)
    if plan.keep is not None and not (plan.task == "preference" and implicit_prompt(dataset[0])):
        converted = dataset.select_columns(plan.keep)
    else:
        converted = dataset.map(
            partial(convert_record, plan=plan),
            remove_columns=dataset.column_names,
            desc=f"Converting {source} ({plan.fmt})",
        )
    return _unpaired_if_needed(converted, task), report


def convert(dataset, fmt: str, source: str, task: str = "messages"):
    """Convert a dataset to TRL's columns for the stage's task, keeping only those columns.

    Records of no use to the stage are dropped (see check_records); KTO's pair formats are unpaired.
    """
    return _convert_dataset(dataset, fmt, source, task, max_bad_fraction=1.0)[0]


def _unpaired_if_needed(dataset, task: str):
    if task == "unpaired" and "label" not in dataset.column_names:
        return unpair_preferences(dataset)
    return dataset


def _builder_for(path: str) -> str:
    name = path
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    suffix = Path(name).suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(_BUILDERS)}")
    return _BUILDERS[suffix]


def load_source(source: DatasetSource, streaming: bool = False):
    """Load one source as a `datasets.Dataset`: local files, a local dataset directory, or a Hub dataset.

    With `streaming`, files and Hub datasets come as an `IterableDataset` read lazily.
    """
    import datasets

    path = os.path.expanduser(source.path)
    if os.path.isfile(path) or any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path)) or [path]
        return datasets.load_dataset(
            _builder_for(files[0]), data_files=files, split="train", streaming=streaming
        )
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise DataError(f"{path}: no split {source.split!r}; it has {list(loaded)}")
                loaded = loaded[source.split]
            return loaded
        return datasets.load_dataset(path, source.name, split=source.split, streaming=streaming)
    return datasets.load_dataset(
        source.path, source.name, split=source.split, revision=source.revision, streaming=streaming
    )


def apply_weight(dataset, weight: float, seed: int):
    """Keep a seeded `weight` share of the rows (weight > 1 repeats the whole dataset)."""
    import datasets

    whole, fraction = int(weight), weight - int(weight)
    parts = [dataset] * whole
    if fraction > 0:
        count = max(1, round(fraction * len(dataset)))
        parts.append(dataset.shuffle(seed=seed).select(range(count)))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _json_files(source: DatasetSource) -> list[str] | None:
    """The local JSON (lines) files of a source, which are read record by record; None for other sources."""
    path = os.path.expanduser(source.path)
    if not (os.path.isfile(path) or any(ch in path for ch in "*?[")):
        return None
    files = sorted(glob.glob(path)) or [path]
    readable = all(
        _builder_for(f) == "json" and (Path(f).suffix not in _COMPRESSION or Path(f).suffix in _OPENERS)
        for f in files
    )
    return files if readable else None


def _json_records(path: str) -> Iterator[tuple[str, dict, Any]]:
    """(file, {"line": n}, record) for each JSON line of a file (or each item of a JSON array), with a
    BadRecord in place of a line that is not UTF-8 or not JSON: one broken line does not hide the others."""
    with _OPENERS.get(Path(path).suffix, open)(path, "rb") as handle:
        array = handle.read(4096).lstrip()[:1] == b"["  # one JSON array, not JSON lines
        handle.seek(0)
        if array:
            try:
                items = json.loads(handle.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DataError(
                    f"{path}: not a readable JSON array ({error}); write it as JSON lines"
                ) from None
            yield from ((path, {"record": index}, item) for index, item in enumerate(items))
            return
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                detail = (
                    f"byte {raw[error.start : error.start + 1]!r} at column {error.start + 1} is not UTF-8"
                )
                line = raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
                yield path, {"line": number}, BadRecord("not_utf8", detail, line)
                continue
            try:
                yield path, {"line": number}, json.loads(text)
            except json.JSONDecodeError as error:
                yield (
                    path,
                    {"line": number},
                    BadRecord("bad_json", f"not JSON ({error})", text.rstrip("\r\n")),
                )


def read_source(source: DatasetSource, task: str, max_bad_fraction: float):
    """Load and convert one source, dropping the records the stage cannot use: (dataset, SourceReport).

    Raises DataError, naming the file, line and an example of each reason, when more than
    `max_bad_fraction` of the source's records are dropped.
    """
    import datasets

    files = _json_files(source)
    if files is None:  # Hub datasets, parquet, csv, text, saved datasets: `datasets` reads them
        dataset = load_source(source)
        if dataset.column_names == ["text"] and dataset.builder_name == "text":
            dataset = dataset.filter(lambda row: bool(row["text"].strip()))  # blank lines are no records
        return _convert_dataset(dataset, source.format, source.path, task, max_bad_fraction)
    # JSON read here, line by line: `datasets` stops at the first line that is not UTF-8 or JSON.
    records = [item for path in files for item in _json_records(path)]
    if not records:
        raise DataError(f"dataset {source.path!r} is empty")
    dicts = [record for _, _, record in records if isinstance(record, dict)]
    columns = list(dict.fromkeys(key for record in dicts for key in record))
    plan = plan_conversion(columns, dicts[0] if dicts else {}, source.format, source.path, task)
    rows, report = check_records(records, plan, source.path)
    check_fraction(report, max_bad_fraction)
    require_some(rows, report)
    return _unpaired_if_needed(datasets.Dataset.from_list(rows), task), report


def _load_mixture(
    sources: list[DatasetSource], seed: int, task: str, max_bad_fraction: float, reports: list[SourceReport]
):
    """load_mixture, adding each source's report to `reports` as it is read (also the one that fails)."""
    import datasets

    parts = []
    for source in sources:
        logger.info("Loading dataset %s (split %s, weight %s)", source.path, source.split, source.weight)
        try:
            dataset, report = read_source(source, task, max_bad_fraction)
        except TooManyBadRecords as error:
            reports.append(error.report)
            raise
        parts.append(apply_weight(dataset, source.weight, seed))
        reports.append(report)
    columns = {tuple(sorted(part.column_names)) for part in parts}
    if len(columns) > 1:
        raise DataError(f"the sources of a mixture must share one format; got column sets {sorted(columns)}")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_mixture(
    sources: list[DatasetSource],
    seed: int,
    task: str = "messages",
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
):
    """Load, convert (for the stage's task) and weight every source, then concatenate them into one dataset."""
    return _load_mixture(sources, seed, task, max_bad_fraction, [])


def load_train_eval(script_args: ScriptArguments, seed: int, task: str = "messages"):
    """The stage's data: a `DatasetDict` with `train` and, if the recipe has held-out data, `test`.

    `task` is what the stage trains on: "messages" (SFT), "preference" (reward, DPO, ORPO), "unpaired"
    (KTO) or "prompts" (PPO, GRPO, RLOO). Records the stage cannot use are dropped and reported (see
    read_source) to the run's sink (see reporting_bad_records).
    """
    import datasets

    fraction = script_args.max_bad_record_fraction
    if not 0 <= fraction <= 1:
        raise DataError(f"max_bad_record_fraction is {fraction}; set it between 0 and 1 (default 0.01)")
    reports: dict[str, list[SourceReport]] = {"train": [], "test": []}
    result = None
    try:
        train = _load_mixture(script_args.datasets, seed, task, fraction, reports["train"])
        if script_args.eval_datasets:
            test = _load_mixture(script_args.eval_datasets, seed, task, fraction, reports["test"])
            result = datasets.DatasetDict(train=train, test=test)
        elif script_args.test_split_size:
            size = script_args.test_split_size
            result = train.train_test_split(test_size=int(size) if size >= 1 else size, seed=seed)
        else:
            result = datasets.DatasetDict(train=train)
        return result
    finally:  # also when a source has too many bad records: the run record shows them
        sink = bad_record_sink()
        if sink is not None:
            sources = [{"split": split, **r.as_dict()} for split, listed in reports.items() for r in listed]
            rows = {split: len(dataset) for split, dataset in result.items()} if result is not None else {}
            sink({"max_fraction": fraction, "sources": sources, "rows": rows})


def fingerprints(dataset_dict) -> dict[str, str]:
    """The `datasets` fingerprint of every split: what the run record calls the data it trained on."""
    return {split: dataset._fingerprint for split, dataset in dataset_dict.items()}
