"""The model families Trellis ships recipes for, with their real architectures, and the README tables.

Each entry holds the fields of the family's Hub `config.json` that size the model (copied from the
model repos), so that parameter counts and the memory estimate (trellis.memory) are computed, not
guessed, and so that the tests can build a scaled-down copy of the same architecture.

    python tests/families.py     # prints the README's family and accelerate-config tables
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trellis.pipeline.plan import accelerate_layout
from trellis.train.memory import GIB, estimate_training_memory

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Family:
    """One size of a model family: `recipes/<name>/` trains `hub_id`."""

    name: str  # the recipes/ directory
    family: str  # the chat template / tokenizer family
    hub_id: str
    config: dict  # the sizing fields of the Hub config.json (model_type included)
    template_source: str  # where the chat template the recipes train with comes from
    max_length: int  # the SFT recipe's max_length, used for the activation estimate
    lora_r: int = 16
    notes: dict = field(default_factory=dict)


LLAMA_3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA_TEMPLATE = "Llama 3 Instruct format + `{% generation %}` (`recipes/templates/llama3.jinja`)"
SMOLLM2_TEMPLATE = "SmolLM2-Instruct's ChatML + `{% generation %}` (`recipes/templates/smollm2.jinja`)"

FAMILIES = [
    Family(
        "llama-3.2-1b",
        "llama3",
        "meta-llama/Llama-3.2-1B",
        dict(
            model_type="llama",
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={**LLAMA_3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
        ),
        LLAMA_TEMPLATE,
        2048,
    ),
    Family(
        "llama-3.1-8b",
        "llama3",
        "meta-llama/Llama-3.1-8B",
        dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={**LLAMA_3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
        ),
        LLAMA_TEMPLATE,
        2048,
    ),
    Family(
        "qwen2.5-0.5b",
        "qwen2.5",
        "Qwen/Qwen2.5-0.5B",
        dict(
            model_type="qwen2",
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
        ),
        "the base tokenizer's own (Qwen2.5 ChatML); TRL swaps in its `{% generation %}` copy",
        2048,
    ),
    Family(
        "qwen2.5-1.5b",
        "qwen2.5",
        "Qwen/Qwen2.5-1.5B",
        dict(
            model_type="qwen2",
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
        ),
        "the base tokenizer's own (Qwen2.5 ChatML); TRL swaps in its `{% generation %}` copy",
        2048,
    ),
    Family(
        "smollm2-135m",
        "smollm2",
        "HuggingFaceTB/SmolLM2-135M",
        dict(
            model_type="llama",
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
        ),
        SMOLLM2_TEMPLATE,
        8192,
    ),
    Family(
        "smollm2-360m",
        "smollm2",
        "HuggingFaceTB/SmolLM2-360M",
        dict(
            model_type="llama",
            hidden_size=960,
            intermediate_size=2560,
            num_hidden_layers=32,
            num_attention_heads=15,
            num_key_value_heads=5,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
        ),
        SMOLLM2_TEMPLATE,
        8192,
    ),
    Family(
        "smollm2-1.7b",
        "smollm2",
        "HuggingFaceTB/SmolLM2-1.7B",
        dict(
            model_type="llama",
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=130000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
        ),
        SMOLLM2_TEMPLATE,
        8192,
    ),
    Family(
        "mistral-7b",
        "mistral",
        "mistralai/Mistral-7B-v0.3",
        dict(
            model_type="mistral",
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32768,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            sliding_window=None,
            rms_norm_eps=1e-5,
        ),
        "Mistral-7B-Instruct-v0.2/v0.3 `[INST]` format + `{% generation %}` (`recipes/templates/mistral.jinja`)",
        2048,
    ),
    Family(
        "gemma-2-2b",
        "gemma2",
        "google/gemma-2-2b",
        dict(
            model_type="gemma2",
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            vocab_size=256000,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            max_position_embeddings=8192,
            sliding_window=4096,
            query_pre_attn_scalar=256,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
        ),
        "gemma-2-2b-it's `<start_of_turn>` format + `{% generation %}` (`recipes/templates/gemma2.jinja`)",
        2048,
    ),
]


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def meta_model(config_fields: dict):
    """The family's architecture on the meta device: real parameter shapes, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config_fields)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass
class ParameterCounts:
    total: int
    linear: int  # the decoder's linear layers: what QLoRA quantizes and LoRA adapts
    lora: int  # LoRA adapters of rank r on every decoder linear layer (all-linear)


def parameter_counts(fam: Family) -> ParameterCounts:
    import torch

    model = meta_model(fam.config)
    linears = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    ]
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in linears)
    lora = sum(fam.lora_r * (m.in_features + m.out_features) for m in linears)
    return ParameterCounts(total, linear, lora)


GPU_SIZES_GIB = (24, 80)
HEADROOM = 0.9  # leave a tenth of the GPU to the CUDA context, allocator fragmentation and buffers
NUM_GPUS = 8


