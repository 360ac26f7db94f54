"""Recipes: a YAML file plus command-line overrides, parsed strictly into typed dataclasses.

Every stage script calls `parse_recipe(stage)`. Before any model or dataset is loaded it rejects
unknown keys (with the closest valid key), keys written twice, values of the wrong type or out of
their range (VALUE_BOUNDS), missing required keys and local paths that do not exist, naming the file,
the line and the key. The dataclasses are TRL's: the
stage's TRL config (e.g. SFTConfig), TRL's ModelConfig extended by `ModelArguments`, and Trellis's
`ScriptArguments` for the data.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import glob
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from trl import ModelConfig  # a plain dataclass; TRL imports its trainers lazily

from trellis.errors import TrellisError

DATASET_FORMATS = (
    "auto",
    "messages",
    "alpaca",
    "sharegpt",
    "hh",
    "prompt_completion",
    "text",
    "preference",
    "unpaired",
    "prompt",
)


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
        metadata={
            "help": "Record format, converted to what the stage trains on: `messages` (SFT), "
            "prompt/chosen/rejected (reward, DPO, ORPO), prompt/completion/label (KTO; pairs are "
            "unpaired) or `prompt` (PPO, GRPO, RLOO).",
            "choices": list(DATASET_FORMATS),
        },
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

    nested_items: ClassVar[dict[str, type]] = {"datasets": DatasetSource, "eval_datasets": DatasetSource}

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
        self.datasets = [as_source(item) for item in self.datasets]
        self.eval_datasets = [as_source(item) for item in self.eval_datasets]


def as_source(item: dict | DatasetSource) -> DatasetSource:
    return item if isinstance(item, DatasetSource) else DatasetSource(**item)


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
        metadata={"help": "With LoRA/QLoRA: merge the adapters into the base weights in the final model."},
    )


@dataclass
class SFTScriptArguments(ScriptArguments):
    """SFT's data plus how its loss computes the LM head (trellis.lm_head_loss)."""

    unchunked_loss_max_mib: float = field(
        default=0.0,
        metadata={
            "help": "With loss_type chunked_nll (TRL's default): compute the logits of a batch's loss tokens in "
            "one piece, not recomputed in the backward pass, when they take at most this many MiB in float32; "
            "larger batches still go through TRL's 256-token chunks. Same loss; faster where vocabularies or "
            "completions are small. 0: always chunk, as TRL does."
        },
    )


def _sft_types() -> tuple[type, ...]:
    from trl import SFTConfig

    return SFTScriptArguments, SFTConfig, ModelArguments


def _data_types() -> tuple[type, ...]:
    from trellis.data_recipe import DataArguments

    return (DataArguments,)


def _pretrain_types() -> tuple[type, ...]:
    from trellis.pretraining import PretrainArguments, PretrainConfig

    return PretrainArguments, PretrainConfig, ModelArguments


@dataclass
class PPOScriptArguments(ScriptArguments):
    """PPO's data (prompts) plus the value model, which TRL's PPOConfig has no key for."""

    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Sequence-classification model that initialises the value head. Unset: the reward model."
        },
    )


@dataclass
class OnlineRLScriptArguments(ScriptArguments):
    """GRPO's and RLOO's data (prompts) plus the reward model they optimise, which their TRL configs lack."""

    reward_model_path: str = field(
        default="",
        metadata={"help": "The reward stage's output: a sequence-classification model with one output."},
    )

    def recipe_problems(self) -> list[Problem]:
        if not self.reward_model_path:
            return [
                Problem(
                    "reward_model_path",
                    "required: the reward model to optimise (scripts/reward.py's output_dir)",
                )
            ]
        return []


def _reward_types() -> tuple[type, ...]:
    from trl import RewardConfig

    return ScriptArguments, RewardConfig, ModelArguments


def _dpo_types() -> tuple[type, ...]:
    from trl import DPOConfig

    return ScriptArguments, DPOConfig, ModelArguments


def _kto_types() -> tuple[type, ...]:
    from trl import KTOConfig

    return ScriptArguments, KTOConfig, ModelArguments


