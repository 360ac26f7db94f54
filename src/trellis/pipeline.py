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

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from trellis.config import (
    Problem,
    RecipeError,
    _format_problems,
    check_local_paths,
    check_recipe,
    did_you_mean,
    load_recipe_file,
    parse_recipe,
    stage_types,
)
from trellis.errors import TrellisError
from trellis.run_record import RECORD_NAME, git_commit, package_versions, read_record
from trellis.stages import STAGES, stage_flag, stage_kind

PIPELINE_RUN = "pipeline_run.json"
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
        raise PipelineError(_format_problems(path, problems))

    stages: list[Stage] = []
    for index, entry in enumerate(entries):
        stage = _read_stage(entry, index, stages, default_accelerate, output_dir, lines, problems)
        if stage is not None:
            stages.append(stage)
    if problems:  # the structure first: recipes are only checked against a sound pipeline
        raise PipelineError(_format_problems(path, problems))
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


def _read_stage(
    entry: dict,
    index: int,
    earlier: list[Stage],
    default_accelerate: str | None,
    pipeline_output: str,
    lines: dict,
    problems: list[Problem],
) -> Stage | None:
    where = f"stages[{index}]"
    name = entry.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        problems.append(
            Problem(
                f"{where}.name",
                "required: a stage name of letters, digits, '_', '-' or '.'",
                lines.get(("stages", index)),
            )
        )
        return None
    where = f"{where} ({name})"
    kind = entry.get("stage", name)
    line = lines.get(("stages", index, "stage")) or lines.get(("stages", index, "name"))
    if kind not in STAGES:
        problems.append(
            Problem(
                f"{where}.stage",
                f"unknown stage {kind!r}{did_you_mean(str(kind), STAGES)}; stages: {', '.join(STAGES)}",
                line,
            )
        )
        return None
    if name in [s.name for s in earlier]:
        problems.append(
            Problem(f"{where}.name", f"two stages are named {name!r}; names must be unique", line)
        )
    allowed = PUBLISH_KEYS if kind == PUBLISH else STAGE_KEYS
    for key in entry:
        if key not in allowed:
            problems.append(
                Problem(
                    f"{where}.{key}",
                    f"unknown key{did_you_mean(str(key), allowed)}",
                    lines.get(("stages", index, key)),
                )
            )

    def resolve(value: Any, key_path: tuple) -> Any:
        return _resolve(
            value,
            earlier,
            f"{where}.{'.'.join(map(str, key_path))}",
            lines.get(("stages", index, *key_path)),
            problems,
        )

    stage = Stage(name, kind, index, env=_string_mapping(entry.get("env"), f"{where}.env", lines, problems))
    if kind == PUBLISH:
        for key in ("model", "repo_id"):
            if not entry.get(key):
                problems.append(
                    Problem(f"{where}.{key}", "required for a publish stage", lines.get(("stages", index)))
                )
        stage.publish = {key: resolve(entry[key], (key,)) for key in PUBLISH_KEYS[2:] if key in entry}
        stage.resolved = {"output_dir": os.path.join(pipeline_output, "publish", name), **stage.publish}
    else:
        stage.accelerate_config = entry.get("accelerate_config", default_accelerate)
        if stage.accelerate_config and not os.path.isfile(stage.accelerate_config):
            problems.append(
                Problem(
                    f"{where}.accelerate_config",
                    f"no such accelerate config: {stage.accelerate_config!r} (see accelerate_configs/)",
                    lines.get(("stages", index, "accelerate_config")) or lines.get(("accelerate_config",)),
                )
            )
        stage.recipe = entry.get("recipe")
        if not stage.recipe:
            problems.append(
                Problem(f"{where}.recipe", "required: the stage's recipe file", lines.get(("stages", index)))
            )
            return None
        if not os.path.isfile(stage.recipe):
            problems.append(
                Problem(
                    f"{where}.recipe",
                    f"no such recipe file: {stage.recipe!r}",
                    lines.get(("stages", index, "recipe")),
                )
            )
            return None
        recipe, _ = load_recipe_file(stage.recipe)
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            problems.append(
                Problem(
                    f"{where}.overrides",
                    "expected a mapping of recipe keys to values",
                    lines.get(("stages", index, "overrides")),
                )
            )
            overrides = {}
        stage.resolved = {**recipe, **{str(k): resolve(v, ("overrides", k)) for k, v in overrides.items()}}
        if not stage.resolved.get("output_dir"):
            problems.append(
                Problem(f"{where}.overrides.output_dir", f"required: {stage.recipe} sets no output_dir")
            )
            return None
        if entry.get("push_to_hub") is not None:
            options = entry["push_to_hub"]
            if not isinstance(options, dict) or not options.get("repo_id"):
                problems.append(
                    Problem(
                        f"{where}.push_to_hub",
                        "expected a mapping with 'repo_id' (and private, revision, commit_message, dry_run)",
                    )
                )
            else:
                for key in options:
                    if key not in PUBLISH_OPTIONS:
                        problems.append(
                            Problem(
                                f"{where}.push_to_hub.{key}",
                                f"unknown key{did_you_mean(str(key), PUBLISH_OPTIONS)}",
                            )
                        )
                stage.publish = {"model": stage.output_dir, **resolve(options, ("push_to_hub",))}
    output = os.path.normpath(stage.output_dir)
    for other in earlier:
        if os.path.normpath(other.output_dir) == output:
            problems.append(
                Problem(f"{where}.output_dir", f"{output!r} is also the output_dir of stage {other.name!r}")
            )
    if _is_within(pipeline_output, output) and kind != PUBLISH:
        problems.append(
            Problem(
                f"{where}.output_dir", f"{output!r} holds the pipeline's own output_dir {pipeline_output!r}"
            )
        )
    stage.depends_on = [other.name for other in earlier if _reads(stage.resolved, other.output_dir)]
    return stage


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


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _is_within(path: str, directory: str) -> bool:
    path, directory = os.path.normpath(path), os.path.normpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def _reads(resolved: dict, output_dir: str) -> bool:
    """Whether a stage's resolved recipe names a path in `output_dir` (a reference, or a path written out)."""
    values = {k: v for k, v in resolved.items() if k != "output_dir"}
    return any(_is_within(value, output_dir) for value in _strings(values))


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
            problems.append(f"stage {stage.name!r}: " + _format_problems(stage.recipe, found))
        overrides = entries[stage.index].get("overrides") or {}
        override_lines = {
            key[3:]: line for key, line in lines.items() if key[:3] == ("stages", stage.index, "overrides")
        }
        _, found = check_recipe({k: stage.resolved[k] for k in overrides}, dataclass_types, override_lines)
        if found:
            problems.append(
                f"stage {stage.name!r}: " + _format_problems(f"{pipeline.path} (overrides)", found)
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
        if not any(_is_within(str(_value_at(stage.resolved, problem.key)), out) for out in produced)
    ]
    return [f"{where}: " + _format_problems("", missing).lstrip(": ")] if missing else []


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


