"""Tensor and context parallelism over the device mesh the accelerate config describes.

An accelerate config with a `parallelism_config` section (dp_replicate x dp_shard x cp x tp) makes
`accelerate launch` export PARALLELISM_CONFIG_* variables; accelerate's ParallelismConfig reads them
and builds the device mesh. Tensor parallelism must be applied to the model before the Trainer
prepares it: transformers' TP plan for the architecture (`base_model_tp_plan`) is applied on the mesh's
`tp` dimension, and accelerate then shards the result with FSDP2 over `dp_shard` (x `cp`), replicating
over `dp_replicate` (HSDP). accelerate owns the sharded checkpoints, so runs resume as under FSDP2.
"""

from __future__ import annotations

import contextlib
import os

from trellis.train.distributed import DistributedSetupError


def training_layout(training_args):
    """The ParallelismConfig `accelerate launch` asked for, for a training run (None when its config has no
    parallelism_config section, or for inference: `training_args` None), checked before any weights load,
    and handed to the Trainer."""
    launched = os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true"
    if training_args is None or not launched:
        return None
    from accelerate import ParallelismConfig

    parallelism = ParallelismConfig()  # reads the PARALLELISM_CONFIG_* sizes the launcher exported
    if parallelism.cp_enabled and training_args.device.type == "cpu":
        raise DistributedSetupError(
            f"context parallelism (parallelism_config_cp_size: {parallelism.cp_size} in the accelerate config) "
            "needs GPUs: torch's ring attention has no rule for the CPU attention kernel (NotImplementedError: "
            "Operator aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding "
            "strategy registered). Run it on GPUs, or set cp_size to 1 on CPU."
        )
    training_args.parallelism_config = parallelism
    return parallelism


def parallelize(model, parallelism, training_args):
    """Apply the layout's tensor parallelism to a freshly loaded model (a no-op without one). The model
    moves to this process's device first: the tp shards are cut there."""
    if parallelism is not None and parallelism.tp_enabled:
        apply_tensor_parallel(model.to(training_args.device), parallelism, training_args.device.type)
    return model


def apply_tensor_parallel(model, parallelism, device_type: str):
    """Shard the model's layers over the mesh's `tp` dimension with transformers' plan for it."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    mesh = parallelism.get_device_mesh(device_type)
    layout = DistributedConfig(tp_size=parallelism.tp_size)
    tp_plan, _, _ = model._resolve_parallel_plans(layout)
    # A tied LM head is the input embedding's parameter under a second name: shard it once (both rules
    # split the vocabulary dimension), hook both modules, then point the head at the sharded parameter.
    parameters = dict(model.named_parameters())
    modules = dict(model.named_modules())
    tp_plan = {name: style for name, style in tp_plan.items() if name in parameters or name in modules}
    apply_tensor_parallelism(model, mesh["tp"], tp_plan)
    model.tie_weights()
    model.config.distributed_config = layout  # how accelerate reads the model's TP degree
    provide_replicate_parallel()
    return model


@contextlib.contextmanager
def saved_as_plain_model(model):
    """Save without the TP degree on the config: the directory is an ordinary model (the gathered full
    weights), and transformers' save_pretrained would wait at a barrier only the writing process reaches."""
    config = getattr(model, "config", None)
    layout = getattr(config, "distributed_config", None)
    if layout is not None:
        del config.distributed_config
    try:
        yield
    finally:
        if layout is not None:
            config.distributed_config = layout


def provide_replicate_parallel() -> None:
    """accelerate 1.16 makes the parameters that no TP rule shards (norms) replicated DTensors on the tp
    mesh with `transformers.integrations.tensor_parallel.ReplicateParallel`, which transformers 5.2x no
    longer has (`ImportError: cannot import name 'ReplicateParallel'` in Accelerator._prepare_tp, with
    every transformers release from 5.20 to 5.24). Give it back what it calls, with what the removed
    class did: inputs become replicated DTensors, outputs local tensors again."""
    from transformers.integrations import tensor_parallel

    if not hasattr(tensor_parallel, "ReplicateParallel"):
        tensor_parallel.ReplicateParallel = ReplicateParallel


class ReplicateParallel:
    """A module whose parameters are replicated over the tp mesh, between layers that compute on local
    tensors."""

    def prepare_module_tp(self, module, mesh) -> None:
        import torch
        from torch.distributed.tensor import DTensor, Replicate, distribute_module

        def to_dtensor(_module, inputs, _mesh):
            return tuple(
                DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
                else x
                for x in inputs
            )

        def to_local(_module, output, _mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        distribute_module(module, mesh, input_fn=to_dtensor, output_fn=to_local)