def _orpo_types() -> tuple[type, ...]:
    from trl.experimental.orpo import ORPOConfig

    return ScriptArguments, ORPOConfig, ModelArguments


def _grpo_types() -> tuple[type, ...]:
    from trl import GRPOConfig

    return OnlineRLScriptArguments, GRPOConfig, ModelArguments


def _rloo_types() -> tuple[type, ...]:
    from trl import RLOOConfig

    return OnlineRLScriptArguments, RLOOConfig, ModelArguments


def _ppo_types() -> tuple[type, ...]:
    from trellis.ppo_config import PPOConfig

    return PPOScriptArguments, PPOConfig, ModelArguments


def _eval_types() -> tuple[type, ...]:
    from trellis.eval_recipe import EvalArguments

    return (EvalArguments,)


def _quantize_types() -> tuple[type, ...]:
    from trellis.quantize_recipe import QuantizeArguments

    return (QuantizeArguments,)


# Stage name -> the dataclasses its recipe fills, in the order parse_recipe returns them.
STAGES: dict[str, Callable[[], tuple[type, ...]]] = {
    "data": _data_types,
    "sft": _sft_types,
    "pretrain": _pretrain_types,
    "reward": _reward_types,
    "dpo": _dpo_types,
    "ppo": _ppo_types,
    "kto": _kto_types,
    "orpo": _orpo_types,
    "grpo": _grpo_types,
    "rloo": _rloo_types,
    "eval": _eval_types,
    "quantize": _quantize_types,
}


def stage_types(stage: str) -> tuple[type, ...]:
    if stage not in STAGES:
        raise RecipeError(
            f"unknown stage {stage!r}{did_you_mean(stage, STAGES)}; stages: {', '.join(STAGES)}"
        )
    return STAGES[stage]()


def parse_recipe(stage: str, args: list[str] | None = None, check_paths: bool = True) -> tuple[Any, ...]:
    """Parse `--config FILE.yaml` plus `--key value` overrides into the stage's dataclasses.

    With check_paths=False, local inputs need not exist yet (e.g. the output of an earlier stage).
    """
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
    problems = _command_line_range_problems(parser, cli_args, dataclass_types)
    if problems:  # before the dataclasses' own checks, which would name neither the key nor the range
        raise RecipeError(_format_problems("command line", problems))
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=cli_args, return_remaining_strings=True)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{where}: {error}") from None
    if unknown:
        names = _field_names(dataclass_types)
        flags = [arg for arg in unknown if arg.startswith("--")] or unknown
        raise RecipeError(
            "unknown command-line argument(s): "
            + "; ".join(f"{flag}{did_you_mean(flag.lstrip('-').split('=')[0], names)}" for flag in flags)
        )
    problems = check_semantics(parsed) + (check_local_paths(parsed) if check_paths else [])
    if problems:
        raise RecipeError(_format_problems(where, problems))
    return tuple(parsed)


def _command_line_range_problems(
    parser: Any, cli_args: list[str], dataclass_types: tuple[type, ...]
) -> list[Problem]:
    """Range problems of the values the command line changes (the recipe file's were checked already)."""
    given, _ = parser.parse_known_args(cli_args)
    before, _ = parser.parse_known_args([])  # the recipe file's values and the defaults
    return [
        Problem(f"--{key}", message)
        for key, bound in value_bounds(dataclass_types).items()
        if getattr(given, key, None) != getattr(before, key, None)
        and (message := bound.problem(getattr(given, key)))
    ]


def validate_recipe_file(path: str, stage: str | None = None, check_paths: bool = True) -> str:
    """Parse a stage recipe exactly as its script would, without training. Returns the stage name."""
    stage = stage or stage_of_recipe(path)
    # A GPU recipe (bf16) must validate on a machine without one, so validation runs it as if on CPU.
    trains = "use_cpu" in _field_names(stage_types(stage))  # the data, eval and quantize stages do not
    on_cpu = ["--use_cpu", "true"] if trains and not _cuda_available() else []
    parse_recipe(stage, ["--config", path, *on_cpu], check_paths)
    return stage