# --- fingerprints and the decision to run ----------------------------------------------------------------


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


_HASHED_FILE_BYTES = 256 * 1024**2  # larger local inputs are known by size and modification time


def _file_stamp(path: str) -> dict[str, str]:
    """The content hash of a local file, or of every file under a local directory (regenerating the
    same files, as `trellis tiny-data` does, changes nothing)."""
    if os.path.isfile(path):
        stat = os.stat(path)
        if stat.st_size > _HASHED_FILE_BYTES:
            return {path: f"{stat.st_size}:{stat.st_mtime_ns}"}
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return {path: digest.hexdigest()[:16]}
    stamps = {}
    for root, _, files in os.walk(path):
        for name in sorted(files):
            stamps.update(_file_stamp(os.path.join(root, name)))
    return stamps


def config_hash(stage: Stage, pipeline: Pipeline) -> str:
    """What the stage runs with: its resolved recipe, accelerate config and environment."""
    accelerate = stage.accelerate_config
    accelerate_text = (
        Path(accelerate).read_text() if accelerate and os.path.isfile(accelerate) else accelerate
    )
    return _hash(
        {
            "stage": stage.kind,
            "recipe": stage.resolved,
            "accelerate": accelerate_text,
            "env": {**pipeline.env, **stage.env},
        }
    )


def record_hash(output_dir: str) -> str | None:
    path = Path(output_dir) / RECORD_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def input_fingerprints(stage: Stage, pipeline: Pipeline) -> dict[str, Any]:
    """The run records of the stages it reads, and the local files it names that no stage writes."""
    inputs: dict[str, Any] = {name: record_hash(pipeline.stage(name).output_dir) for name in stage.depends_on}
    produced = [s.output_dir for s in pipeline.stages]
    local = sorted(
        {
            value
            for key, item in stage.resolved.items()
            if key != "output_dir"
            for value in _strings(item)
            if os.path.exists(value) and not any(_is_within(value, out) for out in produced)
        }
    )
    if local:
        inputs["files"] = _hash({path: _file_stamp(path) for path in local})
    return inputs


