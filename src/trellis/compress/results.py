"""The quantization report (quality kept against size, the best variant, of the model and of the smaller
models made from it), its plot, each variant's model card, and their upload to the Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trellis.compress.arguments import QuantizeArguments, QuantVariant
from trellis.compress.measurement import MIB
from trellis.compress.variants import (
    ORIGINAL,
    QuantizationError,
    Source,
    checkpoints,
    logger,
    variant_dir,
)
from trellis.core import hub
from trellis.core.hub import CARD, upload_model
from trellis.core.tables import markdown_table, number

REPORT_JSON, REPORT_MARKDOWN, PLOT = (
    "quantization_report.json",
    "quantization_report.md",
    "quality_vs_size.png",
)


# --- the report ----------------------------------------------------------------------------------------


def retention(value: float | None, original: float | None, higher_is_better: bool) -> float | None:
    """The share of the original's quality a variant keeps: value / original, or original / value for a
    metric where lower is better (perplexity)."""
    if value is None or original is None:
        return None
    numerator, denominator = (value, original) if higher_is_better else (original, value)
    return numerator / denominator if denominator else (1.0 if numerator == denominator else None)


def _ratio(value: float | None, original: float | None) -> float | None:
    return value / original if value is not None and original else None


def build_report(args: QuantizeArguments, results: dict[str, dict]) -> dict:
    """Every checkpoint's measurements, each relative to the original, and the best variant: the smallest
    on disk that keeps at least `min_quality_retention` of the original's `quality_metric`."""
    higher_is_better = {}
    for result in results.values():
        higher_is_better.update(result.get("higher_is_better", {}))
    original = results[ORIGINAL]
    if args.quality_metric not in original["metrics"]:
        raise QuantizationError(
            f"quality_metric {args.quality_metric!r} was not measured; the metrics are: {sorted(original['metrics'])}"
        )
    unquantized = {"method": "none", "dtype": args.dtype}
    made_of = {checkpoint.name: (source, variant) for source, variant, checkpoint in checkpoints(args)}
    rows = {}
    for name, result in results.items():
        resources, base = result["resources"], original["resources"]
        metrics = result["metrics"]
        kept = {
            metric: retention(metrics.get(metric), value, higher_is_better.get(metric, True))
            for metric, value in original["metrics"].items()
        }
        source, variant = made_of[name]
        rows[name] = {
            "model": source.name,
            "settings": unquantized if variant is None else variant.settings(),
            "path": source.path if variant is None else str(variant_dir(args, source, variant)),
            **resources,
            "size_ratio": _ratio(resources["size_bytes"], base["size_bytes"]),
            "load_memory_ratio": _ratio(resources["load_memory_bytes"], base["load_memory_bytes"]),
            "speed_ratio": _ratio(resources["tokens_per_second"], base["tokens_per_second"]),
            "metrics": metrics,
            "retention": kept,
            "quality_retention": kept[args.quality_metric],
        }
    meeting = [
        name
        for name, row in rows.items()
        if name != ORIGINAL
        and row["quality_retention"] is not None
        and row["quality_retention"] >= args.min_quality_retention
    ]
    best = min(meeting, key=lambda n: (rows[n]["size_bytes"], -rows[n]["quality_retention"]), default=None)
    for name, row in rows.items():
        row["meets_threshold"] = name in meeting
    return {
        "model": args.model_name_or_path,
        "quality_metric": args.quality_metric,
        "min_quality_retention": args.min_quality_retention,
        "higher_is_better": higher_is_better,
        "best": best,
        "checkpoints": rows,
    }


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.3g}"


def describe(settings: dict) -> str:
    """A variant's settings in a few words, e.g. 'gptq 4-bit, group 128'."""
    if settings["method"] == "none":
        return f"unquantized ({settings['dtype']})"
    words = [f"{settings['method']} {settings['bits']}-bit"]
    if settings["method"] == "gptq":
        words.append(f"group {settings['group_size']}" if settings["group_size"] != -1 else "per row")
        words += ["act-order"] if settings["desc_act"] else []
    if "quant_type" in settings:
        words.append(settings["quant_type"] + (" double-quant" if settings["double_quant"] else ""))
    if settings["method"] == "bitsandbytes" and settings["bits"] == 8:
        words.append("LLM.int8")
    if settings["method"] == "torchao":
        words.append("int8 weight-only")
    return ", ".join(words)


