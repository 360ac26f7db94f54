"""Side by side: one table of every metric for every checkpoint, deltas against the baseline, bar
charts, and the candidate's results as a Hugging Face model card (`model-index`)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from trellis.core import hub
from trellis.core.tables import markdown_table, number

logger = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_MARKDOWN, MODEL_CARD = "results.json", "results.md", "model_card.md"


def comparison(per_checkpoint: dict[str, dict], baseline: str, candidate: str) -> dict:
    """{metric: {checkpoint: value}} plus, for every other checkpoint, its delta against the baseline."""
    names = list(per_checkpoint)
    metric_names = sorted({m for result in per_checkpoint.values() for m in result["metrics"]})
    higher_is_better = {}
    for result in per_checkpoint.values():
        higher_is_better.update(result.get("higher_is_better", {}))
    table = {m: {n: per_checkpoint[n]["metrics"].get(m) for n in names} for m in metric_names}
    deltas = {
        m: {
            n: None if values[n] is None or values[baseline] is None else values[n] - values[baseline]
            for n in names
            if n != baseline
        }
        for m, values in table.items()
    }
    return {
        "checkpoints": names,
        "baseline": baseline,
        "candidate": candidate,
        "metrics": table,
        "delta_vs_baseline": deltas,
        "higher_is_better": higher_is_better,
    }


def markdown(result: dict) -> str:
    """The comparison as a markdown table: a column per checkpoint, then a delta column per non-baseline
    checkpoint, marked better/worse by the metric's direction."""
    names, baseline = result["checkpoints"], result["baseline"]
    others = [n for n in names if n != baseline]
    header = [
        "metric",
        *(f"{n} (baseline)" if n == baseline else n for n in names),
        *(f"Δ {n}" for n in others),
    ]
    rows = []
    for metric, values in result["metrics"].items():
        higher = result["higher_is_better"].get(metric)
        cells = [metric, *(number(values[n]) for n in names)]
        for n in others:
            delta = result["delta_vs_baseline"][metric][n]
            mark = ""
            if delta and higher is not None:
                mark = " ▲" if (delta > 0) == higher else " ▼"
            cells.append(("-" if delta is None else f"{delta:+.4g}") + mark)
        rows.append(cells)
    legend = "▲ better than the baseline, ▼ worse (by each metric's direction)."
    return markdown_table(header, rows) + f"\n\n{legend}\n"


def write_comparison(output_dir: str, result: dict) -> None:
    out = Path(output_dir)
    (out / RESULTS_JSON).write_text(json.dumps(result, indent=2) + "\n")
    (out / RESULTS_MARKDOWN).write_text(markdown(result))
    write_plots(out / "plots", result)
    logger.info("Results:\n%s", markdown(result))


def plot_file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"


def write_plots(directory: Path, result: dict) -> None:
    """One bar chart per metric: a bar per checkpoint, the baseline in grey."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    names, baseline = result["checkpoints"], result["baseline"]
    for metric, values in result["metrics"].items():
        figure, axis = plt.subplots(figsize=(max(3.0, 1.2 * len(names) + 1.5), 3.2))
        heights = [values[n] if values[n] is not None else 0.0 for n in names]
        bars = axis.bar(names, heights, color=["#9e9e9e" if n == baseline else "#3f7fbf" for n in names])
        axis.bar_label(bars, labels=[number(values[n]) for n in names], fontsize=8)
        higher = result["higher_is_better"].get(metric)
        direction = "" if higher is None else (" (higher is better)" if higher else " (lower is better)")
        axis.set_title(metric + direction, fontsize=9)
        axis.margins(y=0.15)
        figure.tight_layout()
        figure.savefig(directory / plot_file_name(metric), dpi=100)
        plt.close(figure)


def eval_results(metrics: dict[str, float], task_sources: dict[str, str]):
    """The candidate's metrics as huggingface_hub EvalResults (the model card's `model-index`)."""
    from huggingface_hub import EvalResult

    results = []
    for name, value in sorted(metrics.items()):
        task, metric = name.split(".", 1)
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=task_sources.get(task, task),
                dataset_name=task,
                metric_type=metric,
                metric_value=round(value, 6),
            )
        )
    return results


def model_card(model_name: str, metrics: dict[str, float], task_sources: dict[str, str], table: str):
    """A model card whose metadata carries the candidate's results in the `model-index` format."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        model_name=model_name,
        eval_results=eval_results(metrics, task_sources),
        tags=["trellis"],
        library_name="transformers",
    )
    return hub.model_card(
        data, model_name, {"Evaluation": f"Measured by the Trellis evaluation stage.\n\n{table}"}
    )


def update_checkpoint_card(directory: str, card) -> None:
    """Put the results into the README.md of the checkpoint directory (what `push_to_hub` publishes),
    keeping an existing card's text and other metadata."""
    from huggingface_hub import ModelCard

    path = Path(directory) / "README.md"
    if path.exists():
        existing = ModelCard.load(path)
        existing.data.model_name = card.data.model_name
        existing.data.eval_results = card.data.eval_results
        card = existing
    card.save(path)
