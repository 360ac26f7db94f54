"""The compression stages' recipes. Quantization: the model, the smaller models made from it (pruned,
distilled), the variants to make of each, calibration data, and how to score them. Pruning: the model,
the sizes to cut it to, and the calibration data that ranks what stays.

The evaluation keys (tasks, perplexity sets, batch size, ...) are the evaluation stage's own fields, so
a quantize recipe scores its variants exactly as an eval recipe would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trellis.core.recipe import Problem, did_you_mean
from trellis.data.arguments import DatasetSource, as_source
from trellis.evaluate.arguments import EvalArguments, PerplexitySet

METHODS = ("gptq", "bitsandbytes", "torchao")
BITS = {"gptq": (2, 3, 4, 8), "bitsandbytes": (4, 8), "torchao": (8,)}
# Keys that only mean something for one method (and, for bitsandbytes, only at 4 bits), with their defaults.
METHOD_KEYS: dict[str, dict[str, Any]] = {
    "gptq": {"group_size": 128, "desc_act": False, "sym": True, "damp_percent": 0.1},
    "bitsandbytes": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
}


@dataclass
class QuantVariant:
    """One quantized variant: a name (its directory under output_dir), a method and its settings."""

    name: str = field(metadata={"help": "Directory name under output_dir and column in the report."})
    method: str = field(
        metadata={
            "help": "gptq (GPTQModel through transformers' GPTQConfig; calibrated), bitsandbytes (LLM.int8 "
            "or NF4/FP4, no calibration) or torchao (int8 weight-only).",
            "choices": list(METHODS),
        }
    )
    bits: int = field(default=4, metadata={"help": "gptq: 2, 3, 4 or 8; bitsandbytes: 4 or 8; torchao: 8."})
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "gptq: weights per quantization group (default 128; -1: one group per output row). "
            "Must divide the input width of every quantized layer."
        },
    )
    desc_act: bool | None = field(
        default=None,
        metadata={"help": "gptq: act-order, quantize columns by decreasing activation (default false)."},
    )
    sym: bool | None = field(
        default=None, metadata={"help": "gptq: symmetric quantization (default true; vLLM needs it)."}
    )
    damp_percent: float | None = field(
        default=None,
        metadata={"help": "gptq: Hessian dampening, a share of its mean diagonal (default 0.1)."},
    )
    quant_type: str | None = field(
        default=None,
        metadata={"help": "bitsandbytes 4-bit: nf4 or fp4 (default nf4).", "choices": ["nf4", "fp4"]},
    )
    double_quant: bool | None = field(
        default=None,
        metadata={"help": "bitsandbytes 4-bit: quantize the quantization constants too (default true)."},
    )
    compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "bitsandbytes 4-bit: dtype of the matmuls (default float32; bfloat16 on GPUs).",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )

    def setting(self, key: str) -> Any:
        """A method key's value: the recipe's, else the method's default."""
        value = getattr(self, key)
        return METHOD_KEYS[self.method][key] if value is None else value

    def settings(self) -> dict[str, Any]:
        """What defines the variant: method, bits and the method's own keys (defaults filled in)."""
        keys = METHOD_KEYS.get(self.method, {}) if self.method != "bitsandbytes" or self.bits == 4 else {}
        return {"method": self.method, "bits": self.bits, **{key: self.setting(key) for key in keys}}

    def problems(self, where: str) -> list[Problem]:
        problems = []
        if self.method in BITS and self.bits not in BITS[self.method]:
            allowed = ", ".join(map(str, BITS[self.method]))
            problems.append(
                Problem(f"{where}.bits", f"{self.method} quantizes to {allowed} bits, got {self.bits}")
            )
        applies = self.settings()
        for method, keys in METHOD_KEYS.items():
            for key in keys:
                if getattr(self, key) is not None and key not in applies:
                    scope = "bitsandbytes with bits: 4" if method == "bitsandbytes" else method
                    problems.append(Problem(f"{where}.{key}", f"only applies to {scope}"))
        group_size = self.group_size
        if group_size is not None and group_size != -1 and group_size <= 0:
            problems.append(Problem(f"{where}.group_size", f"must be positive or -1, got {group_size}"))
        if self.damp_percent is not None and not 0 < self.damp_percent < 1:
            problems.append(
                Problem(f"{where}.damp_percent", f"must be between 0 and 1, got {self.damp_percent}")
            )
        if "/" in self.name or self.name in ("", ".", "..", "original"):
            problems.append(Problem(f"{where}.name", f"{self.name!r} cannot name a directory of output_dir"))
        return problems


