"""One-file pipelines: every stage in order, each a real `accelerate launch` process, resumable, with lineage.

    trellis run recipes/tiny/pipeline.yaml [--from STAGE | --only STAGE] [--dry-run]

A pipeline file lists stages; each names its stage kind, its recipe, its accelerate config and
overrides of any recipe key. `${stages.<name>.<key>}` is the resolved value of that key in an
earlier stage (usually `output_dir`), so no path is written twice. The whole file and every stage
recipe (overrides applied, strictly, as the stage script will parse it) are checked before the first
stage starts.

A stage is skipped when its run record says complete and neither its resolved config nor its inputs
(the run records of the earlier stages whose outputs it reads, and the local files it names) changed
since it ran; a changed stage starts over from an empty output_dir, and everything that reads its
output runs again after it. A stage that was interrupted reruns in place and resumes from its own
checkpoints. `pipeline_run.json` in the pipeline's output_dir ties every stage to its config hash,
input fingerprints, command, log, timings and metrics, with the code commit and package versions.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trellis.core.errors import TrellisError
from trellis.core.recipe import (
    Problem,
    RecipeError,
    check_local_paths,
    check_recipe,
    did_you_mean,
    format_problems,
    load_recipe_file,
)
from trellis.stages import STAGES, parse_recipe, stage_types

PIPELINE_RUN = "pipeline_run.json"  # in the pipeline's output_dir: every stage's lineage and state
PUBLISH = "publish"  # the stage kind the runner does itself (it only uploads files)
PIPELINE_KEYS = ("name", "output_dir", "accelerate_config", "env", "stages")
STAGE_KEYS = ("name", "stage", "recipe", "accelerate_config", "overrides", "env", "push_to_hub")
# Where to publish (a publish stage's keys, or a training stage's `push_to_hub` mapping).
PUBLISH_OPTIONS = ("repo_id", "private", "revision", "commit_message", "dry_run")
PUBLISH_KEYS = ("name", "stage", "model", "eval", *PUBLISH_OPTIONS)
DEFAULT_ACCELERATE_CONFIG = "accelerate_configs/cpu.yaml"
_REFERENCE = re.compile(r"\$\{([^{}]*)\}")


class PipelineError(TrellisError):
    """The pipeline file is invalid, or a stage failed."""


@dataclass
class Stage:
    name: str
    kind: str
    index: int
    recipe: str | None = None
    accelerate_config: str | None = None
    env: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)  # recipe + overrides, references replaced
    publish: dict | None = None  # publish options: the publish stage's own, or a stage's push_to_hub
    depends_on: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> str:
        return self.resolved["output_dir"]


@dataclass
class Pipeline:
    path: str
    name: str
    output_dir: str
    env: dict
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise PipelineError(
            f"{self.path}: no stage named {name!r}{did_you_mean(name, self.names)}; stages: {', '.join(self.names)}"
        )

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def resolved_recipe_path(self, stage: Stage) -> Path:
        return Path(self.output_dir) / "recipes" / f"{stage.name}.yaml"

    def log_path(self, stage: Stage) -> Path:
        return Path(self.output_dir) / "logs" / f"{stage.name}.log"


# --- reading and checking the pipeline file ---------------------------------------------------------


def load_pipeline(path: str) -> Pipeline:
    """Read, resolve and check the pipeline file and every stage recipe; raise naming every problem."""
    raw, lines = load_recipe_file(path)
    problems: list[Problem] = []
    for key in raw:
        if key not in PIPELINE_KEYS:
            problems.append(
                Problem(str(key), f"unknown key{did_you_mean(str(key), PIPELINE_KEYS)}", lines.get((key,)))
            )
    name = str(raw.get("name") or Path(path).parent.name)
    output_dir = str(raw.get("output_dir") or os.path.join("outputs", name))
    env = _string_mapping(raw.get("env"), "env", lines, problems)
    default_accelerate = raw.get("accelerate_config", DEFAULT_ACCELERATE_CONFIG)
    entries = raw.get("stages")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        problems.append(
            Problem("stages", "required: a list of stages, each a mapping with 'name' and 'recipe'")
        )
        raise PipelineError(format_problems(path, problems))

    stages: list[Stage] = []
    for index, entry in enumerate(entries):
        stage = _read_stage(entry, index, stages, default_accelerate, output_dir, lines, problems)
        if stage is not None:
            stages.append(stage)
    if problems:  # the structure first: recipes are only checked against a sound pipeline
        raise PipelineError(format_problems(path, problems))
    pipeline = Pipeline(path, name, output_dir, env, stages)
    check_stage_recipes(pipeline, entries, lines)
    return pipeline


def _string_mapping(value: Any, key: str, lines: dict, problems: list[Problem]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(Problem(key, "expected a mapping of names to values", lines.get((key,))))
        return {}
    return {str(k): str(v) for k, v in value.items()}


@dataclass
class _Entry:
    """One entry of the pipeline's `stages` list while it is read: where it is, and the problems found."""

    values: dict
    index: int
    where: str
    earlier: list[Stage]
    lines: dict
    problems: list[Problem]

    def problem(self, key: str, message: str, *line_keys: str) -> None:
        line = next((self.line(k) for k in line_keys if self.line(k)), None) or self.line()
        self.problems.append(Problem(f"{self.where}.{key}", message, line))

    def line(self, *key_path: Any) -> int | None:
        return self.lines.get(("stages", self.index, *key_path))

    def resolve(self, value: Any, *key_path: Any) -> Any:
        where = f"{self.where}.{'.'.join(map(str, key_path))}"
        return _resolve(value, self.earlier, where, self.line(*key_path), self.problems)


