"""Recipes: a YAML file plus command-line overrides, parsed strictly into typed dataclasses.

Every stage script calls `parse_recipe(stage)`. Before any model or dataset is loaded it rejects
unknown keys (with the closest valid key), values of the wrong type, missing required keys and local
paths that do not exist, naming the file, the line and the key. The dataclasses are TRL's: the
stage's TRL config (e.g. SFTConfig), TRL's ModelConfig extended by `ModelArguments`, and Trellis's
`ScriptArguments` for the data.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import glob
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trellis.errors import TrellisError

DATASET_FORMATS = ("auto", "messages", "alpaca", "sharegpt", "hh", "prompt_completion", "text")


class RecipeError(TrellisError):
    """The recipe (YAML file or command line) is invalid."""


@dataclass
class DatasetSource:
    """One source of a dataset mixture: a Hub dataset, a local directory or local files."""

    path: str = field(
        metadata={
            "help": "Hub dataset id, a local dataset directory, or local file(s) (json, jsonl, parquet, "
            "csv, txt; compressed too; globs allowed)."
        }
    )
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Split to read (ignored for local files)."})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    weight: float = field(
        default=1.0,
        metadata={"help": "Share of this source to use: 0.5 takes a seeded half, 2.0 repeats it twice."},
    )
    format: str = field(
        default="auto",
        metadata={"help": "Record format, converted to TRL's `messages`.", "choices": list(DATASET_FORMATS)},
    )
    text_field: str | None = field(
        default=None,
        metadata={"help": "Data stage: the column holding the raw text (default: `text`)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Data stage: stream a Hub dataset instead of downloading it whole; only the text "
            "column is kept (with `max_documents`, only that many records are read)."
        },
    )
    max_documents: int | None = field(
        default=None, metadata={"help": "Data stage: read at most this many records of the source."}
    )


@dataclass
class ScriptArguments:
    """Data for a stage: a weighted mixture of sources, and held-out evaluation data."""

    datasets: list[dict] = field(
        default_factory=list,
        metadata={"help": "Training sources, each a mapping with the keys of DatasetSource."},
    )
    eval_datasets: list[dict] = field(
        default_factory=list,
        metadata={"help": "Held-out evaluation sources (same keys as `datasets`)."},
    )
    test_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Without eval_datasets: hold out this fraction (or count) of the training mixture."
        },
    )
    eval_before_training: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the untrained model first, so the run record shows what training changed."
        },
    )

    def __post_init__(self) -> None:
        self.datasets = [_as_source(item) for item in self.datasets]
        self.eval_datasets = [_as_source(item) for item in self.eval_datasets]


UNICODE_FORMS = ("NFC", "NFKC", "none")


def _help(text: str, **extra: Any) -> dict:
    return {"help": text, **extra}


@dataclass
class DataArguments:
    """The data stage: sources, cleaning, filters (each off with `false`/null), dedup, decontamination,
    tokenizer, packing. Every threshold is a key of the recipe."""

    output_dir: str = field(metadata=_help("Where the packed dataset, tokenizer and report are written."))
    datasets: list[dict] = field(
        default_factory=list,
        metadata=_help("Raw text sources (keys of DatasetSource; `text_field` names the text column)."),
    )
    decontamination_datasets: list[dict] = field(
        default_factory=list,
        metadata=_help("Evaluation sets: training documents sharing a long n-gram with them are dropped."),
    )
    seed: int = field(
        default=0, metadata=_help("Seed for mixture weights, shuffling and the held-out split.")
    )
    num_proc: int | None = field(
        default=None, metadata=_help("Worker processes for datasets.map (default: all CPU cores).")
    )
    # cleaning (transforms)
    unicode_normalization: str = field(
        default="NFC", metadata=_help("Unicode normal form.", choices=list(UNICODE_FORMS))
    )
    fix_encoding: bool = field(default=True, metadata=_help("Repair UTF-8 text decoded as cp1252/latin-1."))
    normalize_whitespace: bool = field(
        default=True, metadata=_help("Collapse runs of spaces and blank lines.")
    )
    remove_boilerplate_lines: bool = field(
        default=False, metadata=_help("Drop lines matching `boilerplate_patterns`.")
    )
    boilerplate_patterns: list[str] = field(
        default_factory=lambda: [
            r"\bcookie(s| policy)\b",
            r"\ball rights reserved\b",
            r"\b(privacy policy|terms of (use|service))\b",
            r"\bclick here\b",
            r"\b(subscribe|sign up) (to|for) (our|the) newsletter\b",
            r"\benable javascript\b",
        ],
        metadata=_help("Regular expressions (Python, case-insensitive) of boilerplate lines."),
    )
    redact_pii: bool = field(
        default=True, metadata=_help("Replace emails, phone numbers and IP addresses with placeholders.")
    )
    # length filters
    min_chars: int | None = field(default=50, metadata=_help("Drop shorter documents (null: off)."))
    max_chars: int | None = field(default=None, metadata=_help("Drop longer documents (null: off)."))
    min_words: int | None = field(default=None, metadata=_help("Drop documents with fewer words."))
    max_words: int | None = field(default=None, metadata=_help("Drop documents with more words."))
    # Gopher quality rules (Rae et al. 2021); each threshold null turns that rule off
    gopher_quality: bool = field(default=True, metadata=_help("Apply the Gopher quality rules below."))
    max_symbol_word_ratio: float | None = field(default=0.1, metadata=_help("'#' and '...' per word."))
    min_mean_word_length: float | None = field(default=3.0, metadata=_help("Mean word length, lower bound."))
    max_mean_word_length: float | None = field(default=10.0, metadata=_help("Mean word length, upper bound."))
    min_alpha_word_fraction: float | None = field(
        default=0.8, metadata=_help("Fraction of words with a letter.")
    )
    max_bullet_line_fraction: float | None = field(
        default=0.9, metadata=_help("Lines starting with a bullet.")
    )
    max_ellipsis_line_fraction: float | None = field(default=0.3, metadata=_help("Lines ending in '...'."))
    min_punctuation_line_fraction: float | None = field(
        default=None, metadata=_help("Lines ending in . ! ? or a closing quote (C4-style; null: off).")
    )
    min_stop_words: int | None = field(
        default=2, metadata=_help("English stop words (the, be, to, of, and, that, have, with) needed.")
    )
    # repetition (Gopher)
    repetition_filter: bool = field(default=True, metadata=_help("Apply the repetition rules below."))
    max_duplicate_line_fraction: float | None = field(default=0.3, metadata=_help("Repeated lines."))
    max_duplicate_paragraph_fraction: float | None = field(
        default=0.3, metadata=_help("Repeated paragraphs.")
    )
    max_top_ngram_fraction: dict = field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        metadata=_help("n -> max share of characters in the most frequent word n-gram."),
    )
    max_duplicate_ngram_fraction: dict = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        metadata=_help("n -> max share of characters in word n-grams that occur more than once."),
    )
    # harmful content
    blocklist_filter: bool = field(default=True, metadata=_help("Drop documents with blocklisted words."))
    blocklist_file: str | None = field(
        default=None, metadata=_help("One word or phrase per line (default: Trellis's shipped list).")
    )
    max_blocklist_hits: int = field(default=0, metadata=_help("Blocklist matches a document may have."))
    # deduplication
    exact_dedup: bool = field(default=True, metadata=_help("Drop documents whose normalised text repeats."))
    near_dedup: bool = field(default=True, metadata=_help("MinHash + LSH near-duplicate removal."))
    minhash_ngram: int = field(default=5, metadata=_help("Word n-gram size of the shingles."))
    minhash_num_perm: int = field(default=128, metadata=_help("Hash functions in a signature."))
    minhash_bands: int = field(default=32, metadata=_help("LSH bands (bands x rows = num_perm)."))
    minhash_rows: int = field(default=4, metadata=_help("Signature rows per LSH band."))
    minhash_threshold: float = field(
        default=0.7, metadata=_help("Shingle Jaccard similarity at which two documents are duplicates.")
    )
    # decontamination
    decontamination_ngram: int = field(default=13, metadata=_help("Word n-gram length of a leak."))
    # tokenizer
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata=_help("Use this tokenizer (Hub id or local dir); unset: train a BPE tokenizer."),
    )
    tokenizer_vocab_size: int = field(
        default=32000, metadata=_help("Vocabulary size of a trained tokenizer.")
    )
    tokenizer_special_tokens: list[str] = field(
        default_factory=list, metadata=_help("Extra special tokens of a trained tokenizer.")
    )
    tokenizer_train_documents: int | None = field(
        default=None, metadata=_help("Train the tokenizer on at most this many documents.")
    )
    # packing
    block_size: int = field(default=2048, metadata=_help("Tokens per packed block."))
    validation_fraction: float = field(
        default=0.01, metadata=_help("Documents held out for validation: a fraction, or a count if >= 1.")
    )
    report_examples: int = field(default=3, metadata=_help("Removed documents shown per filter."))

    def __post_init__(self) -> None:
        self.datasets = [_as_source(item) for item in self.datasets]
        self.decontamination_datasets = [_as_source(item) for item in self.decontamination_datasets]


# Keys whose value is a list of mappings, checked key by key against a dataclass.
LIST_OF_MAPPINGS: dict[str, type] = {
    "datasets": DatasetSource,
    "eval_datasets": DatasetSource,
    "decontamination_datasets": DatasetSource,
}


def _as_source(item: dict | DatasetSource) -> DatasetSource:
    return item if isinstance(item, DatasetSource) else DatasetSource(**item)


def _model_config_class() -> type:
    from trl import ModelConfig

    @dataclass
    class ModelArguments(ModelConfig):
        """TRL's ModelConfig plus what Trellis needs to build, template and save a model."""

        model_config: dict | str | None = field(
            default=None,
            metadata={
                "help": "Create the model from scratch from this config: a path to a config.json or an "
                "inline mapping (with `model_type`). Replaces model_name_or_path."
            },
        )
        tokenizer_name_or_path: str | None = field(
            default=None, metadata={"help": "Tokenizer to use, if not the one stored with the model."}
        )
        chat_template: str | None = field(
            default=None,
            metadata={
                "help": "Chat template: 'chatml', a path to a .jinja file, or the template text. Unset: the "
                "tokenizer's own, else ChatML."
            },
        )
        merge_adapters: bool = field(
            default=False,
            metadata={
                "help": "With LoRA/QLoRA: merge the adapters into the base weights in the final model."
            },
        )

    ModelArguments.__module__ = __name__
    ModelArguments.__qualname__ = "ModelArguments"
    return ModelArguments


