"""The evaluation stage's recipe: the checkpoints to compare, lm-eval tasks, perplexity sets and gates."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from trellis.core.recipe import Problem, did_you_mean, local_path_problem


@dataclass
class Checkpoint:
    """One model the evaluation stage scores: a Hub id or local directory, or an untrained model."""

    name: str = field(metadata={"help": "Column name in the results table, e.g. base, sft, dpo."})
    path: str | None = field(
        default=None, metadata={"help": "Hub id or local model directory (e.g. outputs/tiny/sft)."}
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Instead of `path`: an untrained model built from this config (a config.json path or a "
            "mapping with `model_type`), e.g. the starting point before any training."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer, if not the one stored with the model (required with model_config)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Chat template ('chatml', a .jinja file or the text); unset: the tokenizer's own, else ChatML."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of `path`."})


@dataclass
class PerplexitySet:
    """Held-out text on which the evaluation stage measures perplexity and bits per byte."""

    label: str = field(metadata={"help": "Metric prefix in the results, e.g. corpus -> corpus.perplexity."})
    path: str = field(metadata={"help": "Hub dataset id, local dataset directory or local file(s)."})
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str = field(default="test", metadata={"help": "Split to read (ignored for local files)."})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    max_length: int | None = field(
        default=None, metadata={"help": "Window length in tokens (default: the model's context length)."}
    )
    stride: int | None = field(
        default=None,
        metadata={
            "help": "Tokens the window advances by in texts longer than max_length; every token is scored "
            "once, with at least max_length - stride tokens of context (default: max_length // 2)."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Score only the first N texts."})


@dataclass
class EvalArguments:
    """The evaluation stage: checkpoints, lm-eval tasks, perplexity sets, the comparison and the gates."""

    nested_items: ClassVar[dict[str, type]] = {"checkpoints": Checkpoint, "perplexity": PerplexitySet}

    output_dir: str = field(metadata={"help": "Where results, plots and the model card are written."})
    checkpoints: list[dict] = field(
        default_factory=list,
        metadata={"help": "Models to compare, each a mapping with the keys of Checkpoint (name, path, ...)."},
    )
    baseline: str | None = field(
        default=None, metadata={"help": "Checkpoint the others are compared with (default: the first)."}
    )
    candidate: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to publish: the gates apply to it and its results go into the model card "
            "(default: the last; with 'select_from', chosen after the evaluation)."
        },
    )
    select_from: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Checkpoints to choose the candidate from, after the evaluation: of those that pass every "
            "gate, the best by 'select_by'."
        },
    )
    select_by: str | None = field(
        default=None,
        metadata={
            "help": "The metric that ranks 'select_from', e.g. 'tiny_qa_clean.acc' (its own direction)."
        },
    )
    tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "lm-evaluation-harness task or group names (mmlu, arc_easy, gsm8k, or a custom task)."
        },
    )
    task_dirs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Directories of custom lm-eval task YAML files; relative data_files in them are resolved "
            "from the working directory."
        },
    )
    num_fewshot: int | None = field(
        default=None, metadata={"help": "Few-shot examples (default: the task's)."}
    )
    limit: float | None = field(
        default=None, metadata={"help": "Examples per task: a count, or a fraction below 1 (for quick runs)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Batch size for lm-eval and perplexity."})
    apply_chat_template: bool = field(
        default=False, metadata={"help": "Format task prompts with the model's chat template."}
    )
    fewshot_as_multiturn: bool = field(
        default=True, metadata={"help": "With the chat template: few-shot examples as earlier turns."}
    )
    system_instruction: str | None = field(default=None, metadata={"help": "System prompt for every task."})
    gen_kwargs: dict | None = field(
        default=None,
        metadata={
            "help": "Generation settings for generate-until tasks, e.g. {temperature: 0, max_gen_toks: 256}."
        },
    )
    allow_code_execution: bool = field(
        default=False,
        metadata={"help": "Run tasks that execute model-written code (humaneval, mbpp): only in a sandbox."},
    )
    backend: str = field(
        default="hf",
        metadata={
            "help": "lm-eval model backend: hf (transformers, accelerate) or vllm.",
            "choices": ["hf", "vllm"],
        },
    )
    model_args: dict = field(
        default_factory=dict,
        metadata={
            "help": "Extra arguments for the lm-eval model, e.g. {parallelize: true} (hf) or "
            "{tensor_parallel_size: 4} (vllm)."
        },
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16, float16."})
    perplexity: list[dict] = field(
        default_factory=list,
        metadata={"help": "Held-out text sets, each a mapping with the keys of PerplexitySet."},
    )
    gates: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Minimum (or maximum) values for the candidate, e.g. 'gsm8k.exact_match,strict-match >= 0.3'; "
            "a failed gate exits non-zero."
        },
    )
    model_card: bool = field(
        default=True,
        metadata={"help": "Write the candidate's model card (model-index results) to output_dir."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for lm-eval and for checkpoints built from model_config."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models with custom code."})

    def __post_init__(self) -> None:
        self.checkpoints = [c if isinstance(c, Checkpoint) else Checkpoint(**c) for c in self.checkpoints]
        self.perplexity = [p if isinstance(p, PerplexitySet) else PerplexitySet(**p) for p in self.perplexity]

    def recipe_problems(self) -> list[Problem]:
        """Cross-key checks. Checkpoint paths are checked when the stage starts, because a pipeline's
        earlier stages create them."""
        return self._checkpoint_problems() + self._measurement_problems()

    def _checkpoint_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if not self.checkpoints:
            problems.append(
                Problem(
                    "checkpoints",
                    "required: list the models to evaluate, e.g.\n"
                    "      checkpoints:\n        - name: sft\n          path: outputs/tiny/sft",
                )
            )
        names = [c.name for c in self.checkpoints]
        for name in {n for n in names if names.count(n) > 1}:
            problems.append(
                Problem("checkpoints", f"two checkpoints are named {name!r}; names must be unique")
            )
        for index, checkpoint in enumerate(self.checkpoints):
            where = f"checkpoints[{index}]"
            if bool(checkpoint.path) == bool(checkpoint.model_config):
                problems.append(
                    Problem(where, "set exactly one of 'path' (Hub id or model directory) or 'model_config'")
                )
            if checkpoint.model_config and not checkpoint.tokenizer_name_or_path:
                problems.append(Problem(f"{where}.tokenizer_name_or_path", "required with 'model_config'"))
            if isinstance(checkpoint.model_config, str) and not os.path.isfile(checkpoint.model_config):
                problems.append(
                    Problem(f"{where}.model_config", f"no such config file: {checkpoint.model_config!r}")
                )
        named = [("baseline", self.baseline), ("candidate", self.candidate)]
        named += [(f"select_from[{i}]", value) for i, value in enumerate(self.select_from)]
        for key, value in named:
            if value is not None and value not in names:
                problems.append(
                    Problem(
                        key, f"{value!r} is not a checkpoint name{did_you_mean(value, names)}; names: {names}"
                    )
                )
        if self.select_from and self.candidate is not None:
            problems.append(Problem("candidate", "set 'candidate' or 'select_from', not both"))
        if bool(self.select_from) != bool(self.select_by):
            problems.append(
                Problem(
                    "select_by" if self.select_from else "select_from",
                    "'select_from' and 'select_by' go together",
                )
            )
        return problems

    def _measurement_problems(self) -> list[Problem]:
        """The tasks, perplexity sets, gates and limit."""
        from trellis.evaluate.gates import GateError, parse_gate

        problems: list[Problem] = []
        if not self.tasks and not self.perplexity:
            problems.append(
                Problem("tasks", "nothing to evaluate: list lm-eval 'tasks' or 'perplexity' sets")
            )
        for index, item in enumerate(self.perplexity):
            if message := local_path_problem(item.path, "dataset file or directory"):
                problems.append(Problem(f"perplexity[{index}].path", message))
            if (
                item.max_length is not None
                and item.stride is not None
                and not 0 < item.stride <= item.max_length
            ):
                problems.append(Problem(f"perplexity[{index}].stride", "must be between 1 and max_length"))
        labels = [item.label for item in self.perplexity]
        for label in {x for x in labels if labels.count(x) > 1}:
            problems.append(Problem("perplexity", f"two perplexity sets are labelled {label!r}"))
        for directory in self.task_dirs:
            if not os.path.isdir(os.path.expanduser(directory)):
                problems.append(
                    Problem("task_dirs", f"no such directory: {directory!r} (relative to {os.getcwd()})")
                )
        for gate in self.gates:
            try:
                parse_gate(gate)
            except GateError as error:
                problems.append(Problem("gates", str(error)))
        if self.limit is not None and self.limit <= 0:
            problems.append(
                Problem("limit", f"must be > 0 (a count, or a fraction below 1), got {self.limit}")
            )
        return problems