@dataclass
class CompressedModel:
    """A smaller model made from the quantization stage's model (pruned, distilled): measured beside it and
    quantized with the recipe's variants, so that one table holds every way of making the model smaller."""

    name: str = field(metadata={"help": "Its row in the report; its variants are named <name>-<variant>."})
    path: str = field(metadata={"help": "Its model directory or Hub id."})
    variants: list[str] | None = field(
        default=None, metadata={"help": "Names of the recipe's variants to make of it (default: all)."}
    )


def _field_of(cls: type, name: str) -> Any:
    """Another recipe's field `name` (default and help), reused as a key of this one."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    if spec.default_factory is not dataclasses.MISSING:
        return field(default_factory=spec.default_factory, metadata=spec.metadata)
    return field(default=spec.default, metadata=spec.metadata)


def _eval_field(name: str) -> Any:
    """The evaluation stage's field `name`: the recipes of this wing score models as an eval recipe would."""
    return _field_of(EvalArguments, name)


# The evaluation keys a quantize recipe takes; they build the EvalArguments that score each variant.
EVAL_KEYS = (
    "tasks",
    "task_dirs",
    "num_fewshot",
    "limit",
    "batch_size",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "system_instruction",
    "gen_kwargs",
    "dtype",
    "perplexity",
    "seed",
    "trust_remote_code",
)


