"""Running a pipeline: every selected stage in order, each a real process whose output is shown and logged,
with `pipeline_run.json` tying every stage to its config hash, input fingerprints, command, log, timings and
metrics; the report is rebuilt after every completed run."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trellis.core import threads
from trellis.core.run_record import git_commit, package_versions, read_record
from trellis.pipeline.plan import (
    accelerate_layout,
    command,
    config_hash,
    decide,
    input_fingerprints,
    print_plan,
    record_hash,
    shown,
)
from trellis.pipeline.publish import publish_from_pipeline
from trellis.pipeline.spec import (
    PIPELINE_RUN,
    PUBLISH,
    Pipeline,
    PipelineError,
    Stage,
    load_pipeline,
    write_yaml,
)
from trellis.stages import stage_kind

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


def say(message: str) -> None:
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
    say(
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
    from trellis.pipeline.report import write_report

    report = write_report(pipeline.output_dir)
    say(f"\nPipeline {pipeline.name!r} complete in {time.monotonic() - started:.0f} s. Report: {report}")
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
    if action == "skip":
        say(f"\n==== {position}: up to date (same config and inputs), skipped ====")
        state["stages"].setdefault(stage.name, {})["last_action"] = "skipped"
        save_state(pipeline, state)
        return
    if action == "run" and os.path.exists(stage.output_dir):
        say(f"{stage.output_dir}: config or inputs changed since it was made; starting it afresh")
        shutil.rmtree(stage.output_dir)
    argv = None if stage.kind == PUBLISH else command(stage, pipeline)
    entry = state["stages"][stage.name] = _running_entry(stage, pipeline, action, argv)
    save_state(pipeline, state)
    resuming = " resuming" if action == "resume" else ""
    say(f"\n==== {position} ({stage.kind}){resuming} ====\n$ {entry['command']}\nlog: {entry['log']}")
    start = time.monotonic()
    if argv:
        env = {**os.environ, **pipeline.env, **stage.env}
        env |= _threads(stage, env, entry)
        returncode = stream(argv, Path(entry["log"]), env)
        if returncode != 0:
            entry.update(
                status="failed", returncode=returncode, duration_s=round(time.monotonic() - start, 1)
            )
            save_state(pipeline, state)
            raise PipelineError(
                f"stage {stage.name!r} failed (exit code {returncode})\n  command: {entry['command']}\n  log: {entry['log']}"
            )
    if stage.publish:  # a publish stage, or a stage with push_to_hub
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
    say(f"==== {stage.name} done in {entry['duration_s']:.0f} s ====")


def _threads(stage: Stage, env: dict[str, str], entry: dict) -> dict[str, str]:
    """Each of the stage's processes gets its share of the cores free now (trellis.core.threads)."""
    accelerate = stage_kind(stage.kind).launcher == "accelerate"
    processes = accelerate_layout(stage.accelerate_config)[1] if accelerate else 1
    chosen = threads.stage_environment(env, processes)
    if chosen:
        entry["threads"] = chosen
        say(
            f"threads: {shlex.join(f'{key}={value}' for key, value in chosen.items())} x {processes} process(es)"
        )
    return chosen


def _running_entry(stage: Stage, pipeline: Pipeline, action: str, argv: list[str] | None) -> dict:
    """The stage's entry in pipeline_run.json as it starts: what runs, with which config and inputs."""
    publishing = (
        f"publish {stage.publish.get('model') or 'the candidate of ' + stage.publish['eval']} -> "
        f"{stage.publish.get('repo_id')}"
        if stage.publish
        else ""
    )
    return dict(
        stage=stage.kind,
        recipe=stage.recipe,
        resolved_recipe=str(pipeline.resolved_recipe_path(stage)) if argv else None,
        output_dir=stage.output_dir,
        depends_on=stage.depends_on,
        command=shown(argv) if argv else publishing,
        log=str(pipeline.log_path(stage)),
        config_hash=config_hash(stage, pipeline),
        inputs=input_fingerprints(stage, pipeline),
        status="running",
        last_action="resumed" if action == "resume" else "ran",
        started_at=_now(),
    )


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