@dataclass
class MemoryRow:
    name: str
    params: int
    full_1gpu: float  # GiB per GPU, full fine-tuning without sharding
    full_fsdp8: float  # GiB per GPU, full fine-tuning, FSDP full shard over 8 GPUs
    full_fsdp8_offload: float  # the same with optimizer states offloaded to CPU memory
    lora: float  # bf16 base + LoRA adapters, one GPU
    qlora: float  # 4-bit base + LoRA adapters, one GPU

    def full_sft_config(self, gpu_gib: int) -> str:
        budget = gpu_gib * HEADROOM
        if self.full_1gpu <= budget:
            return "`single_gpu` / `ddp`"
        if self.full_fsdp8 <= budget:
            return "`fsdp` / `zero3`"
        if self.full_fsdp8_offload <= budget:
            return "`fsdp_offload` / `zero3_offload`"
        return "QLoRA (`fsdp_qlora`)"

    def adapter_config(self, gpu_gib: int) -> str:
        budget = gpu_gib * HEADROOM
        if self.lora <= budget:
            return "LoRA, `single_gpu`"
        if self.qlora <= budget:
            return "QLoRA, `single_gpu`"
        return "QLoRA, `fsdp_qlora`"


def memory_row(fam: Family, batch_size: int = 1) -> MemoryRow:
    """Per-GPU training memory of the family's SFT recipe: bf16 weights, AdamW, activation checkpointing,
    one sequence of the recipe's max_length per GPU (raise the batch only where the table leaves room)."""
    counts = parameter_counts(fam)
    shape = dict(
        batch_size=batch_size,
        seq_len=fam.max_length,
        hidden_size=fam.config["hidden_size"],
        num_layers=fam.config["num_hidden_layers"],
        vocab_size=fam.config["vocab_size"],
        activation_checkpointing=True,
    )
    full = dict(params=counts.total, trainable=counts.total, param_bytes=2, **shape)
    fsdp8 = estimate_training_memory(**full, sharding="fsdp", world_size=NUM_GPUS)
    adapters = dict(params=counts.total + counts.lora, trainable=counts.lora, param_bytes=2, **shape)
    # QLoRA: the decoder's linear weights in NF4 with double quantization (~4.127 bits), the rest bf16.
    qlora_weights = counts.linear * 4.127 / 8 + (counts.total - counts.linear + counts.lora) * 2
    return MemoryRow(
        name=fam.name,
        params=counts.total,
        full_1gpu=estimate_training_memory(**full).total / GIB,
        full_fsdp8=fsdp8.total / GIB,
        full_fsdp8_offload=(fsdp8.total - fsdp8.optimizer) / GIB,
        lora=estimate_training_memory(**adapters).total / GIB,
        qlora=estimate_training_memory(**adapters, weight_bytes=qlora_weights).total / GIB,
    )


# The layouts of the README table, as (accelerate config, sequence-length factor), priced as the config's own
# processes and mesh say: CP is for sequences longer than the recipe's, so its column is at twice max_length.
LAYOUTS = [("fsdp", 1), ("fsdp_tp", 1), ("fsdp_cp", 2), ("multi_node_hsdp", 1), ("multi_node_hsdp_tp", 1)]


def layout_row(fam: Family) -> list[float]:
    """GiB per GPU of full SFT/pretraining in each of LAYOUTS: bf16, AdamW, one sequence per GPU, activations
    kept (no checkpointing: what TP and CP split)."""
    counts = parameter_counts(fam)
    shape = dict(
        params=counts.total,
        trainable=counts.total,
        param_bytes=2,
        batch_size=1,
        hidden_size=fam.config["hidden_size"],
        num_layers=fam.config["num_hidden_layers"],
        vocab_size=fam.config["vocab_size"],
        sharding="fsdp",
    )
    row = []
    for config, factor in LAYOUTS:
        _, processes, mesh = accelerate_layout(str(REPO / "accelerate_configs" / f"{config}.yaml"))
        seq_len = fam.max_length * factor
        row.append(
            estimate_training_memory(**shape, world_size=processes, mesh=mesh, seq_len=seq_len).total / GIB
        )
    return row


def layout_table() -> str:
    names = " | ".join(f"`{config}`" + (" (2x seq)" if factor > 1 else "") for config, factor in LAYOUTS)
    lines = [f"| model (seq) | {names} |", "|---" * (len(LAYOUTS) + 1) + "|"]
    for fam in FAMILIES:
        cells = " | ".join(f"{gib:.1f}" for gib in layout_row(fam))
        lines.append(f"| {fam.name} ({fam.max_length}) | {cells} |")
    return "\n".join(lines)


def recipe_files(fam: Family, root: Path = REPO) -> list[str]:
    return sorted(path.stem for path in (root / "recipes" / fam.name).glob("*.yaml"))


def family_table(root: Path = REPO) -> str:
    lines = [
        "| recipes | base model | chat template the recipes train with | recipes (stage files) |",
        "|---|---|---|---|",
    ]
    for fam in FAMILIES:
        files = ", ".join(recipe_files(fam, root))
        lines.append(f"| `recipes/{fam.name}/` | `{fam.hub_id}` | {fam.template_source} | {files} |")
    return "\n".join(lines)


def memory_table() -> str:
    header = (
        "| model | parameters | full SFT, 1 GPU | full SFT, FSDP x8 | + CPU offload | LoRA, 1 GPU "
        "| QLoRA, 1 GPU | full SFT on 24 GiB GPUs | full SFT on 80 GiB GPUs | adapters on 24 GiB |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        row = memory_row(fam)
        lines.append(
            f"| {row.name} (seq {fam.max_length}) | {row.params / 1e9:.2f} B | {row.full_1gpu:.1f} | "
            f"{row.full_fsdp8:.1f} | {row.full_fsdp8_offload:.1f} | {row.lora:.1f} | {row.qlora:.1f} | "
            f"{row.full_sft_config(24)} | {row.full_sft_config(80)} | {row.adapter_config(24)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(family_table())
    print()
    print(memory_table())
    print()
    print(layout_table())