@dataclass
class QuantizeArguments:
    """The quantization stage: a trained model, the variants to make of it, and how to score them."""

    nested_items: ClassVar[dict[str, type]] = {
        "variants": QuantVariant,
        "compressed_models": CompressedModel,
        "calibration_datasets": DatasetSource,
        "perplexity": PerplexitySet,
    }

    model_name_or_path: str = field(
        metadata={"help": "The trained model: a local directory (e.g. outputs/tiny/sft) or a Hub id."}
    )
    output_dir: str = field(
        metadata={"help": "Where each variant (output_dir/<name>/), the report and the plot are written."}
    )
    variants: list[dict] = field(
        default_factory=list,
        metadata={"help": "Variants to make, each a mapping with the keys of QuantVariant."},
    )
    compressed_models: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "Smaller models made from model_name_or_path (pruned, distilled), each a mapping with "
            "the keys of CompressedModel: measured against it, and quantized with the variants."
        },
    )
    calibration_datasets: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "GPTQ calibration text (keys of a dataset source): `text` records, or conversations "
            "(`messages`, ShareGPT, Alpaca, ...) rendered with the model's chat template."
        },
    )
    calibration_samples: int = field(
        default=128, metadata={"help": "Calibration records, drawn with `seed` from the calibration data."}
    )
    calibration_max_length: int = field(
        default=512, metadata={"help": "Tokens per calibration record (longer records are truncated)."}
    )
    generation_tokens: int = field(
        default=64, metadata={"help": "Tokens generated (greedy, batch 1) to measure tokens/s."}
    )
    quality_metric: str | None = field(
        default=None,
        metadata={
            "help": "Metric whose retention decides the best variant, e.g. wiki.perplexity or "
            "arc_easy.acc (default: the first perplexity set's perplexity)."
        },
    )
    min_quality_retention: float = field(
        default=0.99,
        metadata={
            "help": "The best variant is the smallest that keeps at least this share of the original's "
            "quality_metric (variant / original, or original / variant where lower is better)."
        },
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload each variant to the Hub as <hub_model_id>-<name>."}
    )
    hub_model_id: str | None = field(
        default=None,
        metadata={"help": "Repository prefix, e.g. my-org/my-model -> my-org/my-model-gptq-4bit."},
    )
    hub_private_repo: bool | None = field(
        default=None, metadata={"help": "Create the repositories private (default: the Hub's default)."}
    )
    tasks: list[str] = _eval_field("tasks")
    task_dirs: list[str] = _eval_field("task_dirs")
    num_fewshot: int | None = _eval_field("num_fewshot")
    limit: float | None = _eval_field("limit")
    batch_size: int = _eval_field("batch_size")
    apply_chat_template: bool = _eval_field("apply_chat_template")
    fewshot_as_multiturn: bool = _eval_field("fewshot_as_multiturn")
    system_instruction: str | None = _eval_field("system_instruction")
    gen_kwargs: dict | None = _eval_field("gen_kwargs")
    dtype: str = _eval_field("dtype")
    perplexity: list[dict] = _eval_field("perplexity")
    seed: int = _eval_field("seed")
    trust_remote_code: bool = _eval_field("trust_remote_code")

    def __post_init__(self) -> None:
        self.variants = [v if isinstance(v, QuantVariant) else QuantVariant(**v) for v in self.variants]
        self.compressed_models = [
            m if isinstance(m, CompressedModel) else CompressedModel(**m) for m in self.compressed_models
        ]
        self.calibration_datasets = [as_source(item) for item in self.calibration_datasets]
        self.perplexity = [p if isinstance(p, PerplexitySet) else PerplexitySet(**p) for p in self.perplexity]
        if self.quality_metric is None and self.perplexity:
            self.quality_metric = f"{self.perplexity[0].label}.perplexity"

    def eval_arguments(self, checkpoints: list) -> EvalArguments:
        """The evaluation stage's arguments that score the given checkpoints with this recipe's settings."""
        values = {key: getattr(self, key) for key in EVAL_KEYS}
        return EvalArguments(output_dir=self.output_dir, checkpoints=checkpoints, **values)

    def recipe_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if not self.variants:
            problems.append(
                Problem(
                    "variants",
                    "required: list the variants to make, e.g.\n      variants:\n"
                    "        - {name: gptq-4bit, method: gptq, bits: 4, group_size: 128}",
                )
            )
        names = [v.name for v in self.variants]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(Problem("variants", f"two variants are named {name!r}; names must be unique"))
        for index, variant in enumerate(self.variants):
            problems += variant.problems(f"variants[{index}]")
        problems += self._compressed_model_problems(names)
        if any(v.method == "gptq" for v in self.variants) and not self.calibration_datasets:
            problems.append(
                Problem(
                    "calibration_datasets", "GPTQ needs calibration text: list at least one dataset source"
                )
            )
        for key in ("calibration_samples", "calibration_max_length", "generation_tokens"):
            if getattr(self, key) < 1:
                problems.append(Problem(key, f"must be at least 1, got {getattr(self, key)}"))
        if not 0 < self.min_quality_retention <= 1.5:
            problems.append(
                Problem(
                    "min_quality_retention",
                    f"a share of the original, e.g. 0.99; got {self.min_quality_retention}",
                )
            )
        if self.quality_metric is None:
            problems.append(
                Problem(
                    "quality_metric",
                    "required without perplexity sets: the metric that decides the best variant, e.g. arc_easy.acc",
                )
            )
        else:
            sources = [*self.tasks, *(p.label for p in self.perplexity)]
            prefix = self.quality_metric.split(".")[0]
            if "." not in self.quality_metric or prefix not in sources:
                problems.append(
                    Problem(
                        "quality_metric",
                        f"{self.quality_metric!r} is not a metric of the recipe's tasks or perplexity sets "
                        f"(<task or label>.<metric>){did_you_mean(prefix, sources)}; they are: {sources}",
                    )
                )
        if self.push_to_hub and not self.hub_model_id:
            problems.append(Problem("hub_model_id", "required with push_to_hub: the repository prefix"))
        # The evaluation stage's own checks of its keys (perplexity sets, task_dirs, limit).
        checks = self.eval_arguments(
            [{"name": "original", "path": self.model_name_or_path}]
        ).recipe_problems()
        problems += [p for p in checks if p.key not in ("checkpoints", "tasks")]
        return problems

    def _compressed_model_problems(self, variant_names: list[str]) -> list[Problem]:
        problems = []
        taken = {"original", *variant_names}
        for index, model in enumerate(self.compressed_models):
            where = f"compressed_models[{index}]"
            if "/" in model.name or model.name in ("", ".", "..") or model.name in taken:
                problems.append(
                    Problem(
                        f"{where}.name",
                        f"{model.name!r} must be unique among the models and variants and name a directory",
                    )
                )
            taken.add(model.name)
            clashes = [
                f"{model.name}-{v}" for v in (model.variants or variant_names) if f"{model.name}-{v}" in taken
            ]
            if clashes:
                problems.append(
                    Problem(f"{where}.name", f"its variants' names {clashes} are taken; rename it")
                )
            taken.update(f"{model.name}-{v}" for v in (model.variants or variant_names))
            for name in model.variants or []:
                if name not in variant_names:
                    problems.append(
                        Problem(
                            f"{where}.variants",
                            f"{name!r} is not a variant of the recipe{did_you_mean(name, variant_names)}; "
                            f"they are: {variant_names}",
                        )
                    )
        return problems