def _read_stage(
    values: dict,
    index: int,
    earlier: list[Stage],
    default_accelerate: str | None,
    pipeline_output: str,
    lines: dict,
    problems: list[Problem],
) -> Stage | None:
    entry = _Entry(values, index, f"stages[{index}]", earlier, lines, problems)
    name = values.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        entry.problem("name", "required: a stage name of letters, digits, '_', '-' or '.'")
        return None
    entry.where = f"{entry.where} ({name})"
    kind = values.get("stage", name)
    if kind not in STAGES:
        stages = ", ".join(STAGES)
        entry.problem(
            "stage",
            f"unknown stage {kind!r}{did_you_mean(str(kind), STAGES)}; stages: {stages}",
            "stage",
            "name",
        )
        return None
    if name in [s.name for s in earlier]:
        entry.problem("name", f"two stages are named {name!r}; names must be unique", "stage", "name")
    allowed = PUBLISH_KEYS if kind == PUBLISH else STAGE_KEYS
    for key in values:
        if key not in allowed:
            entry.problem(str(key), f"unknown key{did_you_mean(str(key), allowed)}", key)

    stage = Stage(
        name, kind, index, env=_string_mapping(values.get("env"), f"{entry.where}.env", lines, problems)
    )
    if kind == PUBLISH:
        _read_publish(entry, stage, pipeline_output)
    elif not _read_recipe_stage(entry, stage, default_accelerate):
        return None
    _check_output_dir(entry, stage, pipeline_output)
    stage.depends_on = [other.name for other in earlier if _reads(stage.resolved, other.output_dir)]
    return stage


def _read_publish(entry: _Entry, stage: Stage, pipeline_output: str) -> None:
    if not entry.values.get("repo_id"):
        entry.problem("repo_id", "required for a publish stage")
    if not entry.values.get("model") and not entry.values.get("eval"):
        entry.problem("model", "required for a publish stage (or 'eval': publish the evaluation's candidate)")
    stage.publish = {
        key: entry.resolve(entry.values[key], key) for key in PUBLISH_KEYS[2:] if key in entry.values
    }
    stage.resolved = {"output_dir": os.path.join(pipeline_output, "publish", stage.name), **stage.publish}