def decide(stage: Stage, pipeline: Pipeline, state: dict, rerunning: set[str]) -> str:
    """'skip' (complete, nothing changed), 'resume' (interrupted: same config and inputs) or 'run' (afresh).

    `rerunning` holds the stages that will run before this one in a dry run (their records will change).
    """
    if any(name in rerunning for name in stage.depends_on):
        return "run"
    stored = state.get("stages", {}).get(stage.name)
    if not stored or stored.get("config_hash") != config_hash(stage, pipeline):
        return "run"
    if stored.get("inputs") != input_fingerprints(stage, pipeline):
        return "run"
    record = read_record(stage.output_dir)
    if record is None:
        return "run"
    if record.get("status") == "complete" and stored.get("record_hash") in (
        None,
        record_hash(stage.output_dir),
    ):
        return "skip"
    return "resume"


# --- commands ------------------------------------------------------------------------------------------


def scripts_dir() -> Path:
    """scripts/ of the Trellis checkout this code belongs to, else of the working directory."""
    checkout = Path(__file__).resolve().parents[2] / "scripts"
    return checkout if checkout.is_dir() else Path("scripts").resolve()


def command(stage: Stage, pipeline: Pipeline) -> list[str]:
    kind = stage_kind(stage.kind)
    script = str(scripts_dir() / kind.script)
    config = ["--config", str(pipeline.resolved_recipe_path(stage))]
    config += stage_flag(kind.name)  # e.g. kto runs dpo.py's flow
    if kind.launcher == "python":
        return [sys.executable, script, *config]
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if stage.accelerate_config:
        launcher += ["--config_file", stage.accelerate_config]
    return [*launcher, script, *config]


def shown(argv: list[str]) -> str:
    """A command as the user would type it."""
    if argv[1:3] == ["-m", "accelerate.commands.launch"]:
        argv = ["accelerate", "launch", *argv[3:]]
    elif argv[0] == sys.executable:
        argv = ["python", *argv[1:]]
    return shlex.join(argv)


# --- the runner -------------------------------------------------------------------------------------------


def selected_stages(pipeline: Pipeline, start: str | None, only: str | None) -> list[Stage]:
    if start and only:
        raise PipelineError("give either --from or --only, not both")
    if only:
        return [pipeline.stage(only)]
    if start:
        return pipeline.stages[pipeline.stage(start).index :]
    return pipeline.stages


def load_state(pipeline: Pipeline) -> dict:
    path = Path(pipeline.output_dir) / PIPELINE_RUN
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(pipeline: Pipeline, state: dict) -> None:
    path = Path(pipeline.output_dir) / PIPELINE_RUN
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _say(message: str) -> None:
    print(message, flush=True)


def run_pipeline(
    path: str, start: str | None = None, only: str | None = None, dry_run: bool = False, hub_api: Any = None
) -> dict:
    """Run the pipeline (or print what would run); return pipeline_run.json's content."""
    started = time.monotonic()
    pipeline = load_pipeline(path)
    selected = selected_stages(pipeline, start, only)
    forced = {stage.name for stage in selected} if (start or only) else set()
    state = load_state(pipeline)
    _say(
        f"Pipeline {pipeline.name!r} ({path}): {len(pipeline.stages)} stages, valid in {time.monotonic() - started:.1f} s"
    )
    for stage in pipeline.stages:
        if stage.kind != PUBLISH:
            write_yaml(pipeline.resolved_recipe_path(stage), stage.resolved)
    if dry_run:
        print_plan(pipeline, selected, forced, state)
        return state

    state.update(
        pipeline=path,
        name=pipeline.name,
        output_dir=pipeline.output_dir,
        status="running",
        started_at=_now(),
        finished_at=None,
        git=git_commit(),
        packages=package_versions(),
    )
    state.setdefault("stages", {})
    state["stages"] = {name: state["stages"][name] for name in pipeline.names if name in state["stages"]}
    selected_names = {stage.name for stage in selected}
    for stage in pipeline.stages:
        if stage.name not in selected_names:
            continue
        missing = [
            name
            for name in stage.depends_on
            if name not in selected_names and _status(pipeline.stage(name)) != "complete"
        ]
        if missing:
            raise PipelineError(
                f"stage {stage.name!r} reads the output of {', '.join(map(repr, missing))}, which has not completed: "
                f"run the pipeline without --from/--only first"
            )
    try:
        for stage in selected:
            run_stage(stage, pipeline, state, forced=stage.name in forced, hub_api=hub_api)
    except BaseException:
        state.update(status="failed", finished_at=_now())
        save_state(pipeline, state)
        raise
    state.update(status="complete", finished_at=_now(), duration_s=round(time.monotonic() - started, 1))
    save_state(pipeline, state)
    from trellis.report import write_report

    report = write_report(pipeline.output_dir)
    _say(f"\nPipeline {pipeline.name!r} complete in {time.monotonic() - started:.0f} s. Report: {report}")
    return state


