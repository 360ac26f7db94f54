"""Quantized variants of a trained model, and what each costs in quality and saves in size.

Each variant is made by loading the model with a transformers quantization config (GPTQConfig, which
runs GPTQModel on calibration text; BitsAndBytesConfig; TorchAoConfig) and saved as a model directory
that `AutoModelForCausalLM.from_pretrained` loads. A variant is written to `<name>.partial/` and renamed
into place when complete, so a directory named after a variant is always whole; a rerun keeps it if its
settings and input are unchanged. The original and every variant are then measured the same way: size
on disk, peak memory to load, tokens/s of greedy generation, and the recipe's perplexity sets and lm-eval
tasks through the evaluation stage's code, each relative to the original.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from trellis.core.errors import TrellisError
from trellis.core.hashing import content_hash
from trellis.core.recipe import local_path_problem
from trellis.core.tables import markdown_table, number
from trellis.evaluate.arguments import Checkpoint
from trellis.quantize.arguments import QuantizeArguments, QuantVariant

logger = logging.getLogger(__name__)

ORIGINAL = "original"
VARIANT_RECORD = "trellis_quantization.json"  # in each variant directory: what made it
REPORT_JSON, REPORT_MARKDOWN, PLOT = (
    "quantization_report.json",
    "quantization_report.md",
    "quality_vs_size.png",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MIB = 1024**2


class QuantizationError(TrellisError):
    """A variant cannot be made as the recipe asks."""


# --- checks before anything heavy loads --------------------------------------------------------------


def check_input(args: QuantizeArguments) -> None:
    if message := local_path_problem(args.model_name_or_path, "model directory"):
        raise QuantizationError(f"model_name_or_path: {message}")


def quantized_layer_widths(args: QuantizeArguments) -> dict[str, int]:
    """Input width of every linear layer GPTQ quantizes (those inside the transformer blocks), read from
    the model's config on the meta device, without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    output_layer = model.get_output_embeddings()
    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output_layer
    }


def check_group_sizes(args: QuantizeArguments, widths: dict[str, int]) -> None:
    """Every GPTQ group must fit its layers: a group size that does not divide a layer's input width
    leaves a ragged group that GPTQ kernels (and vLLM) cannot pack."""
    problems = []
    for variant in args.variants:
        group_size = variant.setting("group_size") if variant.method == "gptq" else -1
        if group_size == -1:
            continue
        ragged = {name: width for name, width in widths.items() if width % group_size}
        if ragged:
            distinct = sorted(set(widths.values()))
            fits = [size for size in (32, 64, 128, 256) if all(w % size == 0 for w in distinct)]
            examples = ", ".join(f"{name} ({width})" for name, width in list(ragged.items())[:3])
            problems.append(
                f"variant {variant.name!r}: group_size {group_size} does not divide the input width of "
                f"{len(ragged)} layer(s), e.g. {examples}; the layer widths are {distinct}. Use a group size "
                f"that divides them all ({', '.join(map(str, fits)) or 'none of 32-256 does'}), or -1 "
                "(one group per row)"
            )
    if problems:
        raise QuantizationError("\n  ".join(["group sizes:", *problems]))


# --- making a variant ----------------------------------------------------------------------------------


def input_fingerprint(args: QuantizeArguments) -> dict:
    """The input model: a local directory by its files' sizes and modification times, a Hub id by name."""
    path = Path(args.model_name_or_path)
    if not path.is_dir():
        return {"model": args.model_name_or_path}
    # Later stages write into the model's card and run record; neither changes the weights.
    files = {
        f.name: [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(path.iterdir())
        if f.is_file() and f.name not in ("README.md", "trellis_run.json")
    }
    return {"model": str(path.resolve()), "files": content_hash(files)}


def variant_key(args: QuantizeArguments, variant: QuantVariant) -> str:
    """Changes when the input model, the variant's settings or (for GPTQ) the calibration data change."""
    state = {"input": input_fingerprint(args), "settings": variant.settings(), "dtype": args.dtype}
    if variant.method == "gptq":
        state["calibration"] = {
            "datasets": [vars(source) for source in args.calibration_datasets],
            "samples": args.calibration_samples,
            "max_length": args.calibration_max_length,
            "seed": args.seed,
        }
    return content_hash(state)


def variant_dir(args: QuantizeArguments, variant: QuantVariant) -> Path:
    return Path(args.output_dir) / variant.name


def is_complete(args: QuantizeArguments, variant: QuantVariant) -> bool:
    """The variant's directory holds a finished variant made from the same input with the same settings."""
    record = variant_dir(args, variant) / VARIANT_RECORD
    return record.is_file() and json.loads(record.read_text()).get("key") == variant_key(args, variant)


def load_tokenizer(args: QuantizeArguments):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)