def _read_recipe_stage(entry: _Entry, stage: Stage, default_accelerate: str | None) -> bool:
    """The recipe, overrides, accelerate config and push_to_hub of a stage that runs a script; False when
    the stage cannot be resolved at all (no recipe, or no output_dir)."""
    stage.accelerate_config = entry.values.get("accelerate_config", default_accelerate)
    if stage.accelerate_config and not os.path.isfile(stage.accelerate_config):
        message = f"no such accelerate config: {stage.accelerate_config!r} (see accelerate_configs/)"
        line = entry.line("accelerate_config") or entry.lines.get(("accelerate_config",))
        entry.problems.append(Problem(f"{entry.where}.accelerate_config", message, line))
    stage.recipe = entry.values.get("recipe")
    if not stage.recipe:
        entry.problem("recipe", "required: the stage's recipe file")
        return False
    if not os.path.isfile(stage.recipe):
        entry.problem("recipe", f"no such recipe file: {stage.recipe!r}", "recipe")
        return False
    recipe, _ = load_recipe_file(stage.recipe)
    overrides = entry.values.get("overrides") or {}
    if not isinstance(overrides, dict):
        entry.problem("overrides", "expected a mapping of recipe keys to values", "overrides")
        overrides = {}
    stage.resolved = {**recipe, **{str(k): entry.resolve(v, "overrides", k) for k, v in overrides.items()}}
    if not stage.resolved.get("output_dir"):
        entry.problem("overrides.output_dir", f"required: {stage.recipe} sets no output_dir")
        return False
    options = entry.values.get("push_to_hub")
    if options is None:
        return True
    if not isinstance(options, dict) or not options.get("repo_id"):
        entry.problem(
            "push_to_hub",
            "expected a mapping with 'repo_id' (and private, revision, commit_message, dry_run)",
        )
        return True
    for key in options:
        if key not in PUBLISH_OPTIONS:
            entry.problem(f"push_to_hub.{key}", f"unknown key{did_you_mean(str(key), PUBLISH_OPTIONS)}")
    stage.publish = {"model": stage.output_dir, **entry.resolve(options, "push_to_hub")}
    return True


def _check_output_dir(entry: _Entry, stage: Stage, pipeline_output: str) -> None:
    output = os.path.normpath(stage.output_dir)
    for other in entry.earlier:
        if os.path.normpath(other.output_dir) == output:
            entry.problem("output_dir", f"{output!r} is also the output_dir of stage {other.name!r}")
    if is_within(pipeline_output, output) and stage.kind != PUBLISH:
        entry.problem("output_dir", f"{output!r} holds the pipeline's own output_dir {pipeline_output!r}")