def _status(stage: Stage) -> str | None:
    record = read_record(stage.output_dir)
    return record.get("status") if record else None


def run_stage(
    stage: Stage, pipeline: Pipeline, state: dict, forced: bool = False, hub_api: Any = None
) -> None:
    action = decide(stage, pipeline, state, set())
    if forced and action == "skip":
        action = "run"
    position = f"[{stage.index + 1}/{len(pipeline.stages)}] {stage.name}"
    entry = state["stages"].setdefault(stage.name, {})
    if action == "skip":
        _say(f"\n==== {position}: up to date (same config and inputs), skipped ====")
        entry["last_action"] = "skipped"
        save_state(pipeline, state)
        return
    if action == "run" and os.path.exists(stage.output_dir):
        _say(f"{stage.output_dir}: config or inputs changed since it was made; starting it afresh")
        shutil.rmtree(stage.output_dir)
    argv = None if stage.kind == PUBLISH else command(stage, pipeline)
    log = pipeline.log_path(stage)
    entry.clear()
    entry.update(
        stage=stage.kind,
        recipe=stage.recipe,
        resolved_recipe=None if stage.kind == PUBLISH else str(pipeline.resolved_recipe_path(stage)),
        output_dir=stage.output_dir,
        depends_on=stage.depends_on,
        command=shown(argv)
        if argv
        else f"publish {stage.publish.get('model')} -> {stage.publish.get('repo_id')}",
        log=str(log),
        config_hash=config_hash(stage, pipeline),
        inputs=input_fingerprints(stage, pipeline),
        status="running",
        last_action="resumed" if action == "resume" else "ran",
        started_at=_now(),
    )
    save_state(pipeline, state)
    _say(
        f"\n==== {position} ({stage.kind}){' resuming' if action == 'resume' else ''} ====\n$ {entry['command']}\nlog: {log}"
    )
    start = time.monotonic()
    if stage.kind == PUBLISH:
        from trellis.hub import publish_from_pipeline

        publish_from_pipeline(stage, pipeline, state, api=hub_api)
    else:
        returncode = stream(argv, log, {**os.environ, **pipeline.env, **stage.env})
        if returncode != 0:
            entry.update(
                status="failed", returncode=returncode, duration_s=round(time.monotonic() - start, 1)
            )
            save_state(pipeline, state)
            raise PipelineError(
                f"stage {stage.name!r} failed (exit code {returncode})\n  command: {entry['command']}\n  log: {log}"
            )
        if stage.publish:
            from trellis.hub import publish_from_pipeline

            publish_from_pipeline(stage, pipeline, state, api=hub_api)
    record = read_record(stage.output_dir) or {}
    entry.update(
        status=record.get("status", "complete"),
        finished_at=_now(),
        duration_s=round(time.monotonic() - start, 1),
        record_hash=record_hash(stage.output_dir),
        metrics=record.get("metrics", {}),
    )
    save_state(pipeline, state)
    _say(f"==== {stage.name} done in {entry['duration_s']:.0f} s ====")