def calibration_data(args: QuantizeArguments, tokenizer) -> list[dict]:
    """`calibration_samples` records drawn with the seed, as token ids of at most `calibration_max_length`.
    Conversations are rendered with the model's chat template, as the model will see them."""
    import torch

    from trellis.data.sources import DataError, load_mixture

    dataset = load_mixture(args.calibration_datasets, args.seed, task="messages")
    dataset = dataset.shuffle(seed=args.seed).select(range(min(args.calibration_samples, len(dataset))))
    if "messages" in dataset.column_names and not tokenizer.chat_template:
        raise DataError(
            "calibration_datasets hold conversations but the model's tokenizer has no chat template"
        )
    samples = []
    for record in dataset:
        # A rendered conversation holds its special tokens: the template writes BOS (Llama 3, Gemma,
        # Mistral), so encoding it must not add a second one, as the model never sees two.
        rendered = "messages" in record
        if rendered:
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        else:
            text = record.get("text") or record["prompt"] + record["completion"]
        ids = tokenizer(
            text, truncation=True, max_length=args.calibration_max_length, add_special_tokens=not rendered
        )["input_ids"]
        if ids:
            samples.append(
                {
                    "input_ids": torch.tensor([ids]),
                    "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                }
            )
    logger.info(
        "Calibration: %d records, %d tokens", len(samples), sum(s["input_ids"].shape[1] for s in samples)
    )
    return samples


def quantization_config(variant: QuantVariant, calibration: list[dict] | None, tokenizer):
    """The transformers quantization config that makes the variant when the model is loaded with it."""
    import torch
    import transformers

    if variant.method == "gptq":
        return transformers.GPTQConfig(
            bits=variant.bits,
            group_size=variant.setting("group_size"),
            desc_act=variant.setting("desc_act"),
            sym=variant.setting("sym"),
            damp_percent=variant.setting("damp_percent"),
            dataset=calibration,
            tokenizer=tokenizer,
            model_seqlen=max(sample["input_ids"].shape[1] for sample in calibration),
        )
    if variant.method == "bitsandbytes" and variant.bits == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if variant.method == "bitsandbytes":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=variant.setting("quant_type"),
            bnb_4bit_use_double_quant=variant.setting("double_quant"),
            bnb_4bit_compute_dtype=getattr(torch, variant.setting("compute_dtype")),
        )
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


def _gptq_for_serving(model) -> None:
    """GPTQModel quantizes in its internal `gptq_v2` layout; vLLM and TGI read the standard `gptq` (v1)
    layout, which transformers also loads. The calibration records stay out of config.json."""
    from gptqmodel.utils.model import hf_convert_gptq_v2_to_v1_format

    quantizer = model.hf_quantizer.optimum_quantizer
    _, converted = hf_convert_gptq_v2_to_v1_format(
        model, quantizer.sym, quantizer.bits, quantizer.quant_linear, quantizer.format, quantizer.meta
    )
    config = model.config.quantization_config
    if converted:
        config.format = "gptq"
    config.dataset, config.tokenizer = None, None