def _resolve(value: Any, earlier: list[Stage], where: str, line: int | None, problems: list[Problem]) -> Any:
    """Replace every `${stages.<name>.<key>}` in a value (nested lists and mappings included)."""
    if isinstance(value, dict):
        return {k: _resolve(v, earlier, f"{where}.{k}", line, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, earlier, f"{where}[{i}]", line, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(reference: str) -> Any:
        parts = reference.strip().split(".", 2)
        by_name = {stage.name: stage for stage in earlier}
        if len(parts) != 3 or parts[0] != "stages":
            problems.append(
                Problem(where, f"${{{reference}}}: a reference is ${{stages.<earlier stage>.<key>}}", line)
            )
            return None
        _, name, key = parts
        if name not in by_name:
            problems.append(
                Problem(
                    where,
                    f"${{{reference}}}: no earlier stage named {name!r}{did_you_mean(name, by_name)} "
                    f"(earlier stages: {', '.join(by_name) or 'none'})",
                    line,
                )
            )
            return None
        if key not in by_name[name].resolved:
            problems.append(
                Problem(
                    where,
                    f"${{{reference}}}: stage {name!r} sets no key {key!r}{did_you_mean(key, by_name[name].resolved)}",
                    line,
                )
            )
            return None
        return by_name[name].resolved[key]

    whole = _REFERENCE.fullmatch(value)
    if whole:  # a value that is one reference keeps the referenced value's type
        return lookup(whole.group(1))
    return _REFERENCE.sub(lambda match: str(lookup(match.group(1))), value)


def strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def is_within(path: str, directory: str) -> bool:
    path, directory = os.path.normpath(path), os.path.normpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def _reads(resolved: dict, output_dir: str) -> bool:
    """Whether a stage's resolved recipe names a path in `output_dir` (a reference, or a path written out)."""
    values = {k: v for k, v in resolved.items() if k != "output_dir"}
    return any(is_within(value, output_dir) for value in strings(values))


def check_stage_recipes(pipeline: Pipeline, entries: list[dict], lines: dict) -> None:
    """Every stage recipe as its script will parse it: keys and types of every stage first (a typo in
    the last stage is found without parsing the others), then cross-key rules and local paths (except
    those an earlier stage writes)."""
    stages = [stage for stage in pipeline.stages if stage.kind != PUBLISH]
    problems: list[str] = []
    for stage in stages:
        dataclass_types = stage_types(stage.kind)
        recipe, recipe_lines = load_recipe_file(stage.recipe)
        recipe.pop("env", None)  # environment variables for the stage's process, as parse_recipe reads them
        _, found = check_recipe(recipe, dataclass_types, recipe_lines)
        if found:
            problems.append(f"stage {stage.name!r}: " + format_problems(stage.recipe, found))
        overrides = entries[stage.index].get("overrides") or {}
        override_lines = {
            key[3:]: line for key, line in lines.items() if key[:3] == ("stages", stage.index, "overrides")
        }
        _, found = check_recipe({k: stage.resolved[k] for k in overrides}, dataclass_types, override_lines)
        if found:
            problems.append(
                f"stage {stage.name!r}: " + format_problems(f"{pipeline.path} (overrides)", found)
            )
    if not problems:
        with tempfile.TemporaryDirectory() as scratch:
            for stage in stages:
                problems += _parse_problems(stage, pipeline, scratch)
    if problems:
        raise PipelineError(
            f"{pipeline.path}: the pipeline is not valid; no stage was run\n" + "\n".join(problems)
        )


def _parse_problems(stage: Stage, pipeline: Pipeline, scratch: str) -> list[str]:
    where = f"stage {stage.name!r} ({stage.recipe} with overrides)"
    resolved_file = os.path.join(scratch, f"{stage.name}.yaml")
    write_yaml(resolved_file, stage.resolved)
    trains = any("use_cpu" in getattr(cls, "__dataclass_fields__", {}) for cls in stage_types(stage.kind))
    on_cpu = ["--use_cpu", "true"] if trains and not _has_gpu() else []  # a GPU recipe validates anywhere
    try:
        parsed = parse_recipe(stage.kind, ["--config", resolved_file, *on_cpu], check_paths=False)
    except RecipeError as error:
        return [f"{where}: {str(error).replace(resolved_file + ': ', '')}"]
    produced = [other.output_dir for other in pipeline.stages[: stage.index]]
    missing = [
        problem
        for problem in check_local_paths(list(parsed))
        if not any(is_within(str(_value_at(stage.resolved, problem.key)), out) for out in produced)
    ]
    return [f"{where}: " + format_problems("", missing).lstrip(": ")] if missing else []


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _value_at(mapping: dict, key: str) -> Any:
    """The value at a problem's key, e.g. `datasets[0].path`."""
    value: Any = mapping
    for part in re.findall(r"[^.\[\]]+", key):
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return value


def write_yaml(path: str | Path, mapping: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(mapping, sort_keys=False, allow_unicode=True))


def ancestry(stage: Stage, pipeline: Pipeline) -> list[Stage]:
    """The stage and every stage it reads from, directly or not, in pipeline order."""
    names, queue = set(), [stage.name]
    while queue:
        name = queue.pop()
        if name not in names:
            names.add(name)
            queue += pipeline.stage(name).depends_on
    return [s for s in pipeline.stages if s.name in names]
