"""Checkpoint averaging: the (weighted) mean of the weights of several checkpoints of one run."""

from __future__ import annotations

import logging
import os
import shutil

import torch

from trellis.errors import TrellisError
from trellis.stage import checkpoints_by_step

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
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


def average_checkpoints(checkpoints: list[str], output_dir: str, weights: list[float] | None = None) -> str:
    """Write the weighted average of the checkpoints' weights as a model directory; weights default to uniform."""
    from safetensors.torch import load_file, save_file

    if not checkpoints:
        raise TrellisError("no checkpoints to average")
    weights = weights or [1.0] * len(checkpoints)
    if len(weights) != len(checkpoints) or any(w < 0 for w in weights) or sum(weights) == 0:
        raise TrellisError(f"need one non-negative weight per checkpoint ({len(checkpoints)}), got {weights}")
    total = sum(weights)
    average: dict[str, torch.Tensor] = {}
    for path, weight in zip(checkpoints, weights, strict=True):
        file = os.path.join(path, WEIGHTS)
        if not os.path.isfile(file):
            raise TrellisError(f"{path}: no {WEIGHTS} (sharded FSDP checkpoints must be merged first)")
        for name, tensor in load_file(file).items():
            scaled = tensor.double() * (
                weight / total
            )  # float64 sum: no rounding drift over many checkpoints
            average[name] = average[name] + scaled if name in average else scaled
    reference = load_file(os.path.join(checkpoints[-1], WEIGHTS))
    os.makedirs(output_dir, exist_ok=True)
    save_file(
        {name: t.to(reference[name].dtype).contiguous() for name, t in average.items()},
        os.path.join(output_dir, WEIGHTS),
        metadata={"format": "pt"},
    )
    for name in MODEL_FILES:
        if os.path.exists(os.path.join(checkpoints[-1], name)):
            shutil.copy(os.path.join(checkpoints[-1], name), output_dir)
    logger.info("Averaged %d checkpoints into %s", len(checkpoints), output_dir)
    return output_dir
