"""A training-memory estimate per device, before any compute is spent (like a memory calculator).

Counts weights, gradients and AdamW states from the parameter counts, divides what the chosen
sharding splits (FSDP full shard / ZeRO-3 split everything, ZeRO-2 gradients and optimizer states,
ZeRO-1 optimizer states), and adds activations from batch, sequence length and model shape
(about 34 bytes per token per hidden unit per layer in 16-bit, Korthikanti et al. 2022, with
fused attention; with activation checkpointing, one layer's worth plus each layer's input).

Under a parallelism_config (trellis.train.parallelism) tensor parallel splits every matrix and 24 of
those 34 bytes over tp ranks (the norms' and residuals' 10 stay whole), context parallel splits the
tokens over cp ranks, FSDP2 shards over dp_shard x cp ranks, and HSDP replicas (dp_replicate) hold
copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

GIB = 1024**3
# The dimensions of an accelerate parallelism_config mesh, as its keys name them (parallelism_config_<dim>_size).
MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
# What each sharding strategy splits over the data-parallel ranks.
SHARDED = {
    "none": (),
    "zero1": ("optimizer",),
    "zero2": ("optimizer", "gradients"),
    "zero3": ("optimizer", "gradients", "weights"),
    "fsdp": ("optimizer", "gradients", "weights"),
}


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in {**asdict(self), "total": self.total}.items()}

    def table(self) -> str:
        rows = "\n".join(f"  {name:<12}{value:>10.3f} GiB" for name, value in self.as_gib().items())
        return f"Estimated memory per device:\n{rows}"


def estimate_training_memory(
    *,
    params: int,
    trainable: int,
    param_bytes: int,
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    activation_bytes: int = 2,
    sharding: str = "none",
    world_size: int = 1,
    activation_checkpointing: bool = False,
    weight_bytes: float | None = None,
    mesh: Mapping[str, int] | None = None,
) -> MemoryEstimate:
    """Bytes per device for one training step with AdamW (two states per trainable parameter).

    `mesh` gives the parallelism_config sizes by dimension (MESH_DIMS), when the launch config has one.
    `weight_bytes` replaces `params * param_bytes` when the weights are stored at mixed widths
    (QLoRA: a 4-bit base plus 16-bit adapters).
    """
    if sharding not in SHARDED:
        raise ValueError(f"sharding must be one of {sorted(SHARDED)}, got {sharding!r}")
    mesh = mesh or {}
    tp_size, cp_size = mesh.get("tp", 1), mesh.get("cp", 1)
    shard_ranks = world_size // (mesh.get("dp_replicate", 1) * tp_size)  # FSDP's dp_shard x cp ranks
    split = {
        part: tp_size * (shard_ranks if part in SHARDED[sharding] else 1)
        for part in ("weights", "gradients", "optimizer")
    }
    tokens = batch_size * seq_len / cp_size
    per_layer = (10 + 24 / tp_size) * tokens * hidden_size * activation_bytes / 2
    layers = (
        per_layer + num_layers * tokens * hidden_size * activation_bytes
        if activation_checkpointing
        else num_layers * per_layer
    )
    logits = 2 * tokens * vocab_size * 4  # fp32 logits and their gradient
    return MemoryEstimate(
        weights=(params * param_bytes if weight_bytes is None else weight_bytes) / split["weights"],
        gradients=trainable * param_bytes / split["gradients"],
        optimizer=2 * trainable * param_bytes / split["optimizer"],
        activations=layers + logits,
    )


def estimate_for_model(model, training_args, seq_len: int, accelerator) -> MemoryEstimate:
    """The estimate for a loaded model and the recipe's batch, precision and checkpointing, sharded as the
    accelerator will shard it."""
    from trellis.train.distributed import effective_sharding, full_numel

    sharding, world_size = effective_sharding(accelerator), accelerator.num_processes
    layout = accelerator.parallelism_config
    config = model.config
    first = next(model.parameters())
    mixed = training_args.bf16 or training_args.fp16
    return estimate_training_memory(
        params=sum(full_numel(p) for p in model.parameters()),
        trainable=sum(full_numel(p) for p in model.parameters() if p.requires_grad),
        param_bytes=first.element_size(),
        batch_size=training_args.per_device_train_batch_size,
        seq_len=seq_len,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        activation_bytes=2 if mixed or first.element_size() == 2 else 4,
        sharding=sharding,
        world_size=world_size,
        activation_checkpointing=bool(training_args.activation_checkpointing),
        mesh={dim: getattr(layout, f"{dim}_size") for dim in MESH_DIMS} if layout else None,
    )
