"""Models and tokenizers: from the Hub, a local directory, or built from scratch from a config.

Precision, attention implementation, LoRA and QLoRA (4-bit bitsandbytes) come from the recipe's
ModelArguments (TRL's ModelConfig plus Trellis keys). `trust_remote_code` stays off unless the
recipe turns it on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from trellis.core.errors import TrellisError
from trellis.core.recipe import local_path_problem
from trellis.train import parallelism

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ModelError(TrellisError):
    """A model or tokenizer could not be loaded."""


def _check_source(name: str, what: str) -> None:
    # A mistyped local path would otherwise be taken for a Hub id and retried for ~20 s.
    if message := local_path_problem(name, what):
        raise ModelError(message)


def load_tokenizer(model_args, trust_remote_code: bool = False, padding_side: str | None = None):
    from transformers import AutoTokenizer

    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    _check_source(source, "tokenizer directory")
    kwargs = {"padding_side": padding_side} if padding_side else {}
    tokenizer = AutoTokenizer.from_pretrained(
        source,
        revision=model_args.model_revision if source == model_args.model_name_or_path else None,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def config_from_recipe(model_config: dict | str, tokenizer):
    """A transformers config from a config.json path or an inline mapping, sized to the tokenizer."""
    from transformers import AutoConfig

    values = (
        dict(model_config) if isinstance(model_config, dict) else json.loads(Path(model_config).read_text())
    )
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ModelError(f"model_config needs a 'model_type' (e.g. llama); got keys {sorted(values)}")
    config = AutoConfig.for_model(model_type, **values)
    # A model built for a tokenizer must cover its whole vocabulary and agree on special tokens.
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def quantization_config(model_args):
    from trl import get_quantization_config

    return get_quantization_config(model_args)


def kbit_device_map() -> dict | None:
    """Quantized weights are placed at load time: on this process's GPU, or left on the CPU."""
    import torch
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def load_model(
    model_args, tokenizer, training_args=None, model_class=None, trust_remote_code=False, **config_overrides
):
    """Load `model_name_or_path`, or build a fresh model from `model_config` (seeded by the caller).

    Without `training_args` the model is loaded for inference (evaluation). Remote code runs only if
    the stage's config (`training_args.trust_remote_code`) or the caller says so. `config_overrides`
    set config attributes, e.g. `num_labels=1` for a reward model.
    """
    import transformers

    model_class = model_class or transformers.AutoModelForCausalLM
    dtype = torch_dtype(model_args.dtype)
    # No KV cache where training cannot use one: when activations are recomputed, and for packed
    # (padding-free) batches, whose document boundaries in position_ids transformers ignores when a
    # cache is on (attention would leak across documents). Generation (PPO, GRPO) needs it on.
    packed = getattr(training_args, "packing", False) or getattr(training_args, "padding_free", False)
    use_cache = training_args is None or not (training_args.activation_checkpointing or packed)
    trust_remote_code = trust_remote_code or getattr(training_args, "trust_remote_code", False)
    layout = parallelism.training_layout(training_args)
    if model_args.model_config:
        config = config_from_recipe(model_args.model_config, tokenizer)
        config.use_cache = use_cache
        for name, value in config_overrides.items():
            setattr(config, name, value)
        model = model_class.from_config(
            config,
            dtype=None if dtype == "auto" else dtype,
            attn_implementation=model_args.attn_implementation,
        )
        logger.info(
            "Built a new %s model with %.2fM parameters", config.model_type, model.num_parameters() / 1e6
        )
        return parallelism.parallelize(model, layout, training_args)

    _check_source(model_args.model_name_or_path, "model directory")
    kwargs = {}
    quantization = quantization_config(model_args)
    if quantization is not None:
        kwargs = {"quantization_config": quantization, "device_map": kbit_device_map()}
    model = model_class.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=trust_remote_code,
        use_cache=use_cache,
        **kwargs,
        **config_overrides,
    )
    return parallelism.parallelize(model, layout, training_args)


def peft_config(model_args):
    from trl import get_peft_config

    return get_peft_config(model_args)


def merge_adapters(
    output_dir: str,
    model_args,
    tokenizer,
    trust_remote_code: bool = False,
    model_class=None,
    **config_overrides,
) -> None:
    """Replace the adapters in `output_dir` with a full model: base weights (unquantized) + merged LoRA.

    The base is reloaded in the recipe's dtype without quantization, because merging into 4-bit
    weights would round the update away. The adapters are kept in `output_dir/adapter/`.
    """
    import transformers
    from peft import PeftModel

    model_class = model_class or transformers.AutoModelForCausalLM
    base = model_class.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=torch_dtype(model_args.dtype),
        trust_remote_code=trust_remote_code,
        **config_overrides,
    )
    if base.get_input_embeddings().num_embeddings != len(tokenizer):  # tokens added for the chat template
        base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
    adapter_dir = os.path.join(output_dir, "adapter")
    os.makedirs(adapter_dir, exist_ok=True)
    for name in ADAPTER_FILES:
        if os.path.exists(os.path.join(output_dir, name)):
            shutil.move(os.path.join(output_dir, name), os.path.join(adapter_dir, name))
    merged.save_pretrained(output_dir)
    logger.info("Merged LoRA adapters into %s (adapters kept in %s)", output_dir, adapter_dir)
