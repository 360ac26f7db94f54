"""Quantized variants of a trained model (and of the smaller models made from it, pruned or distilled), and
what each costs in quality and saves in size.

Each variant is made by loading the model with a transformers quantization config (GPTQConfig, which
runs GPTQModel on calibration text; BitsAndBytesConfig; TorchAoConfig) and saved as a model directory
that `AutoModelForCausalLM.from_pretrained` loads. A variant is written to `<name>.partial/` and renamed
into place when complete, so a directory named after a variant is always whole; a rerun keeps it if its
settings and input are unchanged. The original and every variant are then measured the same way: size
on disk, peak memory to load, tokens/s of greedy generation, and the recipe's perplexity sets and lm-eval
tasks through the evaluation stage's code, each relative to the original.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trellis.compress.arguments import QuantizeArguments, QuantVariant
from trellis.core.errors import TrellisError
from trellis.core.hashing import content_hash
from trellis.core.recipe import local_path_problem
from trellis.evaluate.arguments import Checkpoint

logger = logging.getLogger(__name__)

ORIGINAL = "original"
VARIANT_RECORD = "trellis_quantization.json"  # in each variant directory: what made it
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class QuantizationError(TrellisError):
    """A variant cannot be made as the recipe asks."""


# --- checks before anything heavy loads --------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A model the variants are made of: the original, or a smaller model made from it."""

    name: str
    path: str
    variants: tuple[QuantVariant, ...]

    def variant_name(self, variant: QuantVariant) -> str:
        return variant.name if self.name == ORIGINAL else f"{self.name}-{variant.name}"


def sources(args: QuantizeArguments) -> list[Source]:
    """The original, then each compressed model, with the variants to make of each."""
    original = Source(ORIGINAL, args.model_name_or_path, tuple(args.variants))
    return [
        original,
        *(
            Source(
                m.name, m.path, tuple(v for v in args.variants if m.variants is None or v.name in m.variants)
            )
            for m in args.compressed_models
        ),
    ]


def check_input(args: QuantizeArguments) -> None:
    if message := local_path_problem(args.model_name_or_path, "model directory"):
        raise QuantizationError(f"model_name_or_path: {message}")
    for index, model in enumerate(args.compressed_models):
        if message := local_path_problem(model.path, "model directory"):
            raise QuantizationError(f"compressed_models[{index}].path: {message}")


def quantized_layer_widths(path: str, trust_remote_code: bool) -> dict[str, int]:
    """Input width of every linear layer GPTQ quantizes (those inside the transformer blocks), read from
    the model's config on the meta device, without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    output_layer = model.get_output_embeddings()
    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output_layer
    }


def check_group_sizes(source: Source, widths: dict[str, int]) -> None:
    """Every GPTQ group must fit its layers: a group size that does not divide a layer's input width
    leaves a ragged group that GPTQ kernels (and vLLM) cannot pack."""
    problems = []
    for variant in source.variants:
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
        model = "" if source.name == ORIGINAL else f" of {source.name!r}"
        raise QuantizationError("\n  ".join([f"group sizes{model}:", *problems]))


# --- making a variant ----------------------------------------------------------------------------------


def input_fingerprint(model_name_or_path: str) -> dict:
    """The input model: a local directory by its files' sizes and modification times, a Hub id by name."""
    path = Path(model_name_or_path)
    if not path.is_dir():
        return {"model": model_name_or_path}
    # Later stages write into the model's card and run record; neither changes the weights.
    files = {
        f.name: [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(path.iterdir())
        if f.is_file() and f.name not in ("README.md", "trellis_run.json")
    }
    return {"model": str(path.resolve()), "files": content_hash(files)}


def variant_key(args: QuantizeArguments, source: Source, variant: QuantVariant) -> str:
    """Changes when the input model, the variant's settings or (for GPTQ) the calibration data change."""
    state = {"input": input_fingerprint(source.path), "settings": variant.settings(), "dtype": args.dtype}
    if variant.method == "gptq":
        state["calibration"] = {
            "datasets": [vars(source) for source in args.calibration_datasets],
            "samples": args.calibration_samples,
            "max_length": args.calibration_max_length,
            "seed": args.seed,
        }
    return content_hash(state)


def variant_dir(args: QuantizeArguments, source: Source, variant: QuantVariant) -> Path:
    return Path(args.output_dir) / source.variant_name(variant)


def is_complete(args: QuantizeArguments, source: Source, variant: QuantVariant) -> bool:
    """The variant's directory holds a finished variant made from the same input with the same settings."""
    record = variant_dir(args, source, variant) / VARIANT_RECORD
    return record.is_file() and json.loads(record.read_text()).get("key") == variant_key(
        args, source, variant
    )


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


def quantize_variant(
    args: QuantizeArguments, source: Source, variant: QuantVariant, tokenizer, calibration
) -> Path:
    """Make the variant of the source model and save it to output_dir/<name>/, written whole or not at all."""
    from transformers import AutoModelForCausalLM

    from trellis.train.models import kbit_device_map, torch_dtype

    final = variant_dir(args, source, variant)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("Quantizing %r: %s", final.name, variant.settings())
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
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
    record = {
        "key": variant_key(args, source, variant),
        "settings": variant.settings(),
        "seconds": round(seconds, 1),
        "input": input_fingerprint(source.path),
    }
    (partial / VARIANT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    logger.info("Saved %r to %s (%.1f s)", final.name, final, seconds)
    return final


def checkpoints(args: QuantizeArguments) -> list[tuple[Source, QuantVariant | None, Checkpoint]]:
    """Each source model, then its variants, as the evaluation stage's checkpoints, with what each is made
    of: the source, and the variant (None for the source itself)."""
    return [
        made
        for source in sources(args)
        for made in (
            (source, None, Checkpoint(name=source.name, path=source.path)),
            *(
                (source, v, Checkpoint(name=source.variant_name(v), path=str(variant_dir(args, source, v))))
                for v in source.variants
            ),
        )
    ]
