"""The one registry of stage kinds: what each runs, what its recipe holds, how it is launched, what it moves.

Config parsing, `trellis validate`, the pipeline, the report, the benchmark and publishing read this table
and nothing else. Adding a stage is one entry here plus its script in scripts/.

Argument classes are named as "module:Class" and imported only when a recipe of that kind is parsed, so
reading the table imports neither torch nor TRL. `parse_recipe(kind)` is how every stage script reads its
recipe: strictly (trellis.core.recipe), into the dataclasses named here.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.core.bounds import value_bounds
from trellis.core.recipe import (
    Problem,
    RecipeError,
    apply_env,
    check_local_paths,
    check_recipe,
    did_you_mean,
    field_names,
    format_problems,
    load_recipe_file,
    pop_flag,
)


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
    report: str | None = None  # the markdown file in its output_dir that the pipeline report includes


_MODEL = "trellis.train.arguments:ModelArguments"
_DATA = "trellis.data.arguments:ScriptArguments"
_PADDED_DATA = "trellis.train.arguments:PaddingFreeScriptArguments"  # batches padded, or not
_TOKEN_LOSS_DATA = "trellis.train.arguments:TokenLossScriptArguments"  # ... and a loss on tokens' log-probs
_LOSS_DOWN = Target("eval_loss", higher_is_better=False)
_HELD_OUT_REWARD = Target("mean_reward", higher_is_better=True)  # greedy replies to held-out prompts

STAGES: dict[str, StageKind] = {
    kind.name: kind
    for kind in (
        StageKind("data", "prepare_data.py", ("trellis.data.arguments:DataArguments",), "python"),
        StageKind(
            "pretrain",
            "pretrain.py",
            (
                "trellis.train.pretraining:PretrainArguments",
                "trellis.train.pretraining:PretrainConfig",
                _MODEL,
            ),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "sft",
            "sft.py",
            (_TOKEN_LOSS_DATA, "trl:SFTConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "reward",
            "reward.py",
            (_PADDED_DATA, "trl:RewardConfig", _MODEL),
            "accelerate",
            Target("eval_accuracy", higher_is_better=True),  # pairwise: chosen scored above rejected
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "ppo",
            "ppo.py",
            ("trellis.train.arguments:PPOScriptArguments", "trellis.train.ppo_config:PPOConfig", _MODEL),
            "accelerate",
            _HELD_OUT_REWARD,
            trains=True,
        ),
        StageKind(
            "grpo",
            "grpo.py",
            ("trellis.train.arguments:OnlineRLScriptArguments", "trl:GRPOConfig", _MODEL),
            "accelerate",
            _HELD_OUT_REWARD,
            trains=True,
        ),
        StageKind(
            "rloo",
            "grpo.py",
            ("trellis.train.arguments:OnlineRLScriptArguments", "trl:RLOOConfig", _MODEL),
            "accelerate",
            _HELD_OUT_REWARD,
            trains=True,
        ),
        StageKind(
            "dpo",
            "dpo.py",
            (_TOKEN_LOSS_DATA, "trl:DPOConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "kto",
            "dpo.py",
            (_TOKEN_LOSS_DATA, "trl:KTOConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind(
            "orpo",
            "dpo.py",
            (_TOKEN_LOSS_DATA, "trellis.train.orpo:ORPOConfig", _MODEL),
            "accelerate",
            _LOSS_DOWN,
            trains=True,
            measures_throughput=True,
        ),
        StageKind("generate", "generate.py", ("trellis.train.generation:GenerateArguments",), "accelerate"),
        StageKind(
            "distill",
            "distill.py",
            (
                _TOKEN_LOSS_DATA,
                "trellis.train.distillation:DistillConfig",
                _MODEL,
            ),
            "accelerate",
            _LOSS_DOWN,  # the divergence from the teacher on held-out answers
            trains=True,
            measures_throughput=True,
        ),
        StageKind("eval", "evaluate.py", ("trellis.evaluate.arguments:EvalArguments",), "accelerate"),
        StageKind(
            "quantize",
            "quantize.py",
            ("trellis.compress.arguments:QuantizeArguments",),
            "accelerate",
            report="quantization_report.md",
        ),
        StageKind("prune", "prune.py", ("trellis.compress.arguments:PruneArguments",), "accelerate"),
        StageKind(
            "export",
            "export.py",
            ("trellis.deploy.arguments:ExportArguments",),
            "python",
            report="export_report.md",
        ),
        StageKind(
            "serve",
            "serve.py",
            ("trellis.deploy.arguments:ServeArguments",),
            "python",
            report="serving_report.md",
        ),
        # Uploads a model directory from the runner; its keys are the pipeline file's (trellis.pipeline).
        StageKind("publish", None, (), "runner"),
    )
}
# The kinds a recipe file can be written for (publish lives in the pipeline file only).
RECIPE_KINDS = tuple(name for name, kind in STAGES.items() if kind.arguments)


def stage_kind(name: str) -> StageKind:
    if name not in STAGES:
        raise RecipeError(
            f"unknown stage {name!r}{did_you_mean(str(name), STAGES)}; stages: {', '.join(STAGES)}"
        )
    return STAGES[name]


def stage_types(name: str) -> tuple[type, ...]:
    """The dataclasses a recipe of this kind fills (imports them: TRL's configs import transformers)."""
    classes = []
    for spec in stage_kind(name).arguments:
        module, _, attribute = spec.partition(":")
        # __import__ rather than importlib.import_module: a warning the import raises is then attributed
        # to this module, so trellis.core.console's filters for Trellis's deliberate imports apply.
        classes.append(getattr(__import__(module, fromlist=[attribute]), attribute))
    return tuple(classes)


def kinds_of_script(script: str) -> list[str]:
    """The stage kinds a script runs, its own (the first registered) first: dpo.py runs dpo, kto, orpo."""
    return [name for name, kind in STAGES.items() if kind.script == script]


def stage_flag(name: str) -> list[str]:
    """`--stage NAME` for a kind that runs another kind's script (kto runs dpo.py), else nothing."""
    kind = stage_kind(name)
    return ["--stage", name] if kind.script and kinds_of_script(kind.script)[0] != name else []


# --- parsing a stage's recipe ---------------------------------------------------------------------


def parse_recipe(stage: str, args: list[str] | None = None, check_paths: bool = True) -> tuple[Any, ...]:
    """Parse `--config FILE.yaml` plus `--key value` overrides into the stage's dataclasses.

    With check_paths=False, local inputs need not exist yet (e.g. the output of an earlier stage).
    """
    args = list(sys.argv[1:] if args is None else args)
    config_path, cli_args = pop_flag(args, "--config", "a path to a recipe YAML file")
    chosen, cli_args = pop_flag(cli_args, "--stage", "a stage kind")
    if chosen not in (None, stage):
        raise RecipeError(f"--stage {chosen!r}: this run parses a {stage!r} recipe")
    dataclass_types = stage_types(stage)
    where = config_path or "command line"

    recipe, lines = load_recipe_file(config_path) if config_path else ({}, {})
    apply_env(recipe.pop("env", None), where)
    recipe, problems = check_recipe(recipe, dataclass_types, lines)
    if problems:
        raise RecipeError(format_problems(where, problems))

    from trl import TrlParser

    class _Parser(TrlParser):
        def error(self, message: str) -> typing.NoReturn:  # argparse would print a 200-option usage text
            raise RecipeError(f"{where}: {message}")

    parser = _Parser(dataclass_types)
    parser.set_defaults_with_config(**recipe)
    problems = _command_line_range_problems(parser, cli_args, dataclass_types)
    if problems:  # before the dataclasses' own checks, which would name neither the key nor the range
        raise RecipeError(format_problems("command line", problems))
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=cli_args, return_remaining_strings=True)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{where}: {error}") from None
    if unknown:
        names = field_names(dataclass_types)
        flags = [arg for arg in unknown if arg.startswith("--")] or unknown
        raise RecipeError(
            "unknown command-line argument(s): "
            + "; ".join(f"{flag}{did_you_mean(flag.lstrip('-').split('=')[0], names)}" for flag in flags)
        )
    from trellis.train.arguments import check_semantics  # (imports TRL's ModelConfig)

    problems = check_semantics(parsed) + (check_local_paths(parsed) if check_paths else [])
    if problems:
        raise RecipeError(format_problems(where, problems))
    return tuple(parsed)