def markdown(report: dict) -> str:
    """A row per checkpoint: the model it is made of, size, load memory and speed (× the original), every
    metric (with the share of the original kept), and the best variant marked."""
    rows, best = report["checkpoints"], report["best"]
    metrics = sorted(rows[ORIGINAL]["metrics"])
    header = ["variant", "model", "method", "size MiB (×)", "load MiB (×)", "tokens/s (×)", *metrics, "meets"]
    table = []
    for name, row in rows.items():
        cells = [
            f"**{name}** ★" if name == best else name,
            row["model"],
            describe(row["settings"]),
            f"{_mib(row['size_bytes'])} ({number(row['size_ratio'], 3)})",
            f"{_mib(row['load_memory_bytes'])} ({number(row['load_memory_ratio'], 3)})",
            f"{number(row['tokens_per_second'], 3)} ({number(row['speed_ratio'], 3)})",
        ]
        for metric in metrics:
            kept = row["retention"].get(metric)
            share = "" if name == ORIGINAL or kept is None else f" ({kept:.2%})"
            cells.append(number(row["metrics"].get(metric)) + share)
        cells.append("" if name == ORIGINAL else ("yes" if row["meets_threshold"] else "no"))
        table.append(cells)
    threshold = f"{report['min_quality_retention']:.0%} of the original's `{report['quality_metric']}`"
    verdict = (
        f"★ **{best}**: the smallest variant that keeps at least {threshold}."
        if best
        else f"No variant keeps at least {threshold}."
    )
    notes = (
        "(×) is relative to the original; a metric's percentage is the share of the original's quality kept "
        "(variant / original, or original / variant where lower is better)."
    )
    smaller = "Compression" if any(row["model"] != ORIGINAL for row in rows.values()) else "Quantization"
    return (
        f"# {smaller} of {report['model']}\n\n"
        + markdown_table(header, table)
        + f"\n\n{verdict}\n\n{notes}\n"
    )


def plot(report: dict, path: Path) -> None:
    """Quality kept (of the quality metric) against size on disk, a point per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, row in report["checkpoints"].items():
        if row["quality_retention"] is None:
            continue
        x, y = row["size_bytes"] / MIB, 100 * row["quality_retention"]
        best = name == report["best"]
        unquantized = row["settings"]["method"] == "none"
        color = "#d62728" if best else "#9e9e9e" if unquantized else "#3f7fbf"
        axis.scatter([x], [y], s=90 if best else 40, color=color, marker="*" if best else "o", zorder=3)
        axis.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.axhline(
        100 * report["min_quality_retention"], color="#d62728", linestyle="--", linewidth=1, label="threshold"
    )
    axis.set_xlabel("size on disk (MiB)")
    axis.set_ylabel(f"quality kept, % ({report['quality_metric']})")
    axis.set_title("Quality vs size", fontsize=10)
    axis.legend(fontsize=8, loc="lower right")
    axis.margins(x=0.15, y=0.15)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(output_dir: str, report: dict) -> None:
    out = Path(output_dir)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_MARKDOWN).write_text(markdown(report))
    plot(report, out / PLOT)
    logger.info("Quantization report:\n%s", markdown(report))


# --- model cards and publishing ------------------------------------------------------------------------

_METHOD_TEXT = {
    "gptq": "GPTQ (GPTQModel through transformers' `GPTQConfig`): weights rounded to a few bits group by "
    "group, each rounding error compensated on the weights not yet rounded, using calibration text. "
    "Saved in the standard GPTQ format that transformers, vLLM (`vllm serve DIR`) and TGI "
    "(`--quantize gptq`) load.",
    "bitsandbytes": "bitsandbytes: 8-bit LLM.int8 (int8 weights, outlier features in 16-bit) or 4-bit NF4/FP4 "
    "blocks with a per-block scale; no calibration. Loads with transformers (bitsandbytes installed).",
    "torchao": "torchao int8 weight-only: int8 weights with a per-row scale; no calibration. Loads with "
    "transformers (torchao installed).",
}


def model_card(args: QuantizeArguments, source: Source, variant: QuantVariant, report: dict):
    """The variant's README.md: method, settings, and its measured quality and size against the original."""
    from huggingface_hub import ModelCardData

    from trellis.evaluate import comparison

    name = source.variant_name(variant)
    row, original = report["checkpoints"][name], report["checkpoints"][ORIGINAL]
    sources = {p.label: p.path for p in args.perplexity}
    local_input = os.path.exists(source.path)
    data = ModelCardData(
        model_name=name,
        base_model=None if local_input else source.path,
        eval_results=comparison.eval_results(row["metrics"], sources),
        tags=["trellis", "quantized", variant.method, f"{variant.bits}-bit"],
        library_name="transformers",
    )
    settings = markdown_table(["setting", "value"], list(variant.settings().items()))
    kept = "-" if row["quality_retention"] is None else number(100 * row["quality_retention"])
    meets = "meets it" if row["meets_threshold"] else "does not meet it"
    where = f"{args.hub_model_id}-{name}" if args.hub_model_id else str(variant_dir(args, source, variant))
    serve = (
        f"\n\nServe it with vLLM: `vllm serve {where}`, or TGI: `--quantize gptq`."
        if variant.method == "gptq"
        else ""
    )
    sections = {
        "Method": f"{_METHOD_TEXT[variant.method]}\n\n{settings}",
        "Quality and size against the original": (
            f"Quality kept on `{report['quality_metric']}`: **{kept}%** "
            f"(threshold {report['min_quality_retention']:.0%}; {meets}).\n\n"
            + _against_original(row, original)
        ),
        "Use": "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```{serve}',
    }
    summary = f"A quantized version of `{source.path}`, made by the Trellis quantization stage."
    if source.name != ORIGINAL:
        summary += (
            f" That model ({source.name!r}) was made smaller from `{args.model_name_or_path}`, the original."
        )
    return hub.model_card(data, name, sections, summary)