def quantize_variant(args: QuantizeArguments, variant: QuantVariant, tokenizer, calibration) -> Path:
    """Make the variant and save it to output_dir/<name>/, written whole or not at all."""
    from transformers import AutoModelForCausalLM

    from trellis.train.models import kbit_device_map, torch_dtype

    final = variant_dir(args, variant)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("Quantizing %r: %s", variant.name, variant.settings())
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        quantization_config=quantization_config(variant, calibration, tokenizer),
        dtype=torch_dtype(args.dtype),
        device_map=kbit_device_map(),
        trust_remote_code=args.trust_remote_code,
    )
    seconds = time.monotonic() - start
    if variant.method == "gptq":
        _gptq_for_serving(model)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    record = {"key": variant_key(args, variant), "settings": variant.settings(), "seconds": round(seconds, 1)}
    record["input"] = input_fingerprint(args)
    (partial / VARIANT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    logger.info("Saved %r to %s (%.1f s)", variant.name, final, seconds)
    return final


# --- measuring -------------------------------------------------------------------------------------------


def checkpoints(args: QuantizeArguments) -> list[Checkpoint]:
    """The original and every variant, as the evaluation stage's checkpoints."""
    return [
        Checkpoint(name=ORIGINAL, path=args.model_name_or_path),
        *(Checkpoint(name=v.name, path=str(variant_dir(args, v))) for v in args.variants),
    ]


def weights_size(path: str) -> int:
    """Bytes of weight files on disk (a Hub model: those of its files in the local cache)."""
    directory = Path(path)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(path, allow_patterns=["*.safetensors"]))
    files = [f for f in directory.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    # A repository that ships both formats holds the weights twice: count the safetensors copy.
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    return sum(f.stat().st_size for f in safetensors or files)


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def peak_load_memory(load):
    """Load a model and return it with the peak memory the load took, in bytes: GPU memory on a GPU,
    else the rise of the process's peak resident memory (Linux resets the peak on request). None
    where it cannot be measured."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model = load()
        return model, torch.cuda.max_memory_allocated() - before
    if not sys.platform.startswith("linux"):
        return load(), None
    # Hand memory freed by earlier loads back to the system (glibc), so that this load shows in the peak.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak resident set size
    except OSError:  # a kernel or sandbox without it: no peak to read
        return load(), None
    before = _rss_kib("VmRSS")
    model = load()
    return model, (_rss_kib("VmHWM") - before) * 1024


def generation_speed(model, tokenizer, new_tokens: int) -> float:
    """Tokens/s of greedy generation at batch size 1, after a warm-up."""
    import torch

    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt = torch.tensor([[start_id]], device=next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {"do_sample": False, "pad_token_id": pad}
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **settings)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def measure_resources(args: QuantizeArguments, checkpoint: Checkpoint, tokenizer) -> dict:
    """Size on disk, peak memory to load and generation speed of one checkpoint. Call it after the
    checkpoint's evaluation, whose load did the one-time imports of the method's library."""
    import gc

    from transformers import AutoModelForCausalLM

    from trellis.train.models import kbit_device_map, torch_dtype

    def load():
        return AutoModelForCausalLM.from_pretrained(
            checkpoint.path,
            dtype=torch_dtype(args.dtype),
            device_map=kbit_device_map(),
            trust_remote_code=args.trust_remote_code,
        )

    gc.collect()
    model, peak = peak_load_memory(load)
    speed = generation_speed(model, tokenizer, args.generation_tokens)
    del model
    gc.collect()
    return {
        "size_bytes": weights_size(checkpoint.path),
        "load_memory_bytes": peak,
        "tokens_per_second": speed,
    }


def measure(args: QuantizeArguments, checkpoint: Checkpoint, tokenizer, manager) -> dict:
    """Resources, perplexity and tasks of one checkpoint, kept in output_dir/checkpoints/<name>.json
    with the evaluation stage's fingerprint, so a rerun measures only what changed."""
    from trellis.evaluate import evaluation

    eval_args = args.eval_arguments([checkpoint])
    key = content_hash(
        {"eval": evaluation.fingerprint(eval_args, checkpoint), "tokens": args.generation_tokens}
    )
    cached = evaluation.cached_metrics(args.output_dir, checkpoint, key)
    if cached is not None:
        logger.info("%r already measured with these settings", checkpoint.name)
        return cached
    logger.info("Measuring %r (%s)", checkpoint.name, checkpoint.path)
    scores = evaluation.evaluate_checkpoint(eval_args, checkpoint, manager)
    result = {"resources": measure_resources(args, checkpoint, tokenizer), **scores}
    evaluation.save_metrics(args.output_dir, checkpoint, key, result)
    return result


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
    settings = {ORIGINAL: {"method": "none", "dtype": args.dtype}} | {
        v.name: v.settings() for v in args.variants
    }
    rows = {}
    for name, result in results.items():
        resources, base = result["resources"], original["resources"]
        metrics = result["metrics"]
        kept = {
            metric: retention(metrics.get(metric), value, higher_is_better.get(metric, True))
            for metric, value in original["metrics"].items()
        }
        rows[name] = {
            "settings": settings[name],
            "path": str(variant_dir(args, next(v for v in args.variants if v.name == name)))
            if name != ORIGINAL
            else args.model_name_or_path,
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
    """A row per checkpoint: size, load memory and speed (× the original), every metric (with the share of
    the original kept), and the best variant marked."""
    rows, best = report["checkpoints"], report["best"]
    metrics = sorted(rows[ORIGINAL]["metrics"])
    header = ["variant", "method", "size MiB (×)", "load MiB (×)", "tokens/s (×)", *metrics, "meets"]
    table = []
    for name, row in rows.items():
        cells = [
            f"**{name}** ★" if name == best else name,
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
    return (
        f"# Quantization of {report['model']}\n\n"
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
        color = "#9e9e9e" if name == ORIGINAL else "#d62728" if best else "#3f7fbf"
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


def model_card(args: QuantizeArguments, variant: QuantVariant, report: dict):
    """The variant's README.md: method, settings, and its measured quality and size against the original."""
    from huggingface_hub import ModelCard, ModelCardData

    from trellis.evaluate import comparison

    row, original = report["checkpoints"][variant.name], report["checkpoints"][ORIGINAL]
    sources = {p.label: p.path for p in args.perplexity}
    local_input = os.path.exists(args.model_name_or_path)
    data = ModelCardData(
        model_name=variant.name,
        base_model=None if local_input else args.model_name_or_path,
        eval_results=comparison.eval_results(row["metrics"], sources),
        tags=["trellis", "quantized", variant.method, f"{variant.bits}-bit"],
        library_name="transformers",
    )
    settings = "\n".join(f"| {key} | {value} |" for key, value in variant.settings().items())
    quality = "\n".join(
        f"| {metric} | {number(original['metrics'][metric])} | {number(row['metrics'].get(metric))} | "
        f"{'-' if kept is None else f'{kept:.2%}'} |"
        for metric, kept in sorted(row["retention"].items())
    )
    where = f"{args.hub_model_id}-{variant.name}" if args.hub_model_id else str(variant_dir(args, variant))
    serve = (
        f"\nServe it with vLLM: `vllm serve {where}`, or TGI: `--quantize gptq`.\n"
        if variant.method == "gptq"
        else ""
    )
    body = f"""# {variant.name}

A quantized version of `{args.model_name_or_path}`, made by the Trellis quantization stage.

## Method

{_METHOD_TEXT[variant.method]}

| setting | value |
|---|---|
{settings}

## Quality and size against the original

Quality kept on `{report["quality_metric"]}`: **{number(100 * row["quality_retention"]) if row["quality_retention"] is not None else "-"}%**
(threshold {report["min_quality_retention"]:.0%}; {"meets it" if row["meets_threshold"] else "does not meet it"}).

| | original | this variant | × |
|---|---|---|---|
| weights on disk (MiB) | {_mib(original["size_bytes"])} | {_mib(row["size_bytes"])} | {number(row["size_ratio"], 3)} |
| peak memory to load (MiB) | {_mib(original["load_memory_bytes"])} | {_mib(row["load_memory_bytes"])} | {number(row["load_memory_ratio"], 3)} |
| tokens/s (greedy, batch 1) | {number(original["tokens_per_second"], 3)} | {number(row["tokens_per_second"], 3)} | {number(row["speed_ratio"], 3)} |

| metric | original | this variant | quality kept |
|---|---|---|---|
{quality}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
```
{serve}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_cards(args: QuantizeArguments, report: dict) -> None:
    for variant in args.variants:
        model_card(args, variant, report).save(variant_dir(args, variant) / "README.md")


def hub_uploads(args: QuantizeArguments) -> list[tuple[str, Path]]:
    """(repository, directory) of every variant: <hub_model_id>-<name>."""
    return [(f"{args.hub_model_id}-{v.name}", variant_dir(args, v)) for v in args.variants]


def push_to_hub(args: QuantizeArguments) -> None:
    """Upload each variant directory (weights, config, tokenizer, model card) to its repository; the
    token comes from HF_TOKEN or `hf auth login`."""
    from huggingface_hub import create_repo, upload_folder

    for repo_id, folder in hub_uploads(args):
        create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Trellis quantization stage")
        logger.info("Pushed %s to %s", folder, repo_id)
