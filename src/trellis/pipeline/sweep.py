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
import os
import re
from pathlib import Path

from trellis.core.recipe import load_recipe_file
from trellis.pipeline.report import write_report
from trellis.pipeline.runner import run_pipeline, say
from trellis.pipeline.seed_table import SWEEP_DIR, SWEEP_MARKDOWN, collect, seed_dir, write_sweep
from trellis.pipeline.spec import PUBLISH, PipelineError, is_within, load_pipeline, strings, write_yaml
from trellis.stages import stage_types

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


def takes_seed(kind: str) -> bool:
    """Whether the stage kind's recipe takes a `seed` key (set by the sweep even where a recipe leaves it
    at its default: a seed left fixed would hide that stage's share of the spread)."""

    return kind != PUBLISH and any(
        "seed" in getattr(cls, "__dataclass_fields__", {}) for cls in stage_types(kind)
    )


def seeded_pipeline_file(path: str, pipeline, seed: int) -> str:
    """Write the pipeline of one seed (outputs moved under seeds/seed-N, `seed` set, publishing dry); its path."""

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

    raw, _ = load_recipe_file(path)
    outputs = {stage.name: stage.output_dir for stage in pipeline.stages if stage.kind != PUBLISH}
    for entry, stage in zip(raw["stages"], pipeline.stages, strict=True):
        written = (
            entry
            if stage.kind == PUBLISH
            else {**load_recipe_file(stage.recipe)[0], **(entry.get("overrides") or {})}
        )
        for key, value in written.items():
            for text in strings(value) if key != "output_dir" else ():
                for name, output in outputs.items():
                    if is_within(text, output):
                        raise PipelineError(
                            f"{path}: stage {stage.name!r} key {key!r} names {text!r}, the output of "
                            f"stage {name!r} written out as a path, so a seed sweep cannot move it; write "
                            f"${{stages.{name}.output_dir}} instead (in the stage's overrides or its recipe)"
                        )


def run_sweep(
    path: str, seeds: list[int], start: str | None = None, only: str | None = None, dry_run: bool = False
) -> dict | None:
    """Run the pipeline once per seed (each a normal, resumable run), then write and return the sweep table."""

    pipeline = load_pipeline(path)  # the user's file first: its problems are named with its own lines
    _check_moved(path, pipeline)
    files = [seeded_pipeline_file(path, pipeline, seed) for seed in seeds]
    for number, (seed, file) in enumerate(zip(seeds, files, strict=True), 1):
        say(f"\n######## seed {seed} ({number}/{len(seeds)}): {file} ########")
        run_pipeline(file, start=start, only=only, dry_run=dry_run)
    if dry_run:
        return None
    sweep = collect(path, pipeline.output_dir, seeds)
    write_sweep(pipeline.output_dir, sweep)
    report = write_report(pipeline.output_dir)
    say(
        f"\nSeed sweep of {len(seeds)} seeds: {Path(pipeline.output_dir) / SWEEP_DIR / SWEEP_MARKDOWN}; report: {report}"
    )
    return sweep
