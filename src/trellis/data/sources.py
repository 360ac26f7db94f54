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
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from trellis.core.errors import TrellisError
from trellis.data.arguments import DATASET_FORMATS, DatasetSource, ScriptArguments

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


DEFAULT_MAX_BAD_FRACTION = 0.01  # ScriptArguments.max_bad_record_fraction


class DataError(TrellisError):
    """A dataset could not be read or converted."""


# Why a record was dropped -> what the log and the error say about it.
BAD_REASONS = {
    "not_utf8": "bytes that are not UTF-8",
    "bad_json": "not a JSON object",
    "missing_field": "a field of the format missing or null",
    "wrong_type": "a field of another type than in the other records",
    "missing_role": "a turn without a known role",
    "empty_turn": "a turn or answer with no text",
    "no_reply": "no assistant reply to learn from",
    "bad_transcript": "not an HH transcript",
    "dialogues_differ": "chosen and rejected dialogues differ before the last turn",
    "same_answers": "chosen and rejected answers are the same",
}


class TooManyBadRecords(DataError):
    """More of a source's records cannot be used than the recipe allows; `report` says which and where."""

    def __init__(self, message: str, report: SourceReport):
        super().__init__(message)
        self.report = report


class BadRecord(DataError):
    """One record a converter cannot use; `reason` is a key of BAD_REASONS, `line` the raw text of a line
    that is no record at all (not UTF-8 or not JSON)."""

    def __init__(self, reason: str, detail: str, line: str | None = None):
        super().__init__(detail)
        self.reason, self.line = reason, line


# --- converters: one record of a common format -> {"messages": [...]} --------------------------------

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


def alpaca_to_messages(example: dict) -> dict:
    """Alpaca: {instruction, input, output} (optional system) -> messages."""
    prompt = example["instruction"].strip()
    if example.get("input"):
        prompt = f"{prompt}\n\n{example['input'].strip()}"
    messages = [{"role": "system", "content": example["system"]}] if example.get("system") else []
    messages += [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": example["output"].strip()},
    ]
    return {"messages": messages}


