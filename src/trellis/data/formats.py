"""Record formats: converters of common formats to TRL's columns (Alpaca, ShareGPT, Anthropic HH, preference
pairs, unpaired), format detection, and the record-by-record check of a source against the stage's task."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from trellis.data.arguments import DATASET_FORMATS
from trellis.data.bad_records import BadRecord, DataError, SourceReport

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
    "prompts": {"prompt": (["prompt"], ["answer"])},  # a right answer, for the generate stage's checker
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
    if implicit_prompt(row):
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise BadRecord("no_reply", "chosen or rejected does not end with an assistant reply")
        if chosen[:-1] != rejected[:-1]:
            raise BadRecord("dialogues_differ", "chosen and rejected differ before their last turn")
        if len(chosen) < 2:
            raise BadRecord("missing_field", "no prompt: chosen and rejected are a single reply each")
        chosen, rejected = chosen[-1], rejected[-1]
    if chosen == rejected:
        raise BadRecord("same_answers", "chosen and rejected are the same answer")


def implicit_prompt(row: dict) -> bool:
    """A conversational pair without a conversational prompt: the dialogue is in both answers."""
    return isinstance(row["chosen"], list) and not isinstance(row.get("prompt"), list)


def _split_prompt(row: dict) -> dict:
    """A conversational pair with the shared dialogue as its prompt (as from Anthropic HH), so that
    sources in either shape mix."""
    if not implicit_prompt(row):
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
class ConversionPlan:
    """How a source's records become the stage's: the format, the task they are checked as (KTO's pairs
    are checked as pairs, then unpaired) and, for formats TRL reads as they are, the columns kept."""

    fmt: str
    task: str
    keep: list[str] | None


def plan_conversion(columns: list[str], first: dict, fmt: str, source: str, task: str) -> ConversionPlan:
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
        return ConversionPlan(fmt, check_task, [*required, *(c for c in optional if c in columns)])
    needed = [*_CONVERTER_FIELDS[fmt], *(["rejected"] if check_task == "preference" else [])]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"dataset {source!r} is not in {fmt} format: missing field {missing[0]!r}; it has columns {columns}"
        )
    return ConversionPlan(fmt, check_task, None)


def convert_record(record: Any, plan: ConversionPlan) -> dict:
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


def check_records(records, plan: ConversionPlan, source: str, keep_rows: bool = True):
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
            row = convert_record(record, plan)
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
