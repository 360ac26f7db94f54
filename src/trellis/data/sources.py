"""Datasets: load Hub or local sources, convert common formats to TRL's, mix them by weight, hold out a test split.

What a record becomes depends on what the stage trains on (its `task`):
- "messages" (SFT): TRL's `messages` column (a list of {role, content}), from Alpaca, ShareGPT and
  Anthropic HH transcripts (the chosen one), or TRL's prompt/completion and text columns as they are;
- "preference" (reward, DPO): TRL's `prompt` (optional: an implicit prompt is part of both answers),
  `chosen` and `rejected` columns, from TRL's preference format or Anthropic HH transcript pairs;
- "unpaired" (KTO): TRL's unpaired `prompt`, `completion` and `label` columns, as they are or from
  preference pairs (in any format the "preference" task reads): chosen -> True, rejected -> False;
- "prompts" (PPO, GRPO, RLOO): a `prompt` column only.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

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


class DataError(TrellisError):
    """A dataset could not be read or converted."""


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
        speaker = str(turn["from"]).lower()
        if speaker not in _SHAREGPT_ROLES:
            raise DataError(
                f"ShareGPT turn has an unknown speaker {turn['from']!r}; known: "
                f"{', '.join(sorted(_SHAREGPT_ROLES))}"
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
        raise DataError(
            f"not an HH transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...'): {text[:80]!r}"
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
    if (
        chosen[-1]["role"] != "assistant"
        or rejected[-1]["role"] != "assistant"
        or chosen[:-1] != rejected[:-1]
    ):
        raise DataError(
            "an HH pair must be one dialogue with two different last Assistant replies; got "
            f"chosen {example['chosen'][:80]!r} and rejected {example['rejected'][:80]!r}"
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


def detect_format(columns: list[str], first: dict) -> str:
    """Guess the record format from the column names (and one record)."""
    names = set(columns)
    if "messages" in names:
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


def convert(dataset, fmt: str, source: str, task: str = "messages"):
    """Convert a dataset to TRL's columns for the stage's task, keeping only those columns."""
    if len(dataset) == 0:
        raise DataError(f"dataset {source!r} is empty")
    if fmt == "auto":
        fmt = detect_format(dataset.column_names, dataset[0])
    passthrough, converters = _PASSTHROUGH_COLUMNS[task], CONVERTERS[task]
    pair_formats = [*_PASSTHROUGH_COLUMNS["preference"], *CONVERTERS["preference"]]
    if task == "unpaired" and fmt in pair_formats:
        return unpair_preferences(convert(dataset, fmt, source, "preference"))
    if fmt not in passthrough and fmt not in converters:
        accepted = [*passthrough, *converters, *(pair_formats if task == "unpaired" else [])]
        raise DataError(
            f"dataset {source!r} is in {fmt} format, but this stage trains on {_TASK_NEEDS[task]}; "
            f"set `format` to one of: {', '.join(accepted)}"
        )
    if fmt in passthrough:
        required, optional = passthrough[fmt]
        missing = [c for c in required if c not in dataset.column_names]
        if missing:
            raise DataError(
                f"dataset {source!r} (format {fmt}) lacks column(s) {missing}; it has {dataset.column_names}"
            )
        return dataset.select_columns([*required, *(c for c in optional if c in dataset.column_names)])
    try:
        return dataset.map(
            converters[fmt], remove_columns=dataset.column_names, desc=f"Converting {source} ({fmt})"
        )
    except KeyError as error:
        raise DataError(
            f"dataset {source!r} is not in {fmt} format: missing field {error}; it has columns "
            f"{dataset.column_names}"
        ) from None


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


def load_mixture(sources: list[DatasetSource], seed: int, task: str = "messages"):
    """Load, convert (for the stage's task) and weight every source, then concatenate them into one dataset."""
    import datasets

    parts = []
    for source in sources:
        logger.info("Loading dataset %s (split %s, weight %s)", source.path, source.split, source.weight)
        dataset = convert(load_source(source), source.format, source.path, task)
        parts.append(apply_weight(dataset, source.weight, seed))
    columns = {tuple(sorted(part.column_names)) for part in parts}
    if len(columns) > 1:
        raise DataError(f"the sources of a mixture must share one format; got column sets {sorted(columns)}")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_train_eval(script_args: ScriptArguments, seed: int, task: str = "messages"):
    """The stage's data: a `DatasetDict` with `train` and, if the recipe has held-out data, `test`.

    `task` is what the stage trains on: "messages" (SFT), "preference" (reward, DPO, ORPO), "unpaired"
    (KTO) or "prompts" (PPO, GRPO, RLOO).
    """
    import datasets

    train = load_mixture(script_args.datasets, seed, task)
    if script_args.eval_datasets:
        return datasets.DatasetDict(train=train, test=load_mixture(script_args.eval_datasets, seed, task))
    if script_args.test_split_size:
        size = script_args.test_split_size
        return train.train_test_split(test_size=int(size) if size >= 1 else size, seed=seed)
    return datasets.DatasetDict(train=train)


def fingerprints(dataset_dict) -> dict[str, str]:
    """The `datasets` fingerprint of every split: what the run record calls the data it trained on."""
    return {split: dataset._fingerprint for split, dataset in dataset_dict.items()}
