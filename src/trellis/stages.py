"""The one registry of stage kinds: what each runs, what its recipe holds, how it is launched, what it moves.

Config parsing, `trellis validate`, the pipeline, the report, the benchmark and publishing read this table
and nothing else. Adding a stage is one entry here plus its script in scripts/.

Argument classes are named as "module:Class" and imported only when a recipe of that kind is parsed, so
reading the table imports neither torch nor TRL.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

from trellis.errors import TrellisError


@dataclass(frozen=True)
class Target:
    """The held-out metric a stage is there to move, as its run record names it."""

    metric: str
    higher_is_better: bool


@dataclass(frozen=True)
class StageKind:
    name: str
    script: str | None  # in scripts/; None: the pipeline runner does the work itself (publish)
    arguments: tuple[str, ...]  # the recipe's dataclasses, "module:Class", in the order parse_recipe returns
    launcher: str  # "accelerate" (a training/evaluation process), "python" (no devices) or "runner"
    target: Target | None = None
    trains: bool = False  # writes a model trained from the input model (lineage, memory estimates)
    measures_throughput: bool = False  # records tokens/s (Trainer loops): scripts/benchmark.py can time it


_MODEL = "trellis.config:ModelArguments"
_DATA = "trellis.config:ScriptArguments"
_LOSS_DOWN = Target("eval_loss", higher_is_better=False)
_HELD_OUT_REWARD = Target("mean_reward", higher_is_better=True)  # greedy replies to held-out prompts

STAGES: dict[str, StageKind] = {
    kind.name: kind
    for kind in (
        StageKind("data", "prepare_data.py", ("trellis.data_recipe:DataArguments",), "python"),
        StageKind(
            "pretrain",
            "pretrain.py",
            ("trellis.pretraining:PretrainArguments", "trellis.pretraining:PretrainConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "sft",
            "sft.py",
            ("trellis.config:SFTScriptArguments", "trl:SFTConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "reward",
            "reward.py",
            (_DATA, "trl:RewardConfig", _MODEL),
            "accelerate",
            Target("eval_accuracy", higher_is_better=True),  # pairwise: chosen scored above rejected
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "ppo",
            "ppo.py",
            ("trellis.config:PPOScriptArguments", "trellis.ppo_config:PPOConfig", _MODEL),
            "accelerate",
            _HELD_OUT_REWARD,
            trains=True,
        ),
        StageKind(
            "grpo",
            "grpo.py",
            ("trellis.config:OnlineRLScriptArguments", "trl:GRPOConfig", _MODEL),
            "accelerate",
            _HELD_OUT_REWARD,
            trains=True,
        ),
        StageKind(
            "rloo",
            "grpo.py",
            ("trellis.config:OnlineRLScriptArguments", "trl:RLOOConfig", _MODEL),
            "accelerate",
            _HELD_OUT_REWARD,
            trains=True,
        ),
        StageKind(
            "dpo",
            "dpo.py",
            (_DATA, "trl:DPOConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "kto",
            "dpo.py",
            (_DATA, "trl:KTOConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "orpo",
            "dpo.py",
            (_DATA, "trl.experimental.orpo:ORPOConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind("eval", "evaluate.py", ("trellis.eval_recipe:EvalArguments",), "accelerate"),
        StageKind("quantize", "quantize.py", ("trellis.quantize_recipe:QuantizeArguments",), "accelerate"),
        # Uploads a model directory from the runner; its keys are the pipeline file's (trellis.pipeline).
        StageKind("publish", None, (), "runner"),
    )
}
# The kinds a recipe file can be written for (publish lives in the pipeline file only).
RECIPE_KINDS = tuple(name for name, kind in STAGES.items() if kind.arguments)


class UnknownStage(TrellisError):
    """A stage kind that is not in the registry."""


def stage_kind(name: str) -> StageKind:
    if name not in STAGES:
        match = difflib.get_close_matches(str(name), list(STAGES), n=1, cutoff=0.6)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise UnknownStage(f"unknown stage {name!r}{hint}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def argument_types(name: str) -> tuple[type, ...]:
    """The dataclasses a recipe of this kind fills (imports them: TRL's configs import transformers)."""
    classes = []
    for spec in stage_kind(name).arguments:
        module, _, attribute = spec.partition(":")
        classes.append(getattr(importlib.import_module(module), attribute))
    return tuple(classes)


def kinds_of_script(script: str) -> list[str]:
    """The stage kinds a script runs, its own (the first registered) first: dpo.py runs dpo, kto, orpo."""
    return [name for name, kind in STAGES.items() if kind.script == script]


def stage_flag(name: str) -> list[str]:
    """`--stage NAME` for a kind that runs another kind's script (kto runs dpo.py), else nothing."""
    kind = stage_kind(name)
    return ["--stage", name] if kind.script and kinds_of_script(kind.script)[0] != name else []
