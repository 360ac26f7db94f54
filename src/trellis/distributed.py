"""What the run really does across processes, and a warning when it is not what was asked for.

accelerate silently turns an FSDP config into plain DDP on CPU (see ECOSYSTEM.md), so the script
states the effective setup and compares it with what `accelerate launch` was told.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def effective_sharding(accelerator) -> str:
    """'fsdp', 'zero1'..'zero3' or 'none' (plain data parallel or a single process)."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "none"


def check_distributed_setup(accelerator) -> str:
    """Log the effective setup; warn if accelerate fell back from the requested FSDP/DeepSpeed."""
    sharding = effective_sharding(accelerator)
    summary = (
        f"{accelerator.num_processes} process(es), {str(accelerator.distributed_type).split('.')[-1]}, "
        f"sharding: {sharding}, mixed precision: {accelerator.mixed_precision}, device: {accelerator.device}"
    )
    logger.info("Distributed setup: %s", summary)
    for variable, wanted in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "zero")):
        if os.environ.get(variable, "").lower() == "true" and not sharding.startswith(wanted):
            logger.warning(
                "The accelerate config asked for %s but the run uses %s: accelerate fell back "
                "(FSDP1 cannot run on CPU). Parameters are NOT sharded.",
                wanted.upper(),
                summary,
            )
    return summary
