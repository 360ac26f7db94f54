"""What a training recipe says about the model and the stage's data beyond TRL's configs, and the checks
across keys (what one key requires of another)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig  # a plain dataclass; TRL imports its trainers lazily

from trellis.core.recipe import Problem
from trellis.data.arguments import ScriptArguments


@dataclass
class ModelArguments(ModelConfig):
    """TRL's ModelConfig plus what Trellis needs to build, template and save a model."""

    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Create the model from scratch from this config: a path to a config.json or an "
            "inline mapping (with `model_type`). Replaces model_name_or_path."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use, if not the one stored with the model."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Chat template: 'chatml', a path to a .jinja file, or the template text. Unset: the "
            "tokenizer's own, else ChatML."
        },
    )
    merge_adapters: bool = field(
        default=False,
        metadata={"help": "With LoRA/QLoRA: merge the adapters into the base weights in the final model."},
    )


@dataclass
class PaddingFreeScriptArguments(ScriptArguments):
    """The data of a stage whose batches are padded (SFT, reward, DPO, KTO, ORPO) plus how the model reads them."""

    padding_free_forward: bool = field(
        default=False,
        metadata={
            "help": "Run the model on each batch's sequences laid end to end without padding, attention kept "
            "within each sequence (trellis.train.padding_free); the trainer's losses see the same values. False: "
            "every sequence padded to the batch's longest, as TRL does."
        },
    )


@dataclass
class TokenLossScriptArguments(PaddingFreeScriptArguments):
    """The data of a stage whose loss takes log-probabilities of tokens (SFT, DPO, KTO, ORPO), plus how it
    computes them (trellis.train.lm_head_loss)."""

    unchunked_loss_max_mib: float = field(
        default=0.0,
        metadata={
            "help": "Compute the log-probabilities of a batch's loss tokens in one piece when their logits take "
            "at most this many MiB in float32, where TRL splits them to bound memory: SFT's chunked_nll (256-token "
            "chunks, each recomputed in the backward pass), the per-sequence loop of DPO, KTO and ORPO; SFT's last "
            "decoder layer (Llama-like, not checkpointed) then runs on the loss tokens alone after its attention. "
            "Same loss; faster where vocabularies or sequences are small. 0: as TRL does."
        },
    )


@dataclass
class PPOScriptArguments(ScriptArguments):
    """PPO's data (prompts) plus the value model, which TRL's PPOConfig has no key for."""

    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Sequence-classification model that initialises the value head. Unset: the reward model."
        },
    )


@dataclass
class OnlineRLScriptArguments(ScriptArguments):
    """GRPO's and RLOO's data (prompts) plus the reward model they optimise, which their TRL configs lack."""

    reward_model_path: str = field(
        default="",
        metadata={"help": "The reward stage's output: a sequence-classification model with one output."},
    )

    def recipe_problems(self) -> list[Problem]:
        if not self.reward_model_path:
            return [
                Problem(
                    "reward_model_path",
                    "required: the reward model to optimise (scripts/reward.py's output_dir)",
                )
            ]
        return []


def _find(parsed: list[Any], attribute: str) -> Any:
    return next((obj for obj in parsed if hasattr(obj, attribute)), None)


def check_semantics(parsed: list[Any]) -> list[Problem]:
    """Checks across keys: what one key requires of another."""
    script = next((obj for obj in parsed if isinstance(obj, ScriptArguments)), None)
    model = next((obj for obj in parsed if isinstance(obj, ModelArguments)), None)
    training = _find(parsed, "output_dir")
    problems = []
    if model is not None:
        problems += _model_problems(model, reads_packed_data=_find(parsed, "dataset_path") is not None)
    if script is not None:
        problems += _data_problems(script, training)
    for obj in parsed:  # a stage's own dataclass may check its keys against each other
        if hasattr(obj, "recipe_problems"):
            problems += obj.recipe_problems()
    return problems


def _model_problems(model: ModelArguments, reads_packed_data: bool) -> list[Problem]:
    """Rules of the model keys; `reads_packed_data`: pretraining, whose tokenizer is the data stage's."""
    quantized = "load_in_4bit" if model.load_in_4bit else "load_in_8bit"
    rules = [
        (
            bool(model.model_name_or_path) == bool(model.model_config),
            "model_name_or_path",
            "set exactly one of 'model_name_or_path' (a Hub id or local model directory) or 'model_config' "
            "(to train from scratch)",
        ),
        (
            reads_packed_data and model.tokenizer_name_or_path,
            "tokenizer_name_or_path",
            "pretraining uses the tokenizer the data stage packed with (dataset_path/tokenizer); remove this key",
        ),
        (
            model.model_config and not model.tokenizer_name_or_path and not reads_packed_data,
            "tokenizer_name_or_path",
            "a model built from 'model_config' needs a tokenizer: set 'tokenizer_name_or_path'",
        ),
        (
            model.model_config and model.use_peft,
            "use_peft",
            "LoRA adapters need pretrained base weights: set 'model_name_or_path' instead of 'model_config'",
        ),
        (
            (model.load_in_4bit or model.load_in_8bit) and not model.use_peft,
            quantized,
            "quantized base weights cannot be trained directly: set 'use_peft: true' (QLoRA)",
        ),
        (
            model.load_in_4bit and model.load_in_8bit,
            "load_in_4bit",
            "choose one of 'load_in_4bit' and 'load_in_8bit'",
        ),
        (model.merge_adapters and not model.use_peft, "merge_adapters", "only applies with 'use_peft: true'"),
    ]
    return [Problem(key, message) for broken, key, message in rules if broken]


def _data_problems(script: ScriptArguments, training: Any) -> list[Problem]:
    """Rules of the data keys, and the held-out data that evaluation during training needs."""
    problems = []
    if not script.datasets:
        example = "e.g.\n      datasets:\n        - path: data/train.jsonl"
        problems.append(Problem("datasets", f"required: list the training data, {example}"))
    evaluates = (
        training is not None and str(getattr(training.eval_strategy, "value", training.eval_strategy)) != "no"
    )
    if evaluates and not (script.eval_datasets or script.test_split_size):
        message = (
            "evaluation is on but the recipe has no held-out data: set 'eval_datasets' or 'test_split_size' "
            "(or eval_strategy: 'no')"
        )
        problems.append(Problem("eval_strategy", message))
    return problems
