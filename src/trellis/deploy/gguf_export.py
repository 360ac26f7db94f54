"""GGUF export through llama.cpp's own tools, and the check that each file computes what the original does.

The converter (convert_hf_to_gguf.py and its `conversion` package) and the quantizer (llama-cpp-python's
binding of llama.cpp) come from llama-cpp-python's source release: `make export-tools` builds it and
unpacks the converter into the environment's share/llama.cpp. Trellis adds only the glue: the
architecture check before any work, the pre-tokenizer of a tokenizer trained here (the converter knows
published tokenizers by a hash of their output), and the check that reloads each file in llama.cpp and
compares its next-token logits, perplexity and tokenization with transformers' on held-out text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from trellis.compress.variants import input_fingerprint
from trellis.core.errors import TrellisError
from trellis.core.hashing import content_hash
from trellis.deploy.arguments import CONVERTED_TYPES, ExportArguments

logger = logging.getLogger(__name__)

CONVERTER_DIR = Path(sys.prefix, "share", "llama.cpp")  # where `make export-tools` unpacks the converter
REPORT_NAME = "export_report"  # .md and .json
_SETTINGS = ".export_settings.json"  # what each GGUF file was made from: a rerun keeps the files still valid
_INSTALL = "run `make export-tools` (builds llama-cpp-python and unpacks llama.cpp's converter)"


# Byte-level BPE tokenizers that split with one regex before the byte mapping (tokenizer.json: a Split, then
# ByteLevel without its own regex), by that regex: llama.cpp's name for the split (its llama-vocab.cpp).
_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",  # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",  # Qwen2 and 2.5
}


class ExportError(TrellisError):
    """A model, tokenizer or environment the GGUF export cannot use."""


def converter():
    """llama.cpp's `conversion` package (imported from CONVERTER_DIR)."""
    if not (CONVERTER_DIR / "conversion" / "__init__.py").is_file():
        raise ExportError(f"llama.cpp's GGUF converter is not installed in {CONVERTER_DIR}: {_INSTALL}")
    if str(CONVERTER_DIR) not in sys.path:
        sys.path.insert(0, str(CONVERTER_DIR))
    import conversion

    return conversion


def check_tools() -> None:
    converter()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ExportError(f"llama-cpp-python is not installed: {_INSTALL}") from None


