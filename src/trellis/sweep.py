"""Seed sweeps: the same pipeline once per seed, and one table of what moved, as median [min, max].

    trellis run PIPELINE.yaml --seeds 0-4        # or --seeds 0,2,5

Each seed runs the pipeline as written with two changes: every stage's output_dir moves to
`<output_dir>/seeds/seed-N/<stage>`, and `seed: N` is set in every stage whose recipe takes a seed
(the data stage's split and shuffle included). Publishing is forced to a dry run. The pipeline file of
each seed is written next to its outputs (`seeds/seed-N/pipeline.yaml`), so one seed can be rerun by
hand, and each seed is a normal run: resumed when interrupted, skipped when up to date.

`seeds/sweep.md` and `seeds/sweep.json` then hold every stage's target metric before and after, and
every metric of every evaluation table, over the seeds: a recipe change beats the noise when its
effect is larger than the spread.
"""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
from pathlib import Path

from trellis.errors import TrellisError
from trellis.run_record import machine_summary, read_record

# The pipeline machinery is imported where it runs: `trellis report` reads a sweep without it (and trl).
SWEEP_DIR = "seeds"
SWEEP_MARKDOWN, SWEEP_JSON = "sweep.md", "sweep.json"
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,5' -> [0, 2, 5]; ranges and single seeds mix ('0-2,7')."""
    seeds: list[int] = []
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise ValueError(f"{part.strip()!r} is not a seed or a range of seeds: write e.g. 0-4 or 0,2,5")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"{part.strip()!r}: the range runs backwards; write {last}-{first}")
        seeds += range(first, last + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{text!r} names a seed twice")
    return seeds


def seed_dir(output_dir: str, seed: int) -> str:
    return os.path.join(output_dir, SWEEP_DIR, f"seed-{seed}")


def takes_seed(kind: str) -> bool:
    """Whether the stage kind's recipe takes a `seed` key (set by the sweep even where a recipe leaves it
    at its default: a seed left fixed would hide that stage's share of the spread)."""
    from trellis.config import stage_types
    from trellis.pipeline import PUBLISH

    return kind != PUBLISH and any(
        "seed" in getattr(cls, "__dataclass_fields__", {}) for cls in stage_types(kind)
    )


def seeded_pipeline_file(path: str, pipeline, seed: int) -> str:
    """Write the pipeline of one seed (outputs moved under seeds/seed-N, `seed` set, publishing dry); its path."""
    from trellis.config import load_recipe_file
    from trellis.pipeline import PUBLISH, write_yaml

    raw, _ = load_recipe_file(path)
    raw = copy.deepcopy(raw)
    root = seed_dir(pipeline.output_dir, seed)
    raw.update(name=f"{pipeline.name}-seed-{seed}", output_dir=root)
    # load_pipeline kept every entry, in order
    for entry, stage in zip(raw["stages"], pipeline.stages, strict=True):
        if stage.kind == PUBLISH:
            entry["dry_run"] = True  # one model per seed is for measuring, not for the Hub
            continue
        overrides = dict(entry.get("overrides") or {})
        overrides["output_dir"] = os.path.join(root, stage.name)
        if takes_seed(stage.kind):
            overrides["seed"] = seed
        entry["overrides"] = overrides
        if isinstance(entry.get("push_to_hub"), dict):
            entry["push_to_hub"] = {**entry["push_to_hub"], "dry_run": True}
    seeded = os.path.join(root, "pipeline.yaml")
    write_yaml(seeded, raw)
    return seeded


def _check_moved(path: str, pipeline) -> None:
    """Every stage of a seed must read the outputs of the same seed: a path to another stage's output
    written out in full (not as a `${stages...}` reference) would read the unswept run's."""
    from trellis.config import load_recipe_file
    from trellis.pipeline import PUBLISH, PipelineError, _is_within, _strings

    raw, _ = load_recipe_file(path)
    outputs = {stage.name: stage.output_dir for stage in pipeline.stages if stage.kind != PUBLISH}
    for entry, stage in zip(raw["stages"], pipeline.stages, strict=True):
        written = (
            entry
            if stage.kind == PUBLISH
            else {**load_recipe_file(stage.recipe)[0], **(entry.get("overrides") or {})}
        )
        for key, value in written.items():
            for text in _strings(value) if key != "output_dir" else ():
                for name, output in outputs.items():
                    if _is_within(text, output):
                        raise PipelineError(
                            f"{path}: stage {stage.name!r} key {key!r} names {text!r}, the output of "
                            f"stage {name!r} written out as a path, so a seed sweep cannot move it; write "
                            f"${{stages.{name}.output_dir}} instead (in the stage's overrides or its recipe)"
                        )


def run_sweep(
    path: str, seeds: list[int], start: str | None = None, only: str | None = None, dry_run: bool = False
) -> dict | None:
    """Run the pipeline once per seed (each a normal, resumable run), then write and return the sweep table."""
    from trellis.pipeline import _say, load_pipeline, run_pipeline

    pipeline = load_pipeline(path)  # the user's file first: its problems are named with its own lines
    _check_moved(path, pipeline)
    files = [seeded_pipeline_file(path, pipeline, seed) for seed in seeds]
    for number, (seed, file) in enumerate(zip(seeds, files, strict=True), 1):
        _say(f"\n######## seed {seed} ({number}/{len(seeds)}): {file} ########")
        run_pipeline(file, start=start, only=only, dry_run=dry_run)
    if dry_run:
        return None
    sweep = collect(path, pipeline.output_dir, seeds)
    write_sweep(pipeline.output_dir, sweep)
    from trellis.report import write_report

    report = write_report(pipeline.output_dir)
    _say(
        f"\nSeed sweep of {len(seeds)} seeds: {Path(pipeline.output_dir) / SWEEP_DIR / SWEEP_MARKDOWN}; report: {report}"
    )
    return sweep


# --- the table ----------------------------------------------------------------------------------------------


def stage_target(record: dict) -> dict | None:
    """The target metric of a stage's run record, before and after: {metric, before, after, improved}.

    The one place the sweep learns a stage's target (the report's, so both always agree)."""
    from trellis.report import stage_metrics

    return stage_metrics(record)[1]


def collect(path: str, output_dir: str, seeds: list[int]) -> dict:
    """Per seed, every stage's target metric and every evaluation-table value, read from the run records."""
    from trellis.comparison import RESULTS_JSON
    from trellis.pipeline import PIPELINE_RUN

    targets: dict[tuple, dict] = {}
    evaluation: dict[tuple, dict] = {}
    machines = []  # (machine, packages) of every record
    for seed in seeds:
        state_path = Path(seed_dir(output_dir, seed)) / PIPELINE_RUN
        if not state_path.exists():
            raise TrellisError(f"{state_path}: missing; seed {seed} has not run (run the sweep again)")
        state = json.loads(state_path.read_text())
        for name, entry in state.get("stages", {}).items():
            record = read_record(entry["output_dir"]) or {}
            if record.get("machine"):
                machines.append((record["machine"], record.get("packages")))
            verdict = stage_target(record)
            if verdict:
                row = targets.setdefault((name, entry.get("stage"), verdict["metric"]), {})
                for key in ("before", "after", "improved"):
                    row.setdefault(key, {})[str(seed)] = verdict[key]
            results = Path(entry["output_dir"]) / RESULTS_JSON
            if entry.get("stage") == "eval" and results.exists():
                table = json.loads(results.read_text())
                for metric, values in table["metrics"].items():
                    for checkpoint, value in values.items():
                        if value is not None:
                            evaluation.setdefault((name, metric, checkpoint), {})[str(seed)] = value
    # Named by a stage that ran torch (its threads and kernels), if any did.
    machine, packages = next(
        (m for m in machines if "torch_threads" in m[0]), (machines or [(None, None)])[0]
    )
    return {
        "pipeline": path,
        "seeds": seeds,
        "runs_dir": os.path.join(output_dir, SWEEP_DIR),
        "machine": machine,
        "packages": packages,
        "targets": [
            {
                "stage": stage,
                "kind": kind,
                "metric": metric,
                **values,
                "summary": {when: _summary(values[when]) for when in ("before", "after")},
            }
            for (stage, kind, metric), values in targets.items()
        ],
        "evaluation": [
            {
                "stage": stage,
                "metric": metric,
                "checkpoint": checkpoint,
                "values": values,
                "summary": _summary(values),
            }
            for (stage, metric, checkpoint), values in evaluation.items()
        ],
    }


def _summary(values: dict[str, float]) -> dict[str, float]:
    numbers = list(values.values())
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def spread(values: dict[str, float]) -> str:
    """'median [min, max]' of the values over seeds."""
    summary = _summary(values)
    if summary["n"] == 1:
        return f"{summary['median']:.4g}"
    return f"{summary['median']:.4g} [{summary['min']:.4g}, {summary['max']:.4g}]"


def markdown(sweep: dict, heading: str = "#") -> str:
    """The sweep as markdown: a table of target metrics, then one table per evaluation stage."""
    seeds = sweep["seeds"]
    lines = [
        f"{heading} Seed sweep: {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        f"`{sweep['pipeline']}` once per seed (runs in `{sweep['runs_dir']}/seed-N/`); "
        "each cell is the median [min, max] over the seeds.",
        "",
    ]
    if sweep.get("machine"):
        lines += [f"Machine: {machine_summary(sweep['machine'], sweep.get('packages'))}.", ""]
    if sweep["targets"]:
        lines += [
            "| stage | target metric (held-out) | before | after | improved |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in sweep["targets"]:
            improved = sum(row["improved"].values())
            lines.append(
                f"| {row['stage']} | {row['metric']} | {spread(row['before'])} | {spread(row['after'])} "
                f"| {improved}/{len(row['improved'])} seeds |"
            )
        lines.append("")
    for stage in dict.fromkeys(row["stage"] for row in sweep["evaluation"]):
        rows = [row for row in sweep["evaluation"] if row["stage"] == stage]
        checkpoints = list(dict.fromkeys(row["checkpoint"] for row in rows))
        cells = {(row["metric"], row["checkpoint"]): spread(row["values"]) for row in rows}
        lines += [
            f"Evaluation table of stage `{stage}`:",
            "",
            "| metric | " + " | ".join(checkpoints) + " |",
            "| --- |" + " --- |" * len(checkpoints),
        ]
        for metric in dict.fromkeys(row["metric"] for row in rows):
            lines.append(
                f"| {metric} | " + " | ".join(cells.get((metric, c), "-") for c in checkpoints) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def write_sweep(output_dir: str, sweep: dict) -> None:
    out = Path(output_dir) / SWEEP_DIR
    (out / SWEEP_JSON).write_text(json.dumps(sweep, indent=2) + "\n")
    (out / SWEEP_MARKDOWN).write_text(markdown(sweep))


def read_sweep(output_dir: str) -> dict | None:
    path = Path(output_dir) / SWEEP_DIR / SWEEP_JSON
    return json.loads(path.read_text()) if path.exists() else None