def _command_line_range_problems(
    parser: Any, cli_args: list[str], dataclass_types: tuple[type, ...]
) -> list[Problem]:
    """Range problems of the values the command line changes (the recipe file's were checked already)."""
    given, _ = parser.parse_known_args(cli_args)
    before, _ = parser.parse_known_args([])  # the recipe file's values and the defaults
    return [
        Problem(f"--{key}", message)
        for key, bound in value_bounds(dataclass_types).items()
        if getattr(given, key, None) != getattr(before, key, None)
        and (message := bound.problem(getattr(given, key)))
    ]


def validate_recipe_file(path: str, stage: str | None = None, check_paths: bool = True) -> str:
    """Parse a stage recipe exactly as its script would, without training. Returns the stage name."""
    stage = stage or stage_of_recipe(path)
    # A GPU recipe (bf16) must validate on a machine without one, so validation runs it as if on CPU.
    trains = "use_cpu" in field_names(stage_types(stage))  # the data, eval and quantize stages do not
    on_cpu = ["--use_cpu", "true"] if trains and not _cuda_available() else []
    parse_recipe(stage, ["--config", path, *on_cpu], check_paths)
    return stage


def _cuda_available() -> bool:
    import torch  # only here: the stages that do not train check their recipes without torch (~1.5 s)

    return torch.cuda.is_available()


def stage_of_recipe(path: str) -> str:
    """The stage a recipe file is for, from its name: sft.yaml, sft_lora.yaml, sft-qlora.yaml -> sft."""
    stem = Path(path).stem.replace("-", "_").split("_")[0]
    if stem not in RECIPE_KINDS:
        raise RecipeError(
            f"{path}: cannot tell the stage from the file name; name it <stage>[_variant].yaml or pass "
            f"--stage (one of: {', '.join(RECIPE_KINDS)})"
        )
    return stem


def stage_from_command_line(script_stage: str, args: list[str] | None = None) -> str:
    """The stage kind a script shared by several kinds runs (dpo.py: dpo, kto, orpo): `--stage KIND`, else
    the kind the recipe's file name starts with (kto.yaml, kto_lora.yaml), else the script's own."""
    args = list(sys.argv[1:] if args is None else args)
    kinds = kinds_of_script(stage_kind(script_stage).script)
    chosen, rest = pop_flag(args, "--stage", f"one of: {', '.join(kinds)}")
    if chosen is None:
        config, _ = pop_flag(rest, "--config", "a path to a recipe YAML file")
        named = Path(config).stem.replace("-", "_").split("_")[0] if config else None
        return named if named in kinds else script_stage
    if chosen not in kinds:
        raise RecipeError(
            f"--stage {chosen!r}: this script runs {', '.join(kinds)}{did_you_mean(chosen, kinds)}"
        )
    return chosen
