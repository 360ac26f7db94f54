"""What a pipeline run will do: each stage's fingerprint (config and inputs), the decision to skip, resume or
run it, the command that runs it, and the dry run's plan with memory estimates."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from trellis.core.hashing import content_hash, file_stamps
from trellis.core.run_record import RECORD_NAME, read_record
from trellis.pipeline.spec import PUBLISH, Pipeline, Stage, ancestry, is_within, strings
from trellis.stages import stage_flag, stage_kind
from trellis.train.memory import MESH_DIMS

# --- fingerprints and the decision to run ----------------------------------------------------------------


_HASHED_FILE_BYTES = 256 * 1024**2  # larger local inputs are known by size and modification time


def config_hash(stage: Stage, pipeline: Pipeline) -> str:
    """What the stage runs with: its resolved recipe, accelerate config and environment."""
    accelerate = stage.accelerate_config
    accelerate_text = (
        Path(accelerate).read_text() if accelerate and os.path.isfile(accelerate) else accelerate
    )
    return content_hash(
        {
            "stage": stage.kind,
            "recipe": stage.resolved,
            "accelerate": accelerate_text,
            "env": {**pipeline.env, **stage.env},
        }
    )


def record_hash(output_dir: str) -> str | None:
    path = Path(output_dir) / RECORD_NAME
    return file_stamps(str(path))[str(path)] if path.exists() else None


def input_fingerprints(stage: Stage, pipeline: Pipeline) -> dict[str, Any]:
    """The run records of the stages it reads, and the local files it names that no stage writes."""
    inputs: dict[str, Any] = {name: record_hash(pipeline.stage(name).output_dir) for name in stage.depends_on}
    produced = [s.output_dir for s in pipeline.stages]
    local = sorted(
        {
            value
            for key, item in stage.resolved.items()
            if key != "output_dir"
            for value in strings(item)
            if os.path.exists(value) and not any(is_within(value, out) for out in produced)
        }
    )
    if local:
        inputs["files"] = content_hash({path: file_stamps(path, _HASHED_FILE_BYTES) for path in local})
    return inputs


def decide(stage: Stage, pipeline: Pipeline, state: dict, rerunning: set[str]) -> str:
    """'skip' (complete, nothing changed), 'resume' (interrupted: same config and inputs) or 'run' (afresh).

    `rerunning` holds the stages that will run before this one in a dry run (their records will change).
    """
    if any(name in rerunning for name in stage.depends_on):
        return "run"
    stored = state.get("stages", {}).get(stage.name)
    if not stored or stored.get("config_hash") != config_hash(stage, pipeline):
        return "run"
    if stored.get("inputs") != input_fingerprints(stage, pipeline):
        return "run"
    record = read_record(stage.output_dir)
    if record is None:
        return "run"
    if record.get("status") == "complete" and stored.get("record_hash") in (
        None,
        record_hash(stage.output_dir),
    ):
        return "skip"
    return "resume"


# --- commands ------------------------------------------------------------------------------------------


def scripts_dir() -> Path:
    """scripts/ of the Trellis checkout this code belongs to, else of the working directory."""
    checkout = Path(__file__).resolve().parents[3] / "scripts"
    return checkout if checkout.is_dir() else Path("scripts").resolve()


def command(stage: Stage, pipeline: Pipeline) -> list[str]:
    kind = stage_kind(stage.kind)
    script = str(scripts_dir() / kind.script)
    config = ["--config", str(pipeline.resolved_recipe_path(stage))]
    config += stage_flag(kind.name)  # e.g. kto runs dpo.py's flow
    if kind.launcher == "python":
        return [sys.executable, script, *config]
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if stage.accelerate_config:
        launcher += ["--config_file", stage.accelerate_config]
    return [*launcher, script, *config]


def shown(argv: list[str]) -> str:
    """A command as the user would type it."""
    if argv[1:3] == ["-m", "accelerate.commands.launch"]:
        argv = ["accelerate", "launch", *argv[3:]]
    elif argv[0] == sys.executable:
        argv = ["python", *argv[1:]]
    return shlex.join(argv)


# --- the dry run -----------------------------------------------------------------------------------------


def print_plan(pipeline: Pipeline, selected: list[Stage], forced: set[str], state: dict) -> None:
    rerunning: set[str] = set()
    for stage in pipeline.stages:
        if stage not in selected:
            print(f"\n[{stage.index + 1}] {stage.name}: not selected")
            continue
        action = decide(stage, pipeline, state, rerunning)
        if stage.name in forced and action == "skip":
            action = "run"
        if action != "skip":
            rerunning.add(stage.name)
        what = {"skip": "up to date: skipped", "resume": "resumes from its checkpoints", "run": "runs"}[
            action
        ]
        print(f"\n[{stage.index + 1}] {stage.name} ({stage.kind}): {what}")
        if stage.kind == PUBLISH:
            options = ", ".join(f"{k}={v}" for k, v in stage.publish.items())
            print(f"  publish {options}")
            continue
        print(f"  $ {shown(command(stage, pipeline))}")
        if depends := stage.depends_on:
            print(f"  reads: {', '.join(depends)}")
        estimate = memory_estimate(stage, pipeline)
        if estimate:
            print("  " + estimate.replace("\n", "\n  "))


def memory_estimate(stage: Stage, pipeline: Pipeline) -> str | None:
    """The per-device training-memory estimate of a training stage, from its model's config (no weights load)."""
    if not stage_kind(stage.kind).trains:
        return None
    try:
        config = model_config(stage, pipeline)
    except Exception as error:  # e.g. a Hub model while offline
        return f"memory estimate unavailable: {error}"
    import torch
    from transformers import AutoModelForCausalLM

    from trellis.train.memory import estimate_training_memory

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    recipe = stage.resolved
    params = sum(p.numel() for p in model.parameters())
    trainable = params // 100 if recipe.get("use_peft") else params
    sharding, processes, mesh = accelerate_layout(stage.accelerate_config)
    bf16 = bool(recipe.get("bf16") or recipe.get("fp16"))
    estimate = estimate_training_memory(
        params=params,
        trainable=trainable,
        param_bytes=2 if recipe.get("dtype") in ("bfloat16", "float16") else 4,
        batch_size=int(recipe.get("per_device_train_batch_size", 8)),
        seq_len=int(_sequence_length(stage, pipeline)),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        activation_bytes=2 if bf16 else 4,
        sharding=sharding,
        world_size=processes,
        activation_checkpointing=bool(recipe.get("activation_checkpointing")),
        mesh=mesh,
    )
    lora = " (LoRA: trainable parameters taken as 1%)" if recipe.get("use_peft") else ""
    layout = " x ".join(f"{dim} {size}" for dim, size in mesh.items() if size > 1)
    return (
        f"{params / 1e6:.2f}M parameters, {sharding} sharding over {processes} process(es)"
        + (f" ({layout})" if layout else "")
        + f"{lora}\n"
        + estimate.table()
    )