def local_model_dir(model_name_or_path: str) -> Path:
    """The model as a local directory: a Hub id is downloaded (weights, config, tokenizer) to the cache."""
    if os.path.isdir(model_name_or_path):
        return Path(model_name_or_path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    return Path(snapshot_download(model_name_or_path, allow_patterns=patterns))


def check_architecture(model_dir: Path) -> str:
    """The model's architecture, if llama.cpp's converter writes it; else an error naming it."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{model_dir}: no config.json; model_name_or_path must be a transformers model")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    if not architectures:
        raise ExportError(f"{config_path}: names no `architectures`; the converter picks its writer by it")
    supported = converter().TEXT_MODEL_MAP
    if architectures[0] not in supported:
        llama_family = sorted(name for name in supported if "Llama" in name or "Qwen2" in name)
        raise ExportError(
            f"{config_path}: llama.cpp's converter does not support the architecture {architectures[0]!r}; "
            f"it writes {len(supported)} others, among them {', '.join(llama_family[:8])}"
        )
    return architectures[0]


def check_tokenizer(model_dir: Path, tokenizer) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenization (None for a SentencePiece model, which has
    none): the converter's, for a published tokenizer it knows by the hash of its output; else read off
    the tokenizer's pre-tokenizer (GPT-2's byte-level split, as the data stage trains, or a family's split
    regex), for one trained here; else an error, before any file is written."""
    if (model_dir / "tokenizer.model").is_file():
        return None
    quiet = logging.getLogger("hf-to-gguf")
    level, quiet.level = (
        quiet.level,
        logging.ERROR,
    )  # its banner for an unknown hash asks to edit the converter
    try:
        # a method that reads only the tokenizer: called without a model, before any weights load
        return converter().TextModel.get_vocab_base_pre(None, tokenizer)
    except NotImplementedError:
        pass
    finally:
        quiet.setLevel(level)
    config = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if config.get("type") == "ByteLevel" and config.get("use_regex", True):
        return "gpt-2"  # GPT-2's regex split, bytes as characters: what the data stage trains
    steps = config.get("pretokenizers", [])
    if [step.get("type") for step in steps] == ["Split", "ByteLevel"] and not steps[1].get("use_regex"):
        split = _SPLIT_REGEXES.get(steps[0].get("pattern", {}).get("Regex"))
        if split:
            return split  # a family's split, kept by a tokenizer retrained on other text
    raise ExportError(
        f"{model_dir}: llama.cpp does not know this tokenizer's pre-tokenizer ({json.dumps(config)}): it "
        "needs one of the splits it implements (tokenizer.ggml.pre); train the tokenizer with a byte-level "
        "pre-tokenizer, or export a published model whose tokenizer llama.cpp lists"
    )


def convert(model_dir: Path, out: Path, gguf_type: str, pre: str | None) -> None:
    """Write the model as one GGUF file of a converter type (f32, f16, bf16, q8_0): weights, config,
    tokenizer (with `pre`, check_tokenizer's pre-tokenizer), special tokens and chat template."""
    import gguf
    import torch

    conversion = converter()
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    writer = conversion.get_model_class(architecture)

    class Writer(writer):
        model_arch = writer.model_arch

        def get_vocab_base_pre(self, tokenizer) -> str | None:
            return pre

    partial = out.with_name(out.name + ".partial")  # renamed when whole: a killed run leaves no half file
    file_type = getattr(
        gguf.LlamaFileType, "ALL_F32" if gguf_type == "f32" else f"MOSTLY_{gguf_type.upper()}"
    )
    with torch.inference_mode():
        Writer(model_dir, file_type, partial, model_name=out.stem.rsplit("-", 1)[0]).write()
    os.replace(partial, out)


def quantize(source: Path, out: Path, gguf_type: str, threads: int) -> None:
    """Quantize a GGUF file with llama.cpp's quantizer (the `llama-quantize` tool's library call)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = threads
    partial = out.with_name(out.name + ".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        raise ExportError(f"llama.cpp could not quantize {source} to {gguf_type} (its log above says why)")
    os.replace(partial, out)


def file_name(args: ExportArguments, model_dir: Path, gguf_type: str) -> str:
    stem = args.name or Path(os.path.normpath(args.model_name_or_path)).name or model_dir.name
    return f"{stem}-{gguf_type}.gguf"


def write_files(args: ExportArguments, model_dir: Path, pre: str | None) -> dict[str, Path]:
    """Every requested GGUF file, {type: path}; a file made from the same model with the same tools is kept.
    Quantized types are made from the f16 file (written too, and removed after unless requested)."""
    import llama_cpp

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out_dir / _SETTINGS
    made = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    key = content_hash({"model": input_fingerprint(str(model_dir)), "llama_cpp": llama_cpp.__version__})
    paths = {t: out_dir / file_name(args, model_dir, t) for t in args.types}
    needs_f16 = any(t not in CONVERTED_TYPES and made.get(t) != key for t in args.types)
    f16 = out_dir / file_name(args, model_dir, "f16")
    order = (["f16"] if needs_f16 else []) + [t for t in args.types if t != "f16" or not needs_f16]
    for gguf_type in order:
        path = paths.get(gguf_type, f16)
        if made.get(gguf_type) == key and path.exists():
            logger.info("%s is up to date; kept", path)
            continue
        logger.info("Writing %s", path)
        if gguf_type in CONVERTED_TYPES:
            convert(model_dir, path, gguf_type, pre)
        else:
            quantize(f16, path, gguf_type, args.threads or os.cpu_count() or 1)
        made[gguf_type] = key
        settings_path.write_text(json.dumps(made, indent=2) + "\n")
    if "f16" not in args.types and f16.exists():
        f16.unlink()
        made.pop("f16", None)
        settings_path.write_text(json.dumps(made, indent=2) + "\n")
    return paths


def metadata(path: Path) -> dict[str, Any]:
    """What a GGUF file says about its tokenizer and chat template (read with the gguf package)."""
    import gguf

    reader = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    return {
        "architecture": value("general.architecture"),
        "file_type": value("general.file_type"),
        "pre_tokenizer": value("tokenizer.ggml.pre"),
        "chat_template": value("tokenizer.chat_template"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "padding_token_id": value("tokenizer.ggml.padding_token_id"),
        "vocab_size": len(value("tokenizer.ggml.tokens") or []),
    }


def check_texts(args: ExportArguments, tokenizer) -> list[tuple[str, bool]]:
    """The held-out records as the text the model reads, each with whether the chat template rendered it
    (then it holds its special tokens, and encoding it adds none)."""
    from trellis.data.sources import load_mixture

    dataset = load_mixture(args.check_datasets, args.seed, task="messages")
    dataset = dataset.shuffle(seed=args.seed).select(range(min(args.check_samples, len(dataset))))
    if "messages" in dataset.column_names:
        return [(tokenizer.apply_chat_template(r["messages"], tokenize=False), True) for r in dataset]
    return [(r.get("text") or r["prompt"] + r["completion"], False) for r in dataset]


def negative_log_likelihood(logits, ids: list[int]) -> float:
    """Summed over the text's next tokens, from its logits (positions x vocabulary)."""
    import numpy as np

    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum(dtype=np.float64))


