"""The table of a seed sweep (trellis.pipeline.sweep): every stage's target metric and every evaluation-table
value as median [min, max] over the seeds, read back from each seed's run records."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from trellis.core.errors import TrellisError
from trellis.core.run_record import machine_summary, read_record
from trellis.core.tables import markdown_table, number
from trellis.evaluate.comparison import RESULTS_JSON
from trellis.pipeline.spec import PIPELINE_RUN
from trellis.pipeline.verdicts import stage_metrics

SWEEP_DIR = "seeds"
SWEEP_MARKDOWN, SWEEP_JSON = "sweep.md", "sweep.json"


def seed_dir(output_dir: str, seed: int) -> str:
    return os.path.join(output_dir, SWEEP_DIR, f"seed-{seed}")


def stage_target(record: dict) -> dict | None:
    """The target metric of a stage's run record, before and after: {metric, before, after, improved}.

    The one place the sweep learns a stage's target (the report's, so both always agree)."""
    return stage_metrics(record)[1]


def collect(path: str, output_dir: str, seeds: list[int]) -> dict:
    """Per seed, every stage's target metric and every evaluation-table value, read from the run records."""
    targets: dict[tuple, dict] = {}
    evaluation: dict[tuple, dict] = {}
    changes: dict[tuple, dict] = {}  # (stage, metric, checkpoint): per seed, the change from the baseline
    baselines: dict[str, str] = {}
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
                baselines[name] = table["baseline"]
                for metric, values in table["metrics"].items():
                    for checkpoint, value in values.items():
                        if value is not None:
                            evaluation.setdefault((name, metric, checkpoint), {})[str(seed)] = value
                    for checkpoint, delta in table["delta_vs_baseline"][metric].items():
                        if delta is not None:
                            changes.setdefault((name, metric, checkpoint), {})[str(seed)] = delta
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
        "baselines": baselines,
        "changes": [
            {
                "stage": stage,
                "metric": metric,
                "checkpoint": checkpoint,
                "values": values,
                "summary": _summary(values),
            }
            for (stage, metric, checkpoint), values in changes.items()
        ],
    }


def _summary(values: dict[str, float]) -> dict[str, float]:
    numbers = list(values.values())
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def effect_to_spread(values: dict[str, float]) -> str:
    """The median change over its spread between seeds (max - min): how far a change stands out of the
    noise ('3.2x'); '-' for one seed, '±inf' (or '0') when every seed agrees exactly."""
    summary = _summary(values)
    width = summary["max"] - summary["min"]
    if summary["n"] == 1:
        return "-"
    if not width:  # every seed agrees exactly
        return "0" if not summary["median"] else "inf" if summary["median"] > 0 else "-inf"
    return f"{summary['median'] / width:.1f}x"


def spread(values: dict[str, float]) -> str:
    """'median [min, max]' of the values over seeds."""
    summary = _summary(values)
    if summary["n"] == 1:
        return number(summary["median"])
    return f"{number(summary['median'])} [{number(summary['min'])}, {number(summary['max'])}]"


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
        rows = [
            [row["stage"], row["metric"], spread(row["before"]), spread(row["after"])]
            + [f"{sum(row['improved'].values())}/{len(row['improved'])} seeds"]
            for row in sweep["targets"]
        ]
        header = ["stage", "target metric (held-out)", "before", "after", "improved"]
        lines += [markdown_table(header, rows), ""]
    for stage in dict.fromkeys(row["stage"] for row in sweep["evaluation"]):
        rows = [row for row in sweep["evaluation"] if row["stage"] == stage]
        checkpoints = list(dict.fromkeys(row["checkpoint"] for row in rows))
        cells = {(row["metric"], row["checkpoint"]): spread(row["values"]) for row in rows}
        table = [
            [metric, *(cells.get((metric, c), "-") for c in checkpoints)]
            for metric in dict.fromkeys(row["metric"] for row in rows)
        ]
        lines += [
            f"Evaluation table of stage `{stage}`:",
            "",
            markdown_table(["metric", *checkpoints], table),
            "",
        ]
        lines += _change_table(stage, sweep)
    return "\n".join(lines)


def _change_table(stage: str, sweep: dict) -> list[str]:
    """Each checkpoint's change from the baseline, paired seed by seed: median [min, max], and the median
    over the spread (a change that holds on another machine stands several spreads clear of zero)."""
    rows = [row for row in sweep.get("changes", []) if row["stage"] == stage]
    if not rows or len(sweep["seeds"]) < 2:
        return []
    checkpoints = list(dict.fromkeys(row["checkpoint"] for row in rows))
    cells = {
        (row["metric"], row["checkpoint"]): f"{spread(row['values'])} ({effect_to_spread(row['values'])})"
        for row in rows
    }
    table = [
        [metric, *(cells.get((metric, c), "-") for c in checkpoints)]
        for metric in dict.fromkeys(row["metric"] for row in rows)
    ]
    return [
        f"Change from `{sweep['baselines'][stage]}`, paired by seed: median [min, max] (median / (max - min)):",
        "",
        markdown_table(["metric", *checkpoints], table),
        "",
    ]


def write_sweep(output_dir: str, sweep: dict) -> None:
    out = Path(output_dir) / SWEEP_DIR
    (out / SWEEP_JSON).write_text(json.dumps(sweep, indent=2) + "\n")
    (out / SWEEP_MARKDOWN).write_text(markdown(sweep))


def read_sweep(output_dir: str) -> dict | None:
    path = Path(output_dir) / SWEEP_DIR / SWEEP_JSON
    return json.loads(path.read_text()) if path.exists() else None
