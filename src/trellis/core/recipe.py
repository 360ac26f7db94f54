"""Reading recipes strictly: the YAML file with the line of every key, and checks of keys, types and local paths.

A recipe is checked against the dataclasses its stage fills (trellis.stages names them) before any model or
dataset loads: unknown keys (with the closest valid key), keys written twice, values of the wrong type or
out of their range (trellis.core.bounds), missing required keys and local paths that do not exist, each named with the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import glob
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trellis.core.bounds import value_bounds
from trellis.core.errors import TrellisError


class RecipeError(TrellisError):
    """The recipe (YAML file or command line) is invalid."""


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
        raise RecipeError(format_problems(path, duplicates))
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


def apply_env(env: Any, where: str) -> None:
    """TRL recipes may set environment variables under `env:`."""
    if env is None:
        return
    if not isinstance(env, dict):
        raise RecipeError(f"{where}: key 'env' must be a mapping of variable names to values")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


def pop_flag(args: list[str], flag: str, needs: str) -> tuple[str | None, list[str]]:
    """Take `--flag VALUE` (or `--flag=VALUE`) out of the arguments; return the value and the rest."""
    rest, value = [], None
    iterator = iter(args)
    for arg in iterator:
        if arg == flag:
            value = next(iterator, None)
            if value is None:
                raise RecipeError(f"{flag} needs {needs}")
        elif arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


# --- key and type checks ---------------------------------------------------------------------------


@dataclass
class Problem:
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.key}: {self.message}"


def format_problems(where: str, problems: list[Problem]) -> str:
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems)


def field_names(dataclass_types: tuple[type, ...]) -> list[str]:
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
    """_Ok(value) if it fits, a message for a bad enum choice, None for a type mismatch.

    One branch per kind of type hint the TRL and transformers configs use (kept together: it is a dispatch
    table, and each branch is a few lines)."""
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
            ("teacher_model_name_or_path", "model directory"),
            ("quality_model", "model directory"),
        ):
            may_be_hub_id.append((key, getattr(obj, key, None), what))
        for key in (
            "datasets",
            "eval_datasets",
            "decontamination_datasets",
            "calibration_datasets",
            "check_datasets",
        ):
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
