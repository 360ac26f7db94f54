"""The deployment stages' recipes. Export: the model, the GGUF types to write, and the held-out text the
files' logits are checked on. Serve: the model, the prompts vLLM answers, and the server's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trellis.core.recipe import Problem
from trellis.data.arguments import DatasetSource, as_source

# GGUF types llama.cpp's converter writes from the Hugging Face weights (`--outtype`).
CONVERTED_TYPES = ("f32", "f16", "bf16", "q8_0")
# Types llama.cpp's quantizer makes from the f16 file. K-quants work in rows of 256 weights: a narrower
# layer falls back to a legacy type of the same size (llama.cpp logs which).
QUANTIZED_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")
GGUF_TYPES = CONVERTED_TYPES + QUANTIZED_TYPES


@dataclass
class ExportArguments:
    """The export stage: a trained model written as GGUF files, each checked against the original."""

    nested_items: ClassVar[dict[str, type]] = {"check_datasets": DatasetSource}

    model_name_or_path: str = field(
        metadata={"help": "The trained model: a local directory (e.g. outputs/tiny/dpo) or a Hub id."}
    )
    output_dir: str = field(
        metadata={
            "help": "Where the GGUF files (<name>-<type>.gguf), export_report.md/.json and the card go."
        }
    )
    types: list[str] = field(
        default_factory=lambda: ["f16", "q8_0", "q4_k_m"],
        metadata={"help": f"GGUF types to write: {', '.join(GGUF_TYPES)}."},
    )
    name: str | None = field(
        default=None, metadata={"help": "File name stem (default: the model directory's name)."}
    )
    check_datasets: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "Held-out text (keys of a dataset source) on which each file's next-token logits, "
            "perplexity and tokenization are compared with the original's; conversations are rendered "
            "with the chat template."
        },
    )
    check_samples: int = field(default=32, metadata={"help": "Records drawn with `seed` for the check."})
    check_max_length: int = field(default=256, metadata={"help": "Tokens per checked record at most."})
    seed: int = field(default=0, metadata={"help": "Draws the checked records."})
    threads: int | None = field(
        default=None, metadata={"help": "llama.cpp's threads for quantizing and checking (default: all)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model repository's own code (only for models you trust)."}
    )

    def __post_init__(self) -> None:
        self.check_datasets = [as_source(item) for item in self.check_datasets]

    def recipe_problems(self) -> list[Problem]:
        problems = []
        if not self.types:
            problems.append(Problem("types", f"list at least one GGUF type: {', '.join(GGUF_TYPES)}"))
        for gguf_type in self.types:
            if gguf_type not in GGUF_TYPES:
                problems.append(
                    Problem("types", f"unknown GGUF type {gguf_type!r}; known: {', '.join(GGUF_TYPES)}")
                )
        if len(set(self.types)) != len(self.types):
            problems.append(Problem("types", "lists a type twice"))
        for key in ("check_samples", "check_max_length"):
            if getattr(self, key) < 1:
                problems.append(Problem(key, f"must be at least 1, got {getattr(self, key)}"))
        return problems


@dataclass
class ServeArguments:
    """The serving check: vLLM serves the model; its answers must be transformers' greedy answers."""

    nested_items: ClassVar[dict[str, type]] = {"datasets": DatasetSource}

    model_name_or_path: str = field(
        metadata={"help": "The model to serve: a local directory (e.g. outputs/tiny/dpo) or a Hub id."}
    )
    output_dir: str = field(
        metadata={"help": "Where serving_report.md/.json, the answers and the server's log go."}
    )
    datasets: list[dict] = field(
        default_factory=list,
        metadata={"help": "Held-out prompts (keys of a dataset source): a `prompt` column or conversations."},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Send only the first N prompts."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens an answer may have at most."})
    concurrency: int = field(default=32, metadata={"help": "Requests in flight at once."})
    min_match_rate: float = field(
        default=0.95,
        metadata={
            "help": "Share of prompts whose served answer must equal transformers' greedy answer; below it "
            "the stage fails (after writing its report)."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights' dtype in both engines (bfloat16 on GPUs).",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )
    vllm_python: str = field(
        default=".venv-serve/bin/python",
        metadata={
            "help": "The Python of an environment with vLLM (`make serve-env` makes .venv-serve: vLLM pins "
            "its own transformers)."
        },
    )
    vllm_args: list[str] = field(
        default_factory=list,
        metadata={"help": "More `vllm serve` arguments, e.g. [--tensor-parallel-size, '2']."},
    )
    max_model_len: int = field(default=512, metadata={"help": "Longest prompt plus answer the server takes."})
    startup_timeout: float = field(
        default=600.0, metadata={"help": "Seconds the server may take to load before the stage fails."}
    )
    seed: int = field(default=0, metadata={"help": "The server's seed, and the order prompts are drawn in."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model repository's own code (only for models you trust)."}
    )

    def __post_init__(self) -> None:
        self.datasets = [as_source(item) for item in self.datasets]

    def recipe_problems(self) -> list[Problem]:
        problems = []
        if not self.datasets:
            problems.append(Problem("datasets", "required: the held-out prompts to send (a dataset source)"))
        for key in ("max_new_tokens", "concurrency", "max_model_len"):
            if getattr(self, key) < 1:
                problems.append(Problem(key, f"must be at least 1, got {getattr(self, key)}"))
        if not 0 <= self.min_match_rate <= 1:
            problems.append(Problem("min_match_rate", f"must be between 0 and 1, got {self.min_match_rate}"))
        return problems