def _against_original(row: dict, original: dict) -> str:
    """Two tables: size, load memory and speed, then every metric with the share of quality kept."""
    sizes = [
        [
            "weights on disk (MiB)",
            _mib(original["size_bytes"]),
            _mib(row["size_bytes"]),
            number(row["size_ratio"], 3),
        ],
        [
            "peak memory to load (MiB)",
            _mib(original["load_memory_bytes"]),
            _mib(row["load_memory_bytes"]),
            number(row["load_memory_ratio"], 3),
        ],
        [
            "tokens/s (greedy, batch 1)",
            *(number(value, 3) for value in (original["tokens_per_second"], row["tokens_per_second"])),
            number(row["speed_ratio"], 3),
        ],
    ]
    quality = [
        [
            metric,
            number(original["metrics"][metric]),
            number(row["metrics"].get(metric)),
            "-" if kept is None else f"{kept:.2%}",
        ]
        for metric, kept in sorted(row["retention"].items())
    ]
    return (
        markdown_table(["", "original", "this variant", "×"], sizes)
        + "\n\n"
        + markdown_table(["metric", "original", "this variant", "quality kept"], quality)
    )


def _variants(args: QuantizeArguments) -> list[tuple[Source, QuantVariant]]:
    return [(source, variant) for source, variant, _ in checkpoints(args) if variant is not None]


def write_model_cards(args: QuantizeArguments, report: dict) -> None:
    for source, variant in _variants(args):
        model_card(args, source, variant, report).save(variant_dir(args, source, variant) / CARD)


def hub_uploads(args: QuantizeArguments) -> list[tuple[str, Path]]:
    """(repository, directory) of every variant: <hub_model_id>-<name>."""
    return [
        (f"{args.hub_model_id}-{source.variant_name(v)}", variant_dir(args, source, v))
        for source, v in _variants(args)
    ]


def push_to_hub(args: QuantizeArguments, api=None) -> None:
    """Upload each variant directory (weights, config, tokenizer) with its model card to its repository."""
    for repo_id, folder in hub_uploads(args):
        card = (folder / CARD).read_text()
        upload_model(
            str(folder), repo_id, card, args.hub_private_repo, None, "Trellis quantization stage", api=api
        )
