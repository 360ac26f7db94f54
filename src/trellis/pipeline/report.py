"""The report card of a pipeline run: `report.md` and a static `report.html`, with PNG plots.

Built from the records alone (`pipeline_run.json` and each stage's `trellis_run.json`, trainer
states, the evaluation and quantization outputs), so `trellis report DIR` rebuilds it any time. Per
stage: the metric it targets before and after (and whether it improved), its other held-out metrics,
the time it took and its training curves; then the evaluation table across checkpoints and the
quantization quality-vs-size plot when those stages ran.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

from trellis.core.errors import TrellisError
from trellis.core.run_record import checkpoints_by_step, machine_summary, read_record
from trellis.core.tables import markdown_table, number
from trellis.evaluate.comparison import RESULTS_JSON, markdown, plot_file_name
from trellis.pipeline.seed_table import SWEEP_DIR, read_sweep
from trellis.pipeline.seed_table import markdown as sweep_markdown
from trellis.pipeline.spec import PIPELINE_RUN
from trellis.pipeline.verdicts import stage_metrics
from trellis.stages import STAGES

REPORT_MARKDOWN, REPORT_HTML, PLOTS = "report.md", "report.html", "report_plots"
QUANTIZATION_PLOT = "quality_vs_size.png"


def trainer_log_history(output_dir: str) -> list[dict]:
    """The training log history: the run record's (online RL stages record their whole run there), else
    output_dir/trainer_state.json, else the newest checkpoint's."""
    recorded = (read_record(output_dir) or {}).get("log_history")
    if recorded:
        return recorded
    candidates = [os.path.join(output_dir, "trainer_state.json")]
    candidates += [os.path.join(c, "trainer_state.json") for c in reversed(checkpoints_by_step(output_dir))]
    for path in candidates:
        if os.path.isfile(path):
            return json.loads(Path(path).read_text()).get("log_history", [])
    return []


# Logged training rewards of the online RL trainers: PPO's score minus its KL penalty; GRPO's and RLOO's mean.
TRAINING_REWARD_KEYS = ("objective/rlhf_reward", "reward")


def plot_training_curves(history: list[dict], title: str, path: Path) -> bool:
    """Training loss (and held-out loss) against the step, or for online RL without a loss the training
    reward; False if there is nothing to plot."""
    curves = {
        "train loss": [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h],
        "held-out loss": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h],
    }
    curves = {name: points for name, points in curves.items() if points}
    y_label = "loss"
    if not curves:
        y_label = "reward"
        curves = {
            f"training reward ({key})": points
            for key in TRAINING_REWARD_KEYS
            if (points := [(h["step"], h[key]) for h in history if key in h and "step" in h])
        }
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, points in curves.items():
        axis.plot(
            [step for step, _ in points],
            [value for _, value in points],
            marker="o" if len(points) < 8 else None,
            markersize=3,
            label=name,
        )
    axis.set_xlabel("step")
    axis.set_ylabel(y_label)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def build_report(pipeline_dir: str) -> tuple[str, list[dict]]:
    """The report as markdown (images as relative paths), and each stage's verdict."""
    state_path = Path(pipeline_dir) / PIPELINE_RUN
    sweep = read_sweep(pipeline_dir)
    if not state_path.exists() and not sweep:
        raise TrellisError(f"{pipeline_dir}: no pipeline_run.json; run `trellis run PIPELINE.yaml` first")
    sweep_lines = (
        [
            sweep_markdown(sweep, heading="##"),
            f"Each seed's own report: `{pipeline_dir}/{SWEEP_DIR}/seed-N/report.md`.",
            "",
        ]
        if sweep
        else []
    )
    if not state_path.exists():  # only a seed sweep ran here
        return "\n".join([f"# Pipeline report: {Path(pipeline_dir).name}", "", *sweep_lines]) + "\n", []
    state = json.loads(state_path.read_text())
    plots = Path(pipeline_dir) / PLOTS
    shutil.rmtree(plots, ignore_errors=True)
    plots.mkdir(parents=True)
    commit = (state.get("git") or {}).get("commit", "unknown")
    lines = [
        f"# Pipeline report: {state.get('name', '')}",
        "",
        f"`{state.get('pipeline')}`: {state.get('status')}, started {state.get('started_at')}, finished "
        f"{state.get('finished_at')}; code commit `{commit}`.",
        "",
    ]
    summary, verdicts, sections = [], [], []
    for name, entry in state.get("stages", {}).items():
        record = read_record(entry["output_dir"]) or {}
        kind = entry.get("stage", record.get("stage"))
        duration = record.get("duration_s", entry.get("duration_s"))
        rows, verdict = stage_metrics(record)
        if verdict:
            verdicts.append({"stage": name, **verdict})
        target = "-"
        if verdict:
            change = "improved" if verdict["improved"] else "NOT improved"
            target = f"{verdict['metric']} {number(verdict['before'])} → {number(verdict['after'])} {change}"
        status = record.get("status", entry.get("status", "-"))
        summary.append([name, kind, status, entry.get("last_action", "-"), number(duration) + " s", target])
        sections.append(_stage_section(name, kind, entry, record, rows, plots))
    header = ["stage", "kind", "status", "this run", "time", "target metric (held-out)"]
    lines += [markdown_table(header, summary), "", *_machine_lines(state), *sections, *sweep_lines]
    return "\n".join(lines) + "\n", verdicts