def _cuda_available() -> bool:
    import torch  # only here: the stages that do not train check their recipes without torch (~1.5 s)

    return torch.cuda.is_available()


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
    duplicates: list[Problem] = []
    _collect_key_lines(root, (), lines, duplicates)
    if duplicates:  # YAML keeps the last of two equal keys without a word; the user meant one of them
        raise RecipeError(_format_problems(path, duplicates))
    return recipe, lines


def _collect_key_lines(
    node: yaml.Node, prefix: tuple, lines: dict[tuple, int], duplicates: list[Problem]
) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, key_node.value)
            line = key_node.start_mark.line + 1
            if key in lines:
                duplicates.append(
                    Problem(
                        key_path_name(key),
                        f"written twice (also on line {lines[key]}); YAML would silently keep only this "
                        "one: delete one of them",
                        line,
                    )
                )
            lines[key] = line
            _collect_key_lines(value_node, key, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_key_lines(item, (*prefix, index), lines, duplicates)


def key_path_name(path: tuple) -> str:
    """('stages', 1, 'overrides', 'seed') -> 'stages[1].overrides.seed'."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


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


@dataclass(frozen=True)
class Bound:
    """The range a numeric recipe value must lie in; `note` says what the edge values mean."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # > low instead of >= low
    high_open: bool = False  # < high instead of <= high
    note: str = ""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None  # None (unset) and wrong types are not ranges' business
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (too_low or too_high):
            return None
        if self.low is not None and self.high is not None:
            expected = (
                f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            expected = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            expected = f"{'<' if self.high_open else '<='} {self.high}"
        return f"must be {expected}{f' ({self.note})' if self.note else ''}, got {value!r}"


_AT_LEAST_1 = Bound(1)
_POSITIVE = Bound(0, low_open=True)
_NOT_NEGATIVE = Bound(0)
_STEPS = Bound(0, low_open=True, note="a step count, or a fraction < 1 of the run")
_FRACTION = Bound(0, 1, high_open=True)  # [0, 1)

# Values outside these ranges are meaningless (or crash deep inside training); a key means the same in
# every stage dataclass that has it. Ranges from the TRL and transformers docs of each field.
VALUE_BOUNDS: dict[str, Bound] = {
    # transformers.TrainingArguments
    "per_device_train_batch_size": _AT_LEAST_1,
    "per_device_eval_batch_size": _AT_LEAST_1,
    "gradient_accumulation_steps": _AT_LEAST_1,
    "eval_accumulation_steps": _AT_LEAST_1,
    "learning_rate": _NOT_NEGATIVE,
    "weight_decay": _NOT_NEGATIVE,
    "adam_beta1": _FRACTION,
    "adam_beta2": _FRACTION,
    "adam_epsilon": _NOT_NEGATIVE,
    "max_grad_norm": Bound(0, note="0: no clipping"),
    "num_train_epochs": _POSITIVE,
    "max_steps": Bound(-1, note="-1: train for num_train_epochs"),
    "warmup_steps": Bound(0, note="a step count, or a fraction < 1 of the run"),
    "logging_steps": _STEPS,
    "eval_steps": _STEPS,
    "save_steps": _STEPS,
    "label_smoothing_factor": _FRACTION,
    "seed": Bound(0, 2**32 - 1, note="numpy's seed range"),
    "data_seed": Bound(0, 2**32 - 1, note="numpy's seed range"),
    "dataloader_num_workers": _NOT_NEGATIVE,
    # TRL's trainer configs
    "max_length": _AT_LEAST_1,
    "max_prompt_length": _AT_LEAST_1,
    "max_completion_length": _AT_LEAST_1,
    "beta": _NOT_NEGATIVE,  # GRPO and RLOO: 0 turns the KL penalty off; see CONFIG_VALUE_BOUNDS
    "num_generations": Bound(2, note="the group each completion's reward is compared with"),
    "num_iterations": _AT_LEAST_1,
    "temperature": _POSITIVE,
    "top_p": Bound(0, 1, low_open=True),
    "num_ppo_epochs": _AT_LEAST_1,
    "num_mini_batches": _AT_LEAST_1,
    "total_episodes": _AT_LEAST_1,
    "response_length": _AT_LEAST_1,
    "local_rollout_forward_batch_size": _AT_LEAST_1,
    "kl_coef": _NOT_NEGATIVE,
    "vf_coef": _NOT_NEGATIVE,
    "cliprange": _POSITIVE,
    "cliprange_value": _POSITIVE,
    "gamma": Bound(0, 1),
    "lam": Bound(0, 1),
    # TRL's ModelConfig (LoRA)
    "lora_r": _AT_LEAST_1,
    "lora_alpha": _POSITIVE,
    "lora_dropout": _FRACTION,
    # Trellis's data and stage arguments
    "test_split_size": Bound(0, low_open=True, note="a fraction < 1 or a count of examples"),
    "unchunked_loss_max_mib": _NOT_NEGATIVE,
    "batch_size": _AT_LEAST_1,
    # DatasetSource (an item of `datasets`)
    "weight": Bound(0, low_open=True, note="the share of the source to use: 0.5 a half, 2.0 twice"),
    "max_documents": _AT_LEAST_1,
}

# Where one stage needs a narrower range than VALUE_BOUNDS (by config class name, subclasses included).
CONFIG_VALUE_BOUNDS: dict[str, dict[str, Bound]] = {
    # beta scales the preference margin (DPO; IPO divides by it), KTO's sigmoid and ORPO's odds-ratio
    # term: at 0 the stage learns no preference at all.
    "DPOConfig": {"beta": _POSITIVE},
    "KTOConfig": {"beta": _POSITIVE},
    "ORPOConfig": {"beta": _POSITIVE},
}


def value_bounds(dataclass_types: tuple[type, ...]) -> dict[str, Bound]:
    """The declared range of every bounded key of a stage's dataclasses."""
    bounds: dict[str, Bound] = {}
    for cls in dataclass_types:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        bounds.update({name: bound for name, bound in VALUE_BOUNDS.items() if name in names})
        for base in reversed(cls.__mro__):  # the most derived class's range wins
            bounds.update(CONFIG_VALUE_BOUNDS.get(base.__name__, {}))
    return bounds


def _field_names(dataclass_types: tuple[type, ...]) -> list[str]:
    return [f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init]


def did_you_mean(word: str, candidates) -> str:
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
    nested_items: dict[str, type] = {}  # keys holding a list of mappings, checked key by key
    for cls in dataclass_types:
        known.update(_fields_with_hints(cls))
        nested_items.update(getattr(cls, "nested_items", {}))
    bounds = value_bounds(dataclass_types)
    checked, problems = {}, []
    for key, value in recipe.items():
        key = str(key)
        line = lines.get((key,))
        if key not in known:
            problems.append(Problem(key, f"unknown key{did_you_mean(key, known)}", line))
            continue
        spec, hint = known[key]
        item_type = nested_items.get(key)
        if item_type is not None:
            value, item_problems = _check_items(key, value, item_type, lines)
            problems += item_problems
        else:
            error = _check_value(value, hint, spec)
            if isinstance(error, str):
                problems.append(Problem(key, error, line))
                continue
            value = error.value
            if key in bounds and (message := bounds[key].problem(value)):
                problems.append(Problem(key, message, line))
                continue
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
    bounds = value_bounds((item_type,))
    required = [f.name for f, _ in fields.values() if f.default is dataclasses.MISSING]
    problems, items = [], []
    for index, item in enumerate(value):
        checked = {}
        for name, item_value in item.items():
            where = f"{key}[{index}].{name}"
            line = lines.get((key, index, name))
            if name not in fields:
                problems.append(Problem(where, f"unknown key{did_you_mean(str(name), fields)}", line))
                continue
            spec, hint = fields[name]
            result = _check_value(item_value, hint, spec)
            if isinstance(result, str):
                problems.append(Problem(where, result, line))
            elif name in bounds and (message := bounds[name].problem(result.value)):
                problems.append(Problem(where, message, line))
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
        return f"got {value!r}, expected one of: {', '.join(map(str, choices))}{did_you_mean(str(value), map(str, choices))}"
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
                    f"{did_you_mean(value, map(str, allowed))}"
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
        return f"got {value!r}, expected one of: {', '.join(map(str, allowed))}{did_you_mean(str(value), map(str, allowed))}"
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


def _find(parsed: list[Any], attribute: str) -> Any:
    return next((obj for obj in parsed if hasattr(obj, attribute)), None)


def check_semantics(parsed: list[Any]) -> list[Problem]:
    """Checks across keys: what one key requires of another."""
    problems: list[Problem] = []
    script = next((obj for obj in parsed if isinstance(obj, ScriptArguments)), None)
    model = next((obj for obj in parsed if isinstance(obj, ModelArguments)), None)
    training = _find(parsed, "output_dir")

    if model is not None:
        if bool(model.model_name_or_path) == bool(model.model_config):
            problems.append(
                Problem(
                    "model_name_or_path",
                    "set exactly one of 'model_name_or_path' (a Hub id or "
                    "local model directory) or 'model_config' (to train from scratch)",
                )
            )
        reads_packed_data = (
            _find(parsed, "dataset_path") is not None
        )  # pretraining: the data stage's tokenizer
        if reads_packed_data and model.tokenizer_name_or_path:
            problems.append(
                Problem(
                    "tokenizer_name_or_path",
                    "pretraining uses the tokenizer the data stage "
                    "packed with (dataset_path/tokenizer); remove this key",
                )
            )
        if model.model_config and not model.tokenizer_name_or_path and not reads_packed_data:
            problems.append(
                Problem(
                    "tokenizer_name_or_path",
                    "a model built from 'model_config' needs a tokenizer: set 'tokenizer_name_or_path'",
                )
            )
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
        evaluates = (
            training is not None
            and str(getattr(training.eval_strategy, "value", training.eval_strategy)) != "no"
        )
        if evaluates and not (script.eval_datasets or script.test_split_size):
            problems.append(
                Problem(
                    "eval_strategy",
                    "evaluation is on but the recipe has no held-out data: set "
                    "'eval_datasets' or 'test_split_size' (or eval_strategy: 'no')",
                )
            )
    for obj in parsed:  # a stage's own dataclass may check its keys against each other
        if hasattr(obj, "recipe_problems"):
            problems += obj.recipe_problems()
    return problems


def check_local_paths(parsed: list[Any]) -> list[Problem]:
    """Every local input the recipe names must exist; a value that may be a Hub id is left to the Hub."""
    may_be_hub_id: list[tuple[str, str | None, str]] = []  # (key, value, what it is)
    local_only: list[tuple[str, str | None, str]] = []
    for obj in parsed:
        for key, what in (
            ("model_name_or_path", "model directory"),
            ("tokenizer_name_or_path", "tokenizer directory"),
            ("chat_template_path", "chat template"),
            ("reward_model_path", "model directory"),
            ("value_model_path", "model directory"),
        ):
            may_be_hub_id.append((key, getattr(obj, key, None), what))
        for key in ("datasets", "eval_datasets", "decontamination_datasets", "calibration_datasets"):
            for index, source in enumerate(getattr(obj, key, None) or []):
                may_be_hub_id.append((f"{key}[{index}].path", source.path, "dataset file or directory"))
        model_config, template = getattr(obj, "model_config", None), getattr(obj, "chat_template", None)
        if isinstance(model_config, str):
            local_only.append(("model_config", model_config, "config file"))
        if template and template.endswith((".jinja", ".j2")):
            local_only.append(("chat_template", template, "template file"))
        local_only += [
            ("dataset_path", getattr(obj, "dataset_path", None), "dataset directory"),
            ("blocklist_file", getattr(obj, "blocklist_file", None), "file"),
        ]
    problems = [
        Problem(key, message)
        for key, value, what in may_be_hub_id
        if value and (message := local_path_problem(value, what))
    ]
    problems += [
        Problem(key, f"no such local {what}: {value!r}")
        for key, value, what in local_only
        if value and not os.path.exists(os.path.expanduser(value))
    ]
    return problems
