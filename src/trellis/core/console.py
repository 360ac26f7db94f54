"""What the console shows: the library messages Trellis knowingly triggers are dropped, nothing else.

Trellis imports bitsandbytes and torchao only where a stage uses them, but the libraries every stage
needs import them anyway: transformers' TrainingArguments imports PEFT, whose helpers import
bitsandbytes, and transformers' model code imports its torchao quantizer, which imports torchao. So
every process, even `trellis validate`, would print the same lines before its own. Each filter below
matches one of those messages exactly (logger and message, or warning category, message and the
module that triggers it), so any other warning of the same library, or the same warning raised from
user code, still shows. `import trellis` installs them, before any of those libraries load.
"""

from __future__ import annotations

import logging
import re
import warnings

_TORCHAO_GPU_KERNELS = re.compile(r"Failed to load \S*/torchao/_C_(mxfp8|cutlass_90a)\S*\.so: .*", re.DOTALL)
_PYTREE_ENUM = (
    "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
    "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release."
)
_BNB_HUB_KERNEL = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
    "`pip install kernels` and the kernels >= 0.11.1"
)


def _torchao_gpu_kernels(record: logging.LogRecord) -> bool:
    # torchao's mxfp8 and SM90 kernels load only on a matching GPU build; int8 weight-only (the
    # quantize stage's torchao method) does not use them.
    return not _TORCHAO_GPU_KERNELS.fullmatch(record.getMessage())


def _torchao_enums(record: logging.LogRecord) -> bool:
    # torchao registers its own enums (KernelPreference, ...) the way torch now deprecates; a user's
    # Enum still warns.
    registered = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return not (record.msg == _PYTREE_ENUM and getattr(registered, "__module__", "").startswith("torchao."))


def _bitsandbytes_hub_kernel(record: logging.LogRecord) -> bool:
    # On AVX512-BF16 CPUs bitsandbytes looks for an optional Hub kernel and falls back to its own.
    return record.msg != _BNB_HUB_KERNEL


# logger name -> filter (False drops the record); each logger is the one the library logs on.
_LOG_FILTERS = {
    "torchao": _torchao_gpu_kernels,
    "torch.utils._pytree": _torchao_enums,
    "bitsandbytes.backends.cpu.ops": _bitsandbytes_hub_kernel,
}


def hide_known_library_noise() -> None:
    """Drop the import-time messages above and the TRL warnings Trellis's recipes and imports trigger."""
    for name, keep in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(keep)  # a no-op when already added
    # ORPO and PPO live in trl.experimental; importing it from Trellis is deliberate. A user's own
    # import (another module) still warns.
    warnings.filterwarnings(
        "ignore",
        message=re.escape("You are importing from 'trl.experimental'."),
        category=UserWarning,  # TRLExperimentalWarning's base; naming it would import TRL here
        module=r"trellis\.",
    )
    # TRL's configs default the deprecated `gradient_checkpointing` alias to True, so transformers
    # warns whenever one is built, whatever the recipe says; the recipe's `activation_checkpointing` decides.
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`gradient_checkpointing` is deprecated"),
        category=FutureWarning,
        module=r"transformers\.training_args$",
    )
    # The Llama and Mistral recipes set TRL's deprecated `pad_token` key, which TRL honours until v2.0
    # (then strict recipe validation rejects it); the warning repeats once per recipe parsed. Only
    # recipes (parsed by TRL's argument parser) are quiet: SFTConfig(pad_token=...) in code warns.
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`pad_token` is deprecated and will be removed in v2.0.0."),
        category=FutureWarning,
        module=r"trl\.scripts\._hf_argparser$",
    )
