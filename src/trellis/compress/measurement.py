"""Measuring the original and every variant the same way: size on disk, peak memory to load, tokens/s of
greedy generation, and the recipe's perplexity sets and lm-eval tasks through the evaluation stage's code."""

from __future__ import annotations

import time
from pathlib import Path

from trellis.compress.arguments import QuantizeArguments
from trellis.compress.variants import WEIGHT_SUFFIXES, logger
from trellis.core.hashing import content_hash
from trellis.core.memory import reset_peak_rss, rss_kib
from trellis.evaluate.arguments import Checkpoint

MIB = 1024**2


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


def peak_load_memory(load):
    """Load a model and return it with the peak memory the load took, in bytes: GPU memory on a GPU,
    else the rise of the process's peak resident memory. None where it cannot be measured."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model = load()
        return model, torch.cuda.max_memory_allocated() - before
    if not reset_peak_rss():
        return load(), None
    before = rss_kib("VmRSS")
    model = load()
    return model, (rss_kib("VmHWM") - before) * 1024


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
