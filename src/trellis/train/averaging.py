"""Checkpoint averaging: the (weighted) mean of the weights of several checkpoints of one run."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from trellis.core.errors import TrellisError
from trellis.core.run_record import checkpoints_by_step

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
FSDP_SHARDED_MODEL = (
    "pytorch_model_fsdp_0"  # accelerate's sharded model checkpoint (torch.distributed.checkpoint)
)
# What makes a checkpoint directory a loadable model besides its weights.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def last_checkpoints(run_dir: str, count: int) -> list[str]:
    checkpoints = checkpoints_by_step(run_dir)
    if len(checkpoints) < count:
        raise TrellisError(
            f"{run_dir} has {len(checkpoints)} complete checkpoint(s), fewer than the {count} to "
            "average; keep more with save_total_limit"
        )
    return checkpoints[-count:]


def checkpoint_weights(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's full weights: its model.safetensors, or its sharded FSDP checkpoint read whole."""
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(path, WEIGHTS)):
        return load_file(os.path.join(path, WEIGHTS))
    sharded = os.path.join(path, FSDP_SHARDED_MODEL)
    if not os.path.isdir(sharded):
        raise TrellisError(f"{path}: neither {WEIGHTS} nor a sharded FSDP checkpoint ({FSDP_SHARDED_MODEL}/)")
    # What torch's dcp_to_torch_save does, kept in memory and in this one process (no collectives).
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(
        state, storage_reader=FileSystemReader(sharded), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    return state["model"]


def stored_weight_names(model_dir: str) -> set[str]:
    """The tensor names of a model directory's safetensors weights (one file or an index of shards)."""
    index = os.path.join(model_dir, WEIGHTS + ".index.json")
    if os.path.isfile(index):
        return set(json.loads(Path(index).read_text())["weight_map"])
    if not os.path.isfile(os.path.join(model_dir, WEIGHTS)):
        return set()
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, WEIGHTS), framework="pt") as weights:
        return set(weights.keys())


def average_checkpoints(
    checkpoints: list[str],
    output_dir: str,
    weights: list[float] | None = None,
    model_files_from: str | None = None,
) -> str:
    """Write the weighted average of the checkpoints' weights as a model directory; weights default to uniform.

    Config and tokenizer come from the last checkpoint, or from `model_files_from` if it has none
    (sharded FSDP checkpoints)."""
    from safetensors.torch import save_file

    if not checkpoints:
        raise TrellisError("no checkpoints to average")
    weights = weights or [1.0] * len(checkpoints)
    if len(weights) != len(checkpoints) or any(w < 0 for w in weights) or sum(weights) == 0:
        raise TrellisError(f"need one non-negative weight per checkpoint ({len(checkpoints)}), got {weights}")
    total = sum(weights)
    average: dict[str, torch.Tensor] = {}
    dtypes = {}
    for path, weight in zip(checkpoints, weights, strict=True):
        for name, tensor in checkpoint_weights(path).items():
            dtypes[name] = tensor.dtype
            scaled = tensor.double() * (
                weight / total
            )  # float64 sum: no rounding drift over many checkpoints
            average[name] = average[name] + scaled if name in average else scaled
    os.makedirs(output_dir, exist_ok=True)
    # Sharded FSDP checkpoints hold no config or tokenizer: those of the run's final model then.
    for source in (checkpoints[-1], model_files_from):
        if source and os.path.exists(os.path.join(source, "config.json")):
            for name in MODEL_FILES:
                if os.path.exists(os.path.join(source, name)):
                    shutil.copy(os.path.join(source, name), output_dir)
            break
    else:
        raise TrellisError(f"{checkpoints[-1]} has no config.json; name a model directory to take it from")
    # A sharded FSDP checkpoint also holds a tied LM head under its own name; the model directory the
    # config came from stores the weights as from_pretrained expects them (a tied head once).
    stored = stored_weight_names(source)
    if stored:
        average = {name: tensor for name, tensor in average.items() if name in stored}
    save_file(
        {name: t.to(dtypes[name]).contiguous() for name, t in average.items()},
        os.path.join(output_dir, WEIGHTS),
        metadata={"format": "pt"},
    )
    logger.info("Averaged %d checkpoints into %s", len(checkpoints), output_dir)
    return output_dir