def sharegpt_to_messages(example: dict) -> dict:
    """ShareGPT: {conversations: [{from, value}, ...]} -> messages."""
    messages = []
    for turn in example["conversations"]:
        if "role" in turn:  # already {role, content} under a `conversations` key
            messages.append({"role": turn["role"], "content": turn["content"]})
            continue
        speaker = str(turn.get("from")).lower()
        if speaker not in _SHAREGPT_ROLES:
            raise BadRecord(
                "missing_role",
                f"ShareGPT turn has an unknown speaker {turn.get('from')!r}; known: "
                f"{', '.join(sorted(_SHAREGPT_ROLES))}",
            )
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return {"messages": messages}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_transcript(text: str) -> list[dict]:
    """An Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise BadRecord(
            "bad_transcript",
            f"not an HH transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...'): {text[:80]!r}",
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def hh_to_messages(example: dict) -> dict:
    """Anthropic HH {chosen, rejected}: SFT trains on the chosen transcript."""
    return {"messages": parse_hh_transcript(example["chosen"])}


def hh_to_preference(example: dict) -> dict:
    """Anthropic HH {chosen, rejected} transcripts -> the shared dialogue as `prompt`, the last replies as answers."""
    chosen, rejected = parse_hh_transcript(example["chosen"]), parse_hh_transcript(example["rejected"])
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise BadRecord("no_reply", "an HH transcript of the pair does not end with an Assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord(
            "dialogues_differ",
            "an HH pair must be one dialogue with two different last Assistant replies; got "
            f"chosen {example['chosen'][:80]!r} and rejected {example['rejected'][:80]!r}",
        )
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def unpair_preferences(pairs):
    """Preference pairs -> KTO's unpaired examples: each chosen answer labelled True, each rejected False.
    Pairs with an implicit prompt (whole dialogues) get it split off first, or each completion would be
    the whole dialogue."""
    from trl.data_utils import maybe_extract_prompt, unpair_preference_dataset

    pairs = pairs.map(maybe_extract_prompt, desc="Extracting the shared prompt")
    return unpair_preference_dataset(pairs, desc="Unpairing preference pairs")


TASKS = ("messages", "preference", "unpaired", "prompts")

# Task -> format -> converter of one record.
CONVERTERS: dict[str, dict[str, Callable[[dict], dict]]] = {
    "messages": {"alpaca": alpaca_to_messages, "sharegpt": sharegpt_to_messages, "hh": hh_to_messages},
    "preference": {"hh": hh_to_preference},
    "unpaired": {},
    "prompts": {},
}

# Task -> formats TRL reads as they are -> (required columns, optional columns) we keep.
_PASSTHROUGH_COLUMNS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "messages": {
        "messages": (["messages"], []),
        "prompt_completion": (["prompt", "completion"], []),
        "text": (["text"], []),
    },
    "preference": {"preference": (["chosen", "rejected"], ["prompt"])},
    "unpaired": {"unpaired": (["prompt", "completion", "label"], [])},
    "prompts": {"prompt": (["prompt"], [])},
}
_TASK_NEEDS = {
    "messages": "conversations or text",
    "preference": "preference pairs (format preference: prompt/chosen/rejected, or hh)",
    "unpaired": "unpaired examples (format unpaired: prompt/completion/label) or preference pairs",
    "prompts": "prompts (format prompt: a `prompt` column)",
}


def detect_format(columns: list[str], first: dict, task: str = "messages") -> str:
    """Guess the record format from the column names (and one record) for the stage's task.

    Preference data may carry a `messages` column beside its pairs (UltraFeedback binarized): a stage
    that trains on pairs reads the pairs.
    """
    names = set(columns)
    if "messages" in names and (task == "messages" or not {"chosen", "rejected"} <= names):
        return "messages"
    if "conversations" in names:
        return "sharegpt"
    if {"instruction", "output"} <= names:
        return "alpaca"
    if "chosen" in names and isinstance(first.get("chosen"), str) and "Human:" in first["chosen"]:
        return "hh"
    if {"chosen", "rejected"} <= names:
        return "preference"
    if {"prompt", "completion", "label"} <= names:
        return "unpaired"
    if {"prompt", "completion"} <= names:
        return "prompt_completion"
    if "text" in names:
        return "text"
    if "prompt" in names:
        return "prompt"
    raise DataError(
        f"cannot tell the format of a dataset with columns {sorted(names)}; set `format` to one of "
        f"{', '.join(DATASET_FORMATS[1:])}"
    )


_ROLES = ("system", "user", "assistant", "tool")
# Converter format -> the fields a record of it needs (a field no record has is a recipe mistake).
_CONVERTER_FIELDS = {"alpaca": ["instruction", "output"], "sharegpt": ["conversations"], "hh": ["chosen"]}


def _check_turns(turns: list, column: str) -> None:
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise BadRecord("wrong_type", f"{column} turn {number} is not a mapping: {turn!r:.80}")
        if turn.get("role") not in _ROLES:
            role = f"role {turn['role']!r}" if turn.get("role") is not None else "no role"
            raise BadRecord("missing_role", f"{column} turn {number} has {role}; known: {', '.join(_ROLES)}")
        content = turn.get("content")
        if content is None and not turn.get("tool_calls"):
            raise BadRecord("missing_field", f"{column} turn {number} ({turn['role']}) has no content")
        if content is not None and not isinstance(content, str):
            raise BadRecord("wrong_type", f"{column} turn {number} ({turn['role']}) content is not text")
        if not (content or "").strip() and not turn.get("tool_calls"):
            raise BadRecord("empty_turn", f"{column} turn {number} ({turn['role']}) is empty")


def _check_value(value: Any, column: str) -> None:
    """A text or a conversation with text in every turn."""
    if column == "label":
        if not isinstance(value, bool):
            raise BadRecord("wrong_type", f"label is {value!r}, not true or false")
    elif isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty_turn", f"{column} is empty")
    elif isinstance(value, list):
        if not value:
            raise BadRecord("empty_turn", f"{column} has no turns")
        _check_turns(value, column)
    else:
        raise BadRecord("wrong_type", f"{column} is a {type(value).__name__}, not text or a list of turns")


def _check_pair(row: dict) -> None:
    """What a preference pair needs beyond valid turns: one dialogue, two different answers."""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadRecord("wrong_type", "chosen and rejected are not both texts or both conversations")
    # A conversational pair without a conversational prompt holds the dialogue in both answers
    # (UltraFeedback keeps a text copy of the prompt beside them).
    if _implicit_prompt(row):
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise BadRecord("no_reply", "chosen or rejected does not end with an assistant reply")
        if chosen[:-1] != rejected[:-1]:
            raise BadRecord("dialogues_differ", "chosen and rejected differ before their last turn")
        if len(chosen) < 2:
            raise BadRecord("missing_field", "no prompt: chosen and rejected are a single reply each")
        chosen, rejected = chosen[-1], rejected[-1]
    if chosen == rejected:
        raise BadRecord("same_answers", "chosen and rejected are the same answer")


def _implicit_prompt(row: dict) -> bool:
    """A conversational pair without a conversational prompt: the dialogue is in both answers."""
    return isinstance(row["chosen"], list) and not isinstance(row.get("prompt"), list)


def _split_prompt(row: dict) -> dict:
    """A conversational pair with the shared dialogue as its prompt (as from Anthropic HH), so that
    sources in either shape mix."""
    if not _implicit_prompt(row):
        return row
    return {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}


def check_record(row: dict, task: str) -> None:
    """Raise BadRecord if a converted record is of no use to the stage's task."""
    for column, value in row.items():
        _check_value(value, column)
    if task == "preference":
        _check_pair(row)
    messages = row.get("messages")
    if messages is not None and not any(turn["role"] == "assistant" for turn in messages):
        raise BadRecord("no_reply", "the conversation has no assistant turn")