def encode(texts: list[tuple[str, bool]], tokenizer) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=not rendered)["input_ids"] for text, rendered in texts]


def check_files(
    args: ExportArguments, paths: dict[str, Path], model_dir: Path, texts: list[tuple[str, bool]], tokenizer
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Reload every GGUF file in llama.cpp and compare it with the original (transformers, float32) on the
        held-out texts: the share of texts llama.cpp tokenizes as transformers does, then, on transformers'
        tokens, the next-token logits (largest and mean absolute difference), the share of positions where
        both pick the same next token, and perplexity. Returns ({type: those}, the original: its perplexity, and
    the texts and tokens checked).
        One text at a time: a 128k-token vocabulary's logits over a long text take half a gigabyte."""
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    full_ids = encode(texts, tokenizer)
    token_ids = [ids[: args.check_max_length] for ids in full_ids]
    longest = max(len(ids) for ids in token_ids)
    threads = args.threads or os.cpu_count() or 1
    engines = {
        gguf_type: llama_cpp.Llama(
            model_path=str(path),
            n_ctx=longest,
            n_batch=longest,
            n_ubatch=longest,
            logits_all=True,
            n_threads=threads,
            verbose=False,
        )
        for gguf_type, path in paths.items()
    }
    original = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=args.trust_remote_code
    ).eval()
    sums = {t: {"largest": 0.0, "absolute": 0.0, "same_top": 0, "nll": 0.0} for t in engines}
    original_nll = 0.0
    for number, ids in enumerate(token_ids, 1):
        with torch.no_grad():
            expected = original(torch.tensor([ids])).logits[0].numpy()
        original_nll += negative_log_likelihood(expected, ids)
        for gguf_type, llm in engines.items():
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            difference = np.abs(logits - expected)
            total = sums[gguf_type]
            total["largest"] = max(total["largest"], float(difference.max()))
            total["absolute"] += float(difference.sum(dtype=np.float64))
            total["same_top"] += int((logits.argmax(-1) == expected.argmax(-1)).sum())
            total["nll"] += negative_log_likelihood(logits, ids)
        if number % 16 == 0:
            logger.info("Checked %d of %d texts", number, len(token_ids))
    positions, predicted = sum(map(len, token_ids)), sum(len(ids) - 1 for ids in token_ids)
    vocabulary = expected.shape[-1]
    checks = {}
    for gguf_type, llm in engines.items():
        same_tokens = sum(
            llm.tokenize(text.encode(), add_bos=not rendered, special=True) == ids
            for (text, rendered), ids in zip(texts, full_ids, strict=True)
        )
        total = sums[gguf_type]
        checks[gguf_type] = {
            "tokenization_agreement": same_tokens / len(texts),
            "max_abs_logit_difference": total["largest"],
            "mean_abs_logit_difference": total["absolute"] / (positions * vocabulary),
            "top1_agreement": total["same_top"] / positions,
            "perplexity": math.exp(total["nll"] / predicted),
        }
    return checks, {
        "perplexity": math.exp(original_nll / predicted),
        "texts": len(texts),
        "tokens": positions,
    }