def _stage_section(name: str, kind: str, entry: dict, record: dict, rows: list, plots: Path) -> str:
    """One stage: where it wrote and from what, its held-out metrics, the records it dropped, its curves."""
    duration = record.get("duration_s", entry.get("duration_s"))
    section = [
        f"## {name} ({kind})",
        "",
        f"Output `{entry['output_dir']}`; {entry.get('last_action', '')} in this run; took {number(duration)} s; "
        f"config hash `{entry.get('config_hash')}`.",
    ]
    if entry.get("resolved_recipe"):
        section.append(
            f"Recipe: `{entry['resolved_recipe']}` (from `{entry.get('recipe')}`); log: `{entry.get('log')}`."
        )
    section.append("")
    if rows:
        section += [markdown_table(["held-out metric", "before", "after", "change"], rows), ""]
    section += _dropped_records(record.get("bad_records"))
    history = trainer_log_history(entry["output_dir"])
    if plot_training_curves(history, f"{name}: training", plots / f"{name}_loss.png"):
        section += [f"![{name} training curves]({PLOTS}/{name}_loss.png)", ""]
    section += _stage_extras(kind, entry["output_dir"], plots, name)
    return "\n".join(section)


def _dropped_records(bad_records: dict | None) -> list[str]:
    """The records the stage's data loading dropped (trellis.data.bad_records), per source and reason."""
    rows = [
        [f"`{source['source']}` ({source['split']})", reason, dropped["count"], source["read"]]
        for source in (bad_records or {}).get("sources", [])
        for reason, dropped in source["dropped"].items()
    ]
    if not rows:
        return []
    return [
        "Records dropped as unusable:",
        "",
        markdown_table(["source", "reason", "dropped", "read"], rows),
        "",
    ]


def _machine_lines(state: dict) -> list[str]:
    """'Machine: ...' naming what produced the stages' records (per stage where they differ, e.g. in threads)."""
    records = {
        name: read_record(entry["output_dir"]) or {} for name, entry in state.get("stages", {}).items()
    }
    records = {name: record for name, record in records.items() if record.get("machine")}
    # Stages that never imported torch (data) say less: name the machine by those that did, if any.
    records = {n: r for n, r in records.items() if "torch_threads" in r["machine"]} or records
    by_stage = {name: machine_summary(r["machine"], r.get("packages")) for name, r in records.items()}
    if not by_stage:
        return []
    if len(set(by_stage.values())) == 1:
        return [f"Machine: {next(iter(by_stage.values()))}.", ""]
    return ["Machines:", "", *(f"- {name}: {summary}" for name, summary in by_stage.items()), ""]


def _stage_extras(kind: str, output_dir: str, plots: Path, name: str) -> list[str]:
    out = Path(output_dir)
    extras: list[str] = []
    if kind == "data" and (out / "data_report.md").exists():
        extras += [f"Data report: `{out / 'data_report.md'}`.", ""]
    if kind == "eval" and (out / RESULTS_JSON).exists():
        result = json.loads((out / RESULTS_JSON).read_text())
        extras += ["Evaluation across checkpoints:", "", markdown(result)]
        for metric in result["metrics"]:
            image = out / "plots" / plot_file_name(metric)
            if image.exists():
                shutil.copy(image, plots / f"{name}_{image.name}")
                extras.append(f"![{metric}]({PLOTS}/{name}_{image.name})")
        extras.append("")
    report = STAGES[kind].report if kind in STAGES else None
    if report and (out / report).exists():
        extras += [(out / report).read_text(), ""]
    if kind == "quantize":
        plot = out / QUANTIZATION_PLOT
        if plot.exists():
            shutil.copy(plot, plots / f"{name}_{plot.name}")
            extras += [f"![quality vs size]({PLOTS}/{name}_{plot.name})", ""]
    return extras


def to_html(markdown_text: str, title: str) -> str:
    """A static page from the report's markdown subset: headings, tables, images, code spans, paragraphs."""
    body, table = [], []

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', text)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)

    def flush_table() -> None:
        if table:
            head, *rows = [row for row in table if not re.fullmatch(r"\|( ?:?-+:? ?\|)+", row)]
            cells = lambda row: [c.strip() for c in row.strip("|").split("|")]  # noqa: E731
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells(head)) + "</tr>")
            body.extend("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in cells(r)) + "</tr>" for r in rows)
            body.append("</table>")
            table.clear()

    for line in markdown_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if match := re.match(r"(#+) (.*)", line):
            level = len(match.group(1))
            body.append(f"<h{level}>{inline(match.group(2))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:32em}"
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_report(pipeline_dir: str) -> str:
    """Write report.md and report.html into the pipeline's output_dir; return the markdown path."""
    text, verdicts = build_report(pipeline_dir)
    out = Path(pipeline_dir)
    (out / REPORT_MARKDOWN).write_text(text)
    (out / REPORT_HTML).write_text(to_html(text, f"Trellis report: {out.name}"))
    (out / "report.json").write_text(json.dumps({"targets": verdicts}, indent=2) + "\n")
    return str(out / REPORT_MARKDOWN)