@dataclass
class SourceReport:
    """What reading one source dropped, per reason: how many, where the first one is, and what it said."""

    source: str
    read: int = 0
    kept: int = 0
    dropped: dict[str, dict] = field(default_factory=dict)

    def add(self, reason: str, where: dict, problem: str, record: Any) -> None:
        if reason not in self.dropped:
            example = (
                record if isinstance(record, str) else json.dumps(record, ensure_ascii=False, default=str)
            )
            self.dropped[reason] = {"count": 0, **where, "problem": problem, "example": example[:200]}
        self.dropped[reason]["count"] += 1

    @property
    def fraction(self) -> float:
        return (self.read - self.kept) / self.read if self.read else 0.0

    def lines(self) -> list[str]:
        lines = []
        for reason, bad in sorted(self.dropped.items(), key=lambda item: -item[1]["count"]):
            where = (
                f"{bad['file']}:{bad['line']}" if "line" in bad else f"{bad['file']} record {bad['record']}"
            )
            lines.append(
                f"  - {reason} ({BAD_REASONS[reason]}): {bad['count']}, first at {where}: {bad['problem']}; "
                f"the record: {bad['example'][:120]}"
            )
        return lines

    def as_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "kept": self.kept, "dropped": self.dropped}


@dataclass
class _Plan:
    """How a source's records become the stage's: the format, the task they are checked as (KTO's pairs
    are checked as pairs, then unpaired) and, for formats TRL reads as they are, the columns kept."""

    fmt: str
    task: str
    keep: list[str] | None


def _plan(columns: list[str], first: dict, fmt: str, source: str, task: str) -> _Plan:
    """Raise DataError for a recipe-level mistake: a format the stage cannot train on, or a column no record has."""
    if fmt == "auto":
        fmt = detect_format(columns, first, task)
    pair_formats = [*_PASSTHROUGH_COLUMNS["preference"], *CONVERTERS["preference"]]
    check_task = "preference" if task == "unpaired" and fmt in pair_formats else task
    passthrough, converters = _PASSTHROUGH_COLUMNS[check_task], CONVERTERS[check_task]
    if fmt not in passthrough and fmt not in converters:
        accepted = [*passthrough, *converters, *(pair_formats if task == "unpaired" else [])]
        raise DataError(
            f"dataset {source!r} is in {fmt} format, but this stage trains on {_TASK_NEEDS[task]}; "
            f"set `format` to one of: {', '.join(accepted)}"
        )
    if fmt in passthrough:
        required, optional = passthrough[fmt]
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"dataset {source!r} (format {fmt}) lacks column(s) {missing}; it has {columns}")
        return _Plan(fmt, check_task, [*required, *(c for c in optional if c in columns)])
    needed = [*_CONVERTER_FIELDS[fmt], *(["rejected"] if check_task == "preference" else [])]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"dataset {source!r} is not in {fmt} format: missing field {missing[0]!r}; it has columns {columns}"
        )
    return _Plan(fmt, check_task, None)