def _sft_types() -> tuple[type, ...]:
    from trl import SFTConfig

    return ScriptArguments, SFTConfig, _model_config_class()


# Stage name -> the dataclasses its recipe fills, in the order parse_recipe returns them.
STAGES: dict[str, Callable[[], tuple[type, ...]]] = {
    "data": lambda: (DataArguments,),
    "sft": _sft_types,
}


def stage_types(stage: str) -> tuple[type, ...]:
    if stage not in STAGES:
        raise RecipeError(
            f"unknown stage {stage!r}{_did_you_mean(stage, STAGES)}; stages: {', '.join(STAGES)}"
        )
    return STAGES[stage]()


def parse_recipe(stage: str, args: list[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config FILE.yaml` plus `--key value` overrides into the stage's dataclasses."""
    args = list(sys.argv[1:] if args is None else args)
    config_path, cli_args = _pop_config_arg(args)
    dataclass_types = stage_types(stage)
    where = config_path or "command line"

    recipe, lines = load_recipe_file(config_path) if config_path else ({}, {})
    _apply_env(recipe.pop("env", None), where)
    recipe, problems = check_recipe(recipe, dataclass_types, lines)
    if problems:
        raise RecipeError(_format_problems(where, problems))

    from trl import TrlParser

    class _Parser(TrlParser):
        def error(self, message: str) -> typing.NoReturn:  # argparse would print a 200-option usage text
            raise RecipeError(f"{where}: {message}")

    parser = _Parser(dataclass_types)
    parser.set_defaults_with_config(**recipe)
    # TRL's configs default the deprecated `gradient_checkpointing` alias to True, so transformers
    # warns on every run whatever the recipe says; the recipe's `activation_checkpointing` decides.
    warnings.filterwarnings(
        "ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning
    )
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=cli_args, return_remaining_strings=True)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{where}: {error}") from None
    if unknown:
        names = _field_names(dataclass_types)
        flags = [arg for arg in unknown if arg.startswith("--")] or unknown
        raise RecipeError(
            "unknown command-line argument(s): "
            + "; ".join(f"{flag}{_did_you_mean(flag.lstrip('-').split('=')[0], names)}" for flag in flags)
        )
    problems = check_semantics(parsed)
    if problems:
        raise RecipeError(_format_problems(where, problems))
    return tuple(parsed)


def validate_recipe_file(path: str, stage: str | None = None) -> str:
    """Parse a stage recipe exactly as its script would, without training. Returns the stage name."""
    import torch

    stage = stage or stage_of_recipe(path)
    # A GPU recipe (bf16) must validate on a machine without one, so validation runs it as if on CPU.
    trains = "use_cpu" in _field_names(stage_types(stage))  # the data stage has no device
    on_cpu = ["--use_cpu", "true"] if trains and not torch.cuda.is_available() else []
    parse_recipe(stage, ["--config", path, *on_cpu])
    return stage


def stage_of_recipe(path: str) -> str:
    """The stage a recipe file is for, from its name: sft.yaml, sft_lora.yaml, sft-qlora.yaml -> sft."""
    stem = Path(path).stem.replace("-", "_").split("_")[0]
    if stem not in STAGES:
        raise RecipeError(
            f"{path}: cannot tell the stage from the file name; name it <stage>[_variant].yaml or pass "
            f"--stage (one of: {', '.join(STAGES)})"
        )
    return stem


# --- the YAML file -------------------------------------------------------------------------------


def load_recipe_file(path: str) -> tuple[dict, dict[tuple, int]]:
    """Read a recipe; return its mapping and the line number of every key (by key path)."""
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    text = Path(path).read_text(encoding="utf-8")
    try:
        recipe = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if recipe is None:
        return {}, {}
    if not isinstance(recipe, dict):
        raise RecipeError(
            f"{path}: a recipe must be a mapping of keys to values, got {type(recipe).__name__}"
        )
    lines: dict[tuple, int] = {}
    _collect_key_lines(root, (), lines)
    return recipe, lines


def _collect_key_lines(node: yaml.Node, prefix: tuple, lines: dict[tuple, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _collect_key_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_key_lines(item, (*prefix, index), lines)


def _apply_env(env: Any, where: str) -> None:
    """TRL recipes may set environment variables under `env:`."""
    if env is None:
        return
    if not isinstance(env, dict):
        raise RecipeError(f"{where}: key 'env' must be a mapping of variable names to values")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


def _pop_config_arg(args: list[str]) -> tuple[str | None, list[str]]:
    rest, config = [], None
    iterator = iter(args)
    for arg in iterator:
        if arg == "--config":
            config = next(iterator, None)
            if config is None:
                raise RecipeError("--config needs a path to a recipe YAML file")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config, rest


# --- key and type checks ---------------------------------------------------------------------------


@dataclass
class Problem:
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.key}: {self.message}"


def _format_problems(where: str, problems: list[Problem]) -> str:
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems)


def _field_names(dataclass_types: tuple[type, ...]) -> list[str]:
    return [f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init]


def _did_you_mean(word: str, candidates) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _fields_with_hints(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: check only what is resolvable
        hints = {}
    return {f.name: (f, hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}


def check_recipe(
    recipe: dict, dataclass_types: tuple[type, ...], lines: dict[tuple, int] | None = None
) -> tuple[dict, list[Problem]]:
    """Check every key and value of a recipe; return it with values coerced (e.g. '2e-5' -> 2e-05)."""
    lines = lines or {}
    known: dict[str, tuple[dataclasses.Field, Any]] = {}
    for cls in dataclass_types:
        known.update(_fields_with_hints(cls))
    checked, problems = {}, []
    for key, value in recipe.items():
        key = str(key)
        line = lines.get((key,))
        if key not in known:
            problems.append(Problem(key, f"unknown key{_did_you_mean(key, known)}", line))
            continue
        spec, hint = known[key]
        item_type = LIST_OF_MAPPINGS.get(key)
        if item_type is not None:
            value, item_problems = _check_items(key, value, item_type, lines)
            problems += item_problems
        else:
            error = _check_value(value, hint, spec)
            if isinstance(error, str):
                problems.append(Problem(key, error, line))
                continue
            value = error.value
        checked[key] = value
    return checked, problems


def _check_items(key: str, value: Any, item_type: type, lines: dict) -> tuple[list, list[Problem]]:
    """Check a list of mappings (e.g. dataset sources) against the keys of `item_type`."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        example = ", ".join(f.name for f in dataclasses.fields(item_type))
        return value, [
            Problem(key, f"expected a list of mappings with keys among: {example}", lines.get((key,)))
        ]
    fields = _fields_with_hints(item_type)
    required = [f.name for f, _ in fields.values() if f.default is dataclasses.MISSING]
    problems, items = [], []
    for index, item in enumerate(value):
        checked = {}
        for name, item_value in item.items():
            where = f"{key}[{index}].{name}"
            line = lines.get((key, index, name))
            if name not in fields:
                problems.append(Problem(where, f"unknown key{_did_you_mean(str(name), fields)}", line))
                continue
            spec, hint = fields[name]
            result = _check_value(item_value, hint, spec)
            if isinstance(result, str):
                problems.append(Problem(where, result, line))
            else:
                checked[name] = result.value
        for name in required:
            if name not in item:
                problems.append(
                    Problem(f"{key}[{index}]", f"missing required key {name!r}", lines.get((key, index)))
                )
        items.append(checked)
    return items, problems


@dataclass
class _Ok:
    value: Any


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "dict": "a mapping",
            "list": "a list",
        }.get(hint.__name__, hint.__name__)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return str(hint)


def _check_value(value: Any, hint: Any, spec: dataclasses.Field | None = None) -> _Ok | str:
    """Return _Ok(coerced value) if `value` fits the type hint, else a message saying what was expected."""
    choices = spec.metadata.get("choices") if spec is not None else None
    if choices and value is not None and value not in choices:
        return f"got {value!r}, expected one of: {', '.join(map(str, choices))}{_did_you_mean(str(value), map(str, choices))}"
    result = _fit(value, hint)
    if result is None:
        return f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}"
    return result


def _fit(value: Any, hint: Any) -> _Ok | str | None:
    """_Ok(value) if it fits, a message for a bad enum choice, None for a type mismatch."""
    if hint is Any or hint is object or isinstance(hint, (str, typing.TypeVar)):
        return _Ok(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        enum_types = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enum_types and isinstance(value, str):  # e.g. lr_scheduler_type: Union[SchedulerType, str]
            allowed = [member.value for member in enum_types[0]]
            if value not in allowed:
                return (
                    f"got {value!r}, expected one of: {', '.join(map(str, allowed))}"
                    f"{_did_you_mean(value, map(str, allowed))}"
                )
            return _Ok(value)
        for arg in args:
            result = _fit(value, arg)
            if result is not None:
                return result
        return None
    if hint is type(None):
        return _Ok(None) if value is None else None
    if origin is typing.Literal:
        return (
            _Ok(value) if value in args else f"got {value!r}, expected one of: {', '.join(map(repr, args))}"
        )
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [member.value for member in hint]
        if value in allowed or isinstance(value, hint):
            return _Ok(value)
        return f"got {value!r}, expected one of: {', '.join(map(str, allowed))}{_did_you_mean(str(value), map(str, allowed))}"
    if hint is bool:
        return _Ok(value) if isinstance(value, bool) else None
    if hint is int:
        return _Ok(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _Ok(float(value))
        if isinstance(value, str):  # YAML 1.1 reads `2e-5` (no dot) as a string
            try:
                return _Ok(float(value))
            except ValueError:
                return None
        return None
    if hint is str:
        if isinstance(value, str):
            return _Ok(value)
        return _Ok(str(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if hint is dict or origin is dict:
        return _Ok(value) if isinstance(value, dict) else None
    if hint is list or origin in (list, tuple):
        item_hint = args[0] if args else Any
        if isinstance(value, str) and item_hint is str:  # e.g. lora_target_modules: all-linear
            return _Ok(value)
        if not isinstance(value, list):
            return None
        items = []
        for item in value:
            result = _fit(item, item_hint)
            if not isinstance(result, _Ok):
                return result
            items.append(result.value)
        return _Ok(items)
    return _Ok(value)  # a type we do not model: the library validates it


# --- checks across keys, and local paths -------------------------------------------------------------

_LOCAL_SUFFIXES = (
    ".json",
    ".jsonl",
    ".parquet",
    ".csv",
    ".txt",
    ".arrow",
    ".gz",
    ".zst",
    ".bz2",
    ".xz",
    ".jinja",
    ".j2",
    ".yaml",
    ".yml",
)


def looks_like_local_path(value: str) -> bool:
    """True if `value` can only be a local path (a Hub id is `name` or `org/name`)."""
    return (
        value.startswith(("/", "./", "../", "~", "."))
        or value.count("/") > 1
        or "\\" in value
        or value.endswith(_LOCAL_SUFFIXES)
        or any(ch in value for ch in "*?[")
    )


def local_path_problem(value: str, what: str) -> str | None:
    """A message if `value` is meant as a local path that does not exist; None if it exists or is a Hub id."""
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return None
    if any(ch in value for ch in "*?[") and glob.glob(expanded):
        return None
    if looks_like_local_path(value):
        return f"no such local {what}: {value!r} (relative paths are resolved from {os.getcwd()})"
    return None


def check_semantics(parsed: list[Any]) -> list[Problem]:
    """Checks across keys, and that every local path in the recipe exists."""
    problems: list[Problem] = []
    script = next((obj for obj in parsed if isinstance(obj, ScriptArguments)), None)
    model = next((obj for obj in parsed if hasattr(obj, "model_name_or_path")), None)
    training = next((obj for obj in parsed if hasattr(obj, "output_dir")), None)

    if model is not None:
        if bool(model.model_name_or_path) == bool(model.model_config):
            problems.append(
                Problem(
                    "model_name_or_path",
                    "set exactly one of 'model_name_or_path' (a Hub id or "
                    "local model directory) or 'model_config' (to train from scratch)",
                )
            )
        if model.model_name_or_path and (
            message := local_path_problem(model.model_name_or_path, "model directory")
        ):
            problems.append(Problem("model_name_or_path", message))
        if isinstance(model.model_config, str) and not os.path.isfile(os.path.expanduser(model.model_config)):
            problems.append(Problem("model_config", f"no such config file: {model.model_config!r}"))
        if model.model_config and not model.tokenizer_name_or_path:
            problems.append(
                Problem(
                    "tokenizer_name_or_path",
                    "a model built from 'model_config' needs a tokenizer: set 'tokenizer_name_or_path'",
                )
            )
        if model.tokenizer_name_or_path and (
            message := local_path_problem(model.tokenizer_name_or_path, "tokenizer directory")
        ):
            problems.append(Problem("tokenizer_name_or_path", message))
        template = model.chat_template
        if (
            template
            and template.endswith((".jinja", ".j2"))
            and not os.path.isfile(os.path.expanduser(template))
        ):
            problems.append(Problem("chat_template", f"no such template file: {template!r}"))
        if model.model_config and model.use_peft:
            problems.append(
                Problem(
                    "use_peft",
                    "LoRA adapters need pretrained base weights: set "
                    "'model_name_or_path' instead of 'model_config'",
                )
            )
        if (model.load_in_4bit or model.load_in_8bit) and not model.use_peft:
            problems.append(
                Problem(
                    "load_in_4bit" if model.load_in_4bit else "load_in_8bit",
                    "quantized base weights cannot be trained directly: set 'use_peft: true' (QLoRA)",
                )
            )
        if model.load_in_4bit and model.load_in_8bit:
            problems.append(Problem("load_in_4bit", "choose one of 'load_in_4bit' and 'load_in_8bit'"))
        if model.merge_adapters and not model.use_peft:
            problems.append(Problem("merge_adapters", "only applies with 'use_peft: true'"))

    if script is not None:
        if not script.datasets:
            problems.append(
                Problem(
                    "datasets",
                    "required: list the training data, e.g.\n"
                    "      datasets:\n        - path: data/train.jsonl",
                )
            )
        for key in ("datasets", "eval_datasets"):
            for index, source in enumerate(getattr(script, key)):
                if message := local_path_problem(source.path, "dataset file or directory"):
                    problems.append(Problem(f"{key}[{index}].path", message))
                if source.weight <= 0:
                    problems.append(Problem(f"{key}[{index}].weight", f"must be > 0, got {source.weight}"))
        has_eval = bool(script.eval_datasets) or bool(script.test_split_size)
        if (
            training is not None
            and str(getattr(training.eval_strategy, "value", training.eval_strategy)) != "no"
            and not has_eval
        ):
            problems.append(
                Problem(
                    "eval_strategy",
                    "evaluation is on but the recipe has no held-out data: set "
                    "'eval_datasets' or 'test_split_size' (or eval_strategy: 'no')",
                )
            )

    data = next((obj for obj in parsed if isinstance(obj, DataArguments)), None)
    if data is not None:
        problems += _data_problems(data)

    if training is not None:
        path = getattr(training, "chat_template_path", None)
        if path and (message := local_path_problem(path, "chat template")):
            problems.append(Problem("chat_template_path", message))
    return problems


def _source_problems(key: str, sources: list[DatasetSource]) -> list[Problem]:
    problems = []
    for index, source in enumerate(sources):
        if message := local_path_problem(source.path, "dataset file or directory"):
            problems.append(Problem(f"{key}[{index}].path", message))
        if source.weight <= 0:
            problems.append(Problem(f"{key}[{index}].weight", f"must be > 0, got {source.weight}"))
    return problems


def _data_problems(data: DataArguments) -> list[Problem]:
    problems = []
    if not data.datasets:
        problems.append(
            Problem(
                "datasets",
                "required: list the raw text, e.g.\n      datasets:\n        - path: corpus/*.jsonl",
            )
        )
    problems += _source_problems("datasets", data.datasets)
    problems += _source_problems("decontamination_datasets", data.decontamination_datasets)
    if data.minhash_bands * data.minhash_rows != data.minhash_num_perm:
        problems.append(
            Problem(
                "minhash_bands",
                f"minhash_bands x minhash_rows must equal minhash_num_perm: {data.minhash_bands} x "
                f"{data.minhash_rows} != {data.minhash_num_perm}",
            )
        )
    if not 0 < data.minhash_threshold <= 1:
        problems.append(Problem("minhash_threshold", f"must be in (0, 1], got {data.minhash_threshold}"))
    if data.block_size < 2:
        problems.append(Problem("block_size", f"must be at least 2, got {data.block_size}"))
    if data.validation_fraction <= 0:
        problems.append(
            Problem("validation_fraction", "must be > 0: the pretraining stage needs held-out data")
        )
    if data.tokenizer_name_or_path and (
        message := local_path_problem(data.tokenizer_name_or_path, "tokenizer directory")
    ):
        problems.append(Problem("tokenizer_name_or_path", message))
    if data.blocklist_file and not os.path.isfile(os.path.expanduser(data.blocklist_file)):
        problems.append(Problem("blocklist_file", f"no such file: {data.blocklist_file!r}"))
    for index, pattern in enumerate(data.boilerplate_patterns):
        try:
            re.compile(pattern)
        except re.error as error:
            problems.append(
                Problem(f"boilerplate_patterns[{index}]", f"not a valid regular expression: {error}")
            )
    for key in ("max_top_ngram_fraction", "max_duplicate_ngram_fraction"):
        table = getattr(data, key)
        if not all(isinstance(n, int) and n > 0 and isinstance(v, (int, float)) for n, v in table.items()):
            problems.append(Problem(key, f"expected a mapping of n-gram size to fraction, got {table!r}"))
    return problems