@dataclass
class PruneArguments:
    """The pruning stage: a model, the sizes to cut it to, and the text that ranks what to keep."""

    nested_items: ClassVar[dict[str, type]] = {
        "calibration_datasets": DatasetSource,
        "perplexity": PerplexitySet,
    }
    CUTS: ClassVar[tuple[str, ...]] = ("num_hidden_layers", "intermediate_size", "num_key_value_heads")

    model_name_or_path: str = field(
        metadata={"help": "The model to prune: a local directory (e.g. outputs/tiny/sft) or a Hub id."}
    )
    output_dir: str = field(metadata={"help": "Where the pruned model and prune_report.json are written."})
    num_hidden_layers: int | None = field(
        default=None, metadata={"help": "Decoder layers to keep (depth pruning); default: all."}
    )
    intermediate_size: int | None = field(
        default=None, metadata={"help": "MLP channels to keep in every layer (width pruning); default: all."}
    )
    num_key_value_heads: int | None = field(
        default=None,
        metadata={
            "help": "Key/value head groups to keep in every layer, each with its query heads (attention "
            "width pruning; grouped-query attention stays valid); default: all."
        },
    )
    calibration_datasets: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "Text that ranks layers, channels and heads (keys of a dataset source): `text` records, "
            "or conversations rendered with the model's chat template."
        },
    )
    calibration_samples: int = _field_of(QuantizeArguments, "calibration_samples")
    calibration_max_length: int = _field_of(QuantizeArguments, "calibration_max_length")
    perplexity: list[dict] = _eval_field("perplexity")
    batch_size: int = _eval_field("batch_size")
    dtype: str = _eval_field("dtype")
    seed: int = _eval_field("seed")
    trust_remote_code: bool = _eval_field("trust_remote_code")

    def __post_init__(self) -> None:
        self.calibration_datasets = [as_source(item) for item in self.calibration_datasets]
        self.perplexity = [p if isinstance(p, PerplexitySet) else PerplexitySet(**p) for p in self.perplexity]

    def cuts(self) -> dict[str, int]:
        """The config sizes the recipe sets."""
        return {key: getattr(self, key) for key in self.CUTS if getattr(self, key) is not None}

    def recipe_problems(self) -> list[Problem]:
        problems = [
            Problem(key, f"must be at least 1, got {value}")
            for key, value in self.cuts().items()
            if value < 1
        ]
        if not self.cuts():
            problems.append(
                Problem(
                    "num_hidden_layers",
                    "nothing to prune: set num_hidden_layers, intermediate_size or num_key_value_heads "
                    "below the model's",
                )
            )
        if not self.calibration_datasets:
            problems.append(
                Problem(
                    "calibration_datasets",
                    "required: pruning ranks layers, channels and heads on calibration text; name at least "
                    "one dataset source (e.g. the SFT training data)",
                )
            )
        for key in ("calibration_samples", "calibration_max_length"):
            if getattr(self, key) < 1:
                problems.append(Problem(key, f"must be at least 1, got {getattr(self, key)}"))
        return problems