def _convert_record(record: Any, plan: _Plan) -> dict:
    """One record in the stage's columns, or BadRecord."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, Mapping):  # `datasets.map` passes its rows as lazy mappings
        raise BadRecord("bad_json", f"a JSON {type(record).__name__}, not an object")
    if plan.keep is not None:
        absent = [c for c in plan.keep if record.get(c) is None]
        if absent:
            raise BadRecord("missing_field", f"no {absent[0]!r}")
        row = {c: record[c] for c in plan.keep}
    else:
        try:
            row = CONVERTERS[plan.task][plan.fmt](record)
        except KeyError as error:
            raise BadRecord("missing_field", f"no {error}") from None
        except (AttributeError, TypeError) as error:
            raise BadRecord("wrong_type", f"a field of the wrong type ({error})") from None
    check_record(row, plan.task)
    return _split_prompt(row) if plan.task == "preference" else row


def check_records(records, plan: _Plan, source: str, keep_rows: bool = True):
    """Convert (file, position, record) triples of one source, record by record: (kept, SourceReport).

    A record that cannot be used is dropped and counted in the report, with where the first of each
    reason is and what it looked like; a `BadRecord` in place of a record (a line that is not UTF-8 or
    JSON) is counted the same way. `kept` holds the converted records, or with `keep_rows=False` only
    their indices (to select them from a loaded dataset without holding them).
    """
    report, kept, kinds = SourceReport(source), [], {}
    for index, (file, where, record) in enumerate(records):
        report.read += 1
        try:
            row = _convert_record(record, plan)
            # Arrow keeps one type per column: the first record decides between text and conversation.
            for column, value in row.items():
                kind = kinds.setdefault(column, type(value))
                if type(value) is not kind:
                    raise BadRecord(
                        "wrong_type", f"{column} is a {type(value).__name__}, not {kind.__name__}"
                    )
        except BadRecord as bad:
            example = record if bad.line is None else bad.line
            report.add(bad.reason, {"file": file, **where}, str(bad), example)
            continue
        kept.append(row if keep_rows else index)
        report.kept += 1
    return kept, report


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
    plan = _plan(dataset.column_names, dataset[0], fmt, source, task)
    kept, report = check_records(_rows_of(dataset, source), plan, source, keep_rows=False)
    check_fraction(report, max_bad_fraction)
    _require_some(kept, report)
    if len(kept) < len(dataset):
        dataset = dataset.select(kept)
    if plan.keep is not None and not (plan.task == "preference" and _implicit_prompt(dataset[0])):
        converted = dataset.select_columns(plan.keep)
    else:
        converted = dataset.map(
            partial(_convert_record, plan=plan),
            remove_columns=dataset.column_names,
            desc=f"Converting {source} ({plan.fmt})",
        )
    return _unpaired_if_needed(converted, task), report


def convert(dataset, fmt: str, source: str, task: str = "messages"):
    """Convert a dataset to TRL's columns for the stage's task, keeping only those columns.

    Records of no use to the stage are dropped (see check_records); KTO's pair formats are unpaired.
    """
    return _convert_dataset(dataset, fmt, source, task, max_bad_fraction=1.0)[0]


def _require_some(kept: list, report: SourceReport) -> None:
    if not kept:
        raise DataError(f"dataset {report.source!r}: no record can be used\n" + "\n".join(report.lines()))


def _unpaired_if_needed(dataset, task: str):
    if task == "unpaired" and "label" not in dataset.column_names:
        return unpair_preferences(dataset)
    return dataset


# --- loading --------------------------------------------------------------------------------------


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
    plan = _plan(columns, dicts[0] if dicts else {}, source.format, source.path, task)
    rows, report = check_records(records, plan, source.path)
    check_fraction(report, max_bad_fraction)
    _require_some(rows, report)
    return _unpaired_if_needed(datasets.Dataset.from_list(rows), task), report


def check_fraction(report: SourceReport, max_bad_fraction: float) -> None:
    """Log what a source dropped; raise DataError when it is more than `max_bad_fraction` of it."""
    if not report.dropped:
        return
    dropped = report.read - report.kept
    summary = f"{report.source}: {dropped} of {report.read} records ({report.fraction:.1%}) cannot be used"
    if report.fraction > max_bad_fraction:
        raise TooManyBadRecords(
            f"{summary}, more than max_bad_record_fraction {max_bad_fraction} allows:\n"
            + "\n".join(report.lines())
            + "\nFix or remove these records, or raise `max_bad_record_fraction` in the recipe to drop them.",
            report,
        )
    logger.warning("%s; dropped them:\n%s", summary, "\n".join(report.lines()))


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


# The run's receiver of what the data loading dropped (see reporting_bad_records).
_bad_record_sink: ContextVar[Callable[[dict], None] | None] = ContextVar("bad_record_sink", default=None)


@contextmanager
def reporting_bad_records(sink: Callable[[dict], None]):
    """Within this block, load_train_eval hands `sink` what it dropped (the run record keeps it)."""
    token = _bad_record_sink.set(sink)
    try:
        yield
    finally:
        _bad_record_sink.reset(token)


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
        sink = _bad_record_sink.get()
        if sink is not None:
            sources = [{"split": split, **r.as_dict()} for split, listed in reports.items() for r in listed]
            rows = {split: len(dataset) for split, dataset in result.items()} if result is not None else {}
            sink({"max_fraction": fraction, "sources": sources, "rows": rows})


def check_lengths(trainer, bad_records: dict) -> None:
    """Add to `bad_records` (what load_train_eval reported) what the trainer dropped or truncated for
    max_length, per split, from its prepared datasets: `bad_records["too_long"]`.

    TRL drops the records it could learn nothing from (SFT: no loss token left after truncation; DPO and
    KTO: the prompt alone fills max_length; reward: a pair longer than max_length) and truncates the
    rest. Raises DataError, before training, when the drops are more than max_fraction of a split.
    """
    args = trainer.args
    max_length = getattr(args, "max_length", None)
    if max_length is None or getattr(args, "packing", False):
        return
    rows, max_bad_fraction = bad_records["rows"], bad_records["max_fraction"]
    report = bad_records["too_long"] = {}
    for split, dataset in (("train", trainer.train_dataset), ("test", trainer.eval_dataset)):
        if split not in rows or not hasattr(dataset, "column_names"):
            continue
        dropped = rows[split] - len(dataset)
        answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in dataset.column_names]
        counts = {"records": rows[split], "dropped_too_long": dropped}
        if "prompt_ids" in dataset.column_names and answers:  # the collator truncates prompt + answer
            lengths = zip(*(dataset[c] for c in ["prompt_ids", *answers]), strict=True)
            counts["truncated"] = sum(
                len(prompt) + max(map(len, rest)) > max_length for prompt, *rest in lengths
            )
        elif "input_ids" in dataset.column_names:
            # SFT truncated them when it tokenized: those it cut are among those that now fill max_length.
            counts["at_max_length"] = sum(len(ids) >= max_length for ids in dataset["input_ids"])
        report[split] = counts
        if dropped:
            share = dropped / rows[split]
            message = (
                f"{split}: the trainer drops {dropped} of {rows[split]} records ({share:.1%}) as too long for "
                f"max_length {max_length}"
            )
            if share > max_bad_fraction:
                raise DataError(
                    f"{message}, more than max_bad_record_fraction {max_bad_fraction} allows. Raise max_length, "
                    "shorten or remove those records, or raise `max_bad_record_fraction`."
                )
            logger.warning(message)
        if counts.get("truncated"):
            logger.info(
                "%s: %d records are truncated to max_length %d", split, counts["truncated"], max_length
            )
        if counts.get("at_max_length"):
            logger.info(
                "%s: %d records fill max_length %d (truncated, or exactly that long)",
                split,
                counts["at_max_length"],
                max_length,
            )


def fingerprints(dataset_dict) -> dict[str, str]:
    """The `datasets` fingerprint of every split: what the run record calls the data it trained on."""
    return {split: dataset._fingerprint for split, dataset in dataset_dict.items()}
