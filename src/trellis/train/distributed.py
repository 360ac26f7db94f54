"""What the run really does across processes, and a warning when it is not what was asked for.

accelerate silently turns an FSDP config into plain DDP on CPU (see ECOSYSTEM.md). FSDP2
(`fully_shard` over DTensor) runs on CPU with gloo, so `keep_fsdp2_on_cpu` gives the Trainer's
accelerator back the FSDP2 plugin the config asked for; what is left (FSDP1 on CPU) is stated and
warned about. The same code path runs on GPUs, where accelerate keeps FSDP by itself.
"""

from __future__ import annotations

import logging
import os

from trellis.core.errors import TrellisError

logger = logging.getLogger(__name__)


class DistributedSetupError(TrellisError):
    """The launch configuration and the recipe disagree."""


def keep_fsdp2_on_cpu(accelerator) -> bool:
    """Give a multi-process CPU run the FSDP2 sharding its accelerate config asked for.

    accelerate 1.15 builds the FSDP plugin from the launch config, then drops it when the processes
    run on CPU (MULTI_CPU). Call this right after the Accelerator exists, before anything is prepared;
    it returns whether it switched the state to FSDP.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    asked_for_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if not asked_for_fsdp or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # read from the launch config's FSDP_* variables
    if plugin.fsdp_version != 2:
        return False  # FSDP1 cannot shard on CPU; check_distributed_setup warns
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # What AcceleratorState.__init__ does on GPUs for the same config.
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def restore_sharding_on_cpu(accelerator, parallelism) -> bool:
    """After the Accelerator exists, give a CPU run the FSDP2 plugin and the device mesh its launch config
    asked for (see keep_fsdp2_on_cpu); return whether the state was switched to FSDP.

    accelerate validates a ParallelismConfig against the distributed type while building the
    Accelerator, and on CPU (MULTI_CPU) refuses it: build the Accelerator without it (CpuShardingMixin)
    and attach it here, as Accelerator.__init__ does on GPUs.
    """
    switched = keep_fsdp2_on_cpu(accelerator)
    if parallelism is not None:
        accelerator.state.parallelism_config = parallelism
        accelerator.state.device_mesh = parallelism.get_device_mesh(accelerator.device.type)
        parallelism._validate_accelerator(accelerator)
    return switched


class CpuShardingMixin:
    """For a Trainer class: FSDP2, tensor and context parallelism on CPU processes as on GPUs."""

    def create_accelerator_and_postprocess(self) -> None:
        parallelism = self.args.parallelism_config
        deferred = parallelism is not None and self.args.device.type == "cpu"
        if deferred:  # the Accelerator must not see it on CPU (see restore_sharding_on_cpu)
            self.args.parallelism_config = None
            from_launch = os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", None)
        try:
            super().create_accelerator_and_postprocess()
        finally:
            if deferred:
                self.args.parallelism_config = parallelism
                if from_launch is not None:
                    os.environ["ACCELERATE_USE_PARALLELISM_CONFIG"] = from_launch
        if restore_sharding_on_cpu(self.accelerator, parallelism if deferred else None):
            self.is_fsdp_enabled = True  # before the model is prepared (sharded) in train()


def local_shard(param):
    """The part of a parameter this process holds: its DTensor shard under FSDP2, its partition under
    DeepSpeed ZeRO-3, or the whole parameter otherwise. Writing into it writes into the parameter."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    if hasattr(param, "to_local"):
        return param.to_local()
    return param


def reshard(model) -> None:
    """Put every FSDP2 parameter back into its sharded form (after a forward pass, FSDP2 keeps the
    units that are not resharded after forward, e.g. the output layer, gathered)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_layout(accelerator, model) -> dict:
    """How the trained parameters are laid out over the processes, for the run record: each
    parameter's element count and how many elements each process holds (a collective: call it on
    every process). Under real sharding every process holds only part of each large parameter."""
    from accelerate.utils import gather_object

    model = accelerator.unwrap_model(model)
    reshard(model)
    local = {name: local_shard(p).numel() for name, p in model.named_parameters()}
    per_process = gather_object([local])
    return {
        "sharding": effective_sharding(accelerator),
        "processes": accelerator.num_processes,
        "mesh": dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))
        if (mesh := device_mesh(accelerator))
        else None,
        "parameters": {
            name: {
                "numel": full_numel(p),
                "per_process": [held[name] for held in per_process],
                **placements(p),
            }
            for name, p in model.named_parameters()
        },
    }


def device_mesh(accelerator):
    """The launch config's device mesh (dp_replicate, dp_shard, cp, tp), or None without a parallelism_config."""
    return accelerator.torch_device_mesh if accelerator.parallelism_config else None


def placements(param) -> dict:
    """How a DTensor parameter is laid out: each mesh dimension's name and placement (e.g. tp: Shard(dim=0))."""
    if not hasattr(param, "placements"):
        return {}
    names = param.device_mesh.mesh_dim_names or tuple(str(i) for i in range(param.device_mesh.ndim))
    return {
        "placements": {dim: str(placement) for dim, placement in zip(names, param.placements, strict=True)}
    }


def full_numel(param) -> int:
    """A parameter's element count, also when this process holds only a shard of it."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()  # a DTensor's numel is global


def effective_sharding(accelerator) -> str:
    """'fsdp', 'zero1'..'zero3' or 'none' (plain data parallel or a single process)."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "none"


def effective_precision(accelerator) -> str:
    """'bf16', 'fp16' or 'no' as the run computes; under DeepSpeed its own config decides."""
    if effective_sharding(accelerator).startswith("zero"):
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        return next((name for name in ("bf16", "fp16") if config.get(name, {}).get("enabled") is True), "no")
    return accelerator.mixed_precision


def check_distributed_setup(accelerator, training_args) -> str:
    """Log the effective setup; warn if accelerate fell back from the requested FSDP/DeepSpeed, and stop
    before training if DeepSpeed's precision differs from the recipe's."""
    sharding = effective_sharding(accelerator)
    precision = effective_precision(accelerator)
    summary = (
        f"{accelerator.num_processes} process(es), {str(accelerator.distributed_type).split('.')[-1]}, "
        f"sharding: {sharding}, mixed precision: {precision}, device: {accelerator.device}"
    )
    logger.info("Distributed setup: %s", summary)
    for variable, wanted in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "zero")):
        if os.environ.get(variable, "").lower() == "true" and not sharding.startswith(wanted):
            logger.warning(
                "The accelerate config asked for %s but the run uses %s: accelerate fell back "
                "(on CPU only FSDP2, fsdp_version: 2, shards). Parameters are NOT sharded.",
                wanted.upper(),
                summary,
            )
    asked = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
    if precision != asked:
        problem = (
            f"the run computes in mixed precision '{precision}' (accelerate config or DeepSpeed config) but "
            f"the recipe says bf16: {training_args.bf16}, fp16: {training_args.fp16}"
        )
        if sharding.startswith("zero"):  # DeepSpeed would stop later, mid-setup, with a less clear message
            raise DistributedSetupError(
                f"{problem}; make them agree: set `bf16`/`fp16` in the recipe, or `mixed_precision` in the "
                'accelerate config (bf16 and fp16 in a DeepSpeed JSON config may be "auto")'
            )
        logger.warning("%s; the accelerate config wins. Set bf16/fp16 in the recipe to match it.", problem)
    return summary