def model_config(stage: Stage, pipeline: Pipeline):
    """The model config a stage trains: its `model_config`, or that of the earlier stage it starts from."""
    from transformers import AutoConfig

    recipe = stage.resolved
    if recipe.get("model_config"):
        spec = recipe["model_config"]
        spec = dict(spec) if isinstance(spec, dict) else json.loads(Path(spec).read_text())
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    source = recipe.get("model_name_or_path")
    for other in reversed(pipeline.stages[: stage.index]):
        if source and is_within(source, other.output_dir) and other.kind != PUBLISH:
            return model_config(other, pipeline)
    return AutoConfig.from_pretrained(source)


def _sequence_length(stage: Stage, pipeline: Pipeline) -> int:
    """The stage's training sequence length: its max_length, else that of the stage it reads (a data
    stage's block_size, an SFT model's max_length)."""
    for source in reversed(ancestry(stage, pipeline)):
        for key in ("max_length", "block_size"):
            if source.resolved.get(key):
                return source.resolved[key]
    return 1024


def accelerate_layout(accelerate_config: str | None) -> tuple[str, int, dict[str, int]]:
    """What an accelerate config asks for: the sharding, the processes of all machines (accelerate's
    num_processes counts them all) and the parallelism_config mesh sizes."""
    if not accelerate_config or not os.path.isfile(accelerate_config):
        return "none", 1, {}
    config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    processes = int(config.get("num_processes") or 1)
    sizes = config.get("parallelism_config") or {}
    mesh = {dim: int(sizes.get(f"parallelism_config_{dim}_size", 1)) for dim in MESH_DIMS} if sizes else {}
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        return "fsdp", processes, mesh
    if kind == "DEEPSPEED":
        stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 0))
        return (f"zero{stage}" if stage else "none"), processes, mesh
    return "none", processes, mesh