def stream(argv: list[str], log: Path, env: dict) -> int:
    """Run a command, its output (stdout and stderr) shown as it comes and kept in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        sink.write(f"$ {shown(argv)}\n".encode())
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            while chunk := process.stdout.read1(65536):  # raw chunks keep progress bars (\r) intact
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                sink.write(chunk)
                sink.flush()
        except BaseException:
            process.terminate()
            process.wait()
            raise
        return process.wait()


# --- the dry run -----------------------------------------------------------------------------------------


def print_plan(pipeline: Pipeline, selected: list[Stage], forced: set[str], state: dict) -> None:
    rerunning: set[str] = set()
    for stage in pipeline.stages:
        if stage not in selected:
            _say(f"\n[{stage.index + 1}] {stage.name}: not selected")
            continue
        action = decide(stage, pipeline, state, rerunning)
        if stage.name in forced and action == "skip":
            action = "run"
        if action != "skip":
            rerunning.add(stage.name)
        what = {"skip": "up to date: skipped", "resume": "resumes from its checkpoints", "run": "runs"}[
            action
        ]
        _say(f"\n[{stage.index + 1}] {stage.name} ({stage.kind}): {what}")
        if stage.kind == PUBLISH:
            options = ", ".join(f"{k}={v}" for k, v in stage.publish.items())
            _say(f"  publish {options}")
            continue
        _say(f"  $ {shown(command(stage, pipeline))}")
        if depends := stage.depends_on:
            _say(f"  reads: {', '.join(depends)}")
        estimate = memory_estimate(stage, pipeline)
        if estimate:
            _say("  " + estimate.replace("\n", "\n  "))


def memory_estimate(stage: Stage, pipeline: Pipeline) -> str | None:
    """The per-device training-memory estimate of a training stage, from its model's config (no weights load)."""
    if not stage_kind(stage.kind).trains:
        return None
    try:
        config = model_config(stage, pipeline)
    except Exception as error:  # e.g. a Hub model while offline
        return f"memory estimate unavailable: {error}"
    import torch
    from transformers import AutoModelForCausalLM

    from trellis.memory import estimate_training_memory

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    recipe = stage.resolved
    params = sum(p.numel() for p in model.parameters())
    trainable = params // 100 if recipe.get("use_peft") else params
    sharding, processes = _sharding(stage.accelerate_config)
    bf16 = bool(recipe.get("bf16") or recipe.get("fp16"))
    estimate = estimate_training_memory(
        params=params,
        trainable=trainable,
        param_bytes=2 if recipe.get("dtype") in ("bfloat16", "float16") else 4,
        batch_size=int(recipe.get("per_device_train_batch_size", 8)),
        seq_len=int(_sequence_length(stage, pipeline)),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        activation_bytes=2 if bf16 else 4,
        sharding=sharding,
        world_size=processes,
        activation_checkpointing=bool(recipe.get("activation_checkpointing")),
    )
    lora = " (LoRA: trainable parameters taken as 1%)" if recipe.get("use_peft") else ""
    return (
        f"{params / 1e6:.2f}M parameters, {sharding} sharding over {processes} process(es){lora}\n"
        + estimate.table()
    )


def model_config(stage: Stage, pipeline: Pipeline):
    """The model config a stage trains: its `model_config`, or that of the earlier stage it starts from."""
    from transformers import AutoConfig

    recipe = stage.resolved
    if recipe.get("model_config"):
        spec = recipe["model_config"]
        spec = dict(spec) if isinstance(spec, dict) else json.loads(Path(spec).read_text())
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    source = recipe.get("model_name_or_path")
    for other in reversed(pipeline.stages[: stage.index]):
        if source and _is_within(source, other.output_dir) and other.kind != PUBLISH:
            return model_config(other, pipeline)
    return AutoConfig.from_pretrained(source)


def _sequence_length(stage: Stage, pipeline: Pipeline) -> int:
    """The stage's training sequence length: its max_length, else that of the stage it reads (a data
    stage's block_size, an SFT model's max_length)."""
    for source in reversed(ancestry(stage, pipeline)):
        for key in ("max_length", "block_size"):
            if source.resolved.get(key):
                return source.resolved[key]
    return 1024


def _sharding(accelerate_config: str | None) -> tuple[str, int]:
    if not accelerate_config or not os.path.isfile(accelerate_config):
        return "none", 1
    config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    processes = int(config.get("num_processes") or 1) * int(config.get("num_machines") or 1)
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        return "fsdp", processes
    if kind == "DEEPSPEED":
        stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 0))
        return (f"zero{stage}" if stage else "none"), processes
    return "none", processes


def ancestry(stage: Stage, pipeline: Pipeline) -> list[Stage]:
    """The stage and every stage it reads from, directly or not, in pipeline order."""
    names, queue = set(), [stage.name]
    while queue:
        name = queue.pop()
        if name not in names:
            names.add(name)
            queue += pipeline.stage(name).depends_on
    return [s for s in pipeline.stages if s.name in names]