def parameter_count(model_dir: Path) -> int:
    """Parameters in the model's safetensors files (read from their headers, no weights loaded)."""
    from safetensors import safe_open

    count = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                count += math.prod(weights.get_slice(name).get_shape())
    return count


def build_report(
    args: ExportArguments,
    paths: dict[str, Path],
    checks: dict[str, dict],
    original: dict[str, float],
    parameters: int,
) -> dict[str, Any]:
    """Each file's size and check, and what its metadata says; `original` is check_files' (empty: unchecked)."""
    files = {}
    for gguf_type, path in paths.items():
        size = path.stat().st_size
        row = {"file": path.name, "size_bytes": size, "bits_per_weight": 8 * size / parameters}
        row.update(checks.get(gguf_type, {}))
        if "perplexity" in row:
            row["perplexity_retention"] = original["perplexity"] / row["perplexity"]
        written = metadata(path)
        row["metadata"] = {k: v for k, v in written.items() if k != "chat_template"}
        row["metadata"]["has_chat_template"] = bool(written["chat_template"])
        files[gguf_type] = row
    return {
        "model": args.model_name_or_path,
        "parameters": parameters,
        "original_perplexity": original.get("perplexity"),
        "checked_texts": original.get("texts", 0),
        "checked_tokens": original.get("tokens", 0),
        "files": files,
    }


def report_markdown(report: dict) -> str:
    from trellis.core.tables import markdown_table, number

    header = [
        "type",
        "file",
        "MiB",
        "bits/weight",
        "perplexity",
        "kept",
        "same top-1",
        "max abs Δlogit",
        "mean abs Δlogit",
        "same tokens",
    ]
    rows = []
    for gguf_type, row in report["files"].items():
        kept = row.get("perplexity_retention")
        rows.append(
            [
                gguf_type,
                f"`{row['file']}`",
                number(row["size_bytes"] / 2**20, 3),
                number(row["bits_per_weight"], 3),
                number(row.get("perplexity")),
                "-" if kept is None else f"{kept:.2%}",
                "-" if "top1_agreement" not in row else f"{row['top1_agreement']:.2%}",
                number(row.get("max_abs_logit_difference"), 3),
                number(row.get("mean_abs_logit_difference"), 3),
                "-" if "tokenization_agreement" not in row else f"{row['tokenization_agreement']:.0%}",
            ]
        )
    lines = [
        f"GGUF files of `{report['model']}` ({report['parameters']:,} parameters), reloaded in llama.cpp and "
        f"compared with the original (transformers, float32) on {report['checked_texts']} held-out texts "
        f"({report['checked_tokens']} tokens); original perplexity {number(report['original_perplexity'])}.",
        "",
        markdown_table(header, rows),
    ]
    return "\n".join(lines) + "\n"


def write_report(output_dir: str, report: dict) -> None:
    out = Path(output_dir)
    (out / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{REPORT_NAME}.md").write_text(report_markdown(report))


def model_card(args: ExportArguments, report: dict):
    """The export folder's README.md: the files, how to run them, and how each compares with the original."""
    from huggingface_hub import ModelCardData

    from trellis.core import hub

    local_input = os.path.exists(args.model_name_or_path)
    first = next(iter(report["files"].values()))["file"]
    data = ModelCardData(
        base_model=None if local_input else args.model_name_or_path,
        tags=["trellis", "gguf", "llama.cpp"],
        library_name="gguf",
    )
    sections = {
        "Files and their check against the original": report_markdown(report),
        "Run it": hub.llama_cpp_usage(first),
    }
    summary = (
        f"`{args.model_name_or_path}` in GGUF, for llama.cpp and the engines built on it (Ollama, LM Studio)."
    )
    return hub.model_card(data, f"{Path(first).stem.rsplit('-', 1)[0]} (GGUF)", sections, summary)
