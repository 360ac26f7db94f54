"""Pretraining in several CPU processes (gloo) under FSDP2, DeepSpeed ZeRO-3 and FSDP2 x tensor parallel, as
`accelerate launch` runs it: the parameters (and the EMA) are really sharded, the saved full models score what
the trainer reported, and a killed tensor-parallel run resumes onto a single process's curve."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import psutil
import pytest
from conftest import SCRIPTS, run_script, wait_for_file
from safetensors import safe_open
from test_pretrain import validation_loss

from trellis.core.run_record import read_record

# What accelerate_configs/fsdp.yaml and zero3.yaml ask for, on 2 CPU processes in fp32.
FSDP2_ON_CPU = """\
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: true
"""
ZERO3_ON_CPU = """\
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: true
  zero3_save_16bit_model: true
  offload_optimizer_device: none
  offload_param_device: none
"""
CPU_PROCESSES = """\
compute_environment: LOCAL_MACHINE
mixed_precision: 'no'
num_machines: 1
num_processes: {processes}
machine_rank: 0
main_process_port: {port}
rdzv_backend: static
same_network: true
use_cpu: true
"""
# Tiny: the point is the sharded path, not learning. EMA from step 2 so the EMA differs from the raw weights.
STEPS = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "8", "--logging_steps", "4"]
STEPS += ["--ema_start_step", "2", "--average_last_checkpoints", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validation_blocks(workdir: Path) -> int:
    return len(datasets.load_from_disk(str(workdir / "outputs/tiny/data/packed"))["validation"])


def pretrain_on_two_processes(
    workdir: Path, tmp_path: Path, sharding_config: str, seed: int
) -> tuple[Path, str]:
    config = tmp_path / "accelerate.yaml"
    config.write_text(sharding_config + CPU_PROCESSES.format(processes=2, port=free_port()))
    out = tmp_path / "pretrain"
    # One batch of exactly the validation split: with a shorter last batch, 2 processes pad it with repeated
    # blocks, which moves the Trainer's mean (~0.005 here) away from the exact one computed on reload.
    eval_batch = validation_blocks(workdir)
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config)]
    args = ["pretrain.py", "--config", "recipes/tiny/pretrain.yaml", "--output_dir", str(out), *STEPS]
    args += ["--per_device_eval_batch_size", str(eval_batch), "--seed", str(seed)]
    result = run_script(args, cwd=workdir, launcher=accelerate)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return out, result.stdout + result.stderr


def assert_sharded_and_reloadable(out: Path, data: Path, sharding: str, record_property) -> None:
    record = read_record(str(out))
    assert record["status"] == "complete"
    layout = record["shard_layout"]
    assert (layout["sharding"], layout["processes"]) == (sharding, 2)
    # Recorded from inside the run: each process held only part of every parameter.
    for name, param in layout["parameters"].items():
        held = param["per_process"]
        assert len(held) == 2 and all(0 < n < param["numel"] for n in held), (name, param)
        assert sum(held) >= param["numel"], (name, param)  # together they hold it all (ZeRO-3 pads)
    # The saved full models score what the trainer reported on the sharded model.
    metrics = record["metrics"]
    record_property("heldout_loss_drop_nats", metrics["initial"]["eval_loss"] - metrics["eval"]["eval_loss"])
    # BOUND distributed-learns: drop after 8 steps, seeds 0-4, 1 thread: FSDP2 1.596 / 1.625 / 1.659, ZeRO-3
    # 1.589 / 1.605 / 1.645 nats (min / median / max): the bound is over 15x the spread below the worst run.
    assert metrics["eval"]["eval_loss"] < metrics["initial"]["eval_loss"] - 0.5
    for variant, name in (("", "eval"), ("ema", "eval_ema"), ("averaged", "eval_averaged")):
        reloaded = validation_loss(out / variant, data, batch_size=validation_blocks(data.parents[2]))
        assert reloaded == pytest.approx(metrics[name]["eval_loss"], abs=1e-4), variant
    assert metrics["eval_ema"]["eval_loss"] != pytest.approx(metrics["eval"]["eval_loss"], abs=1e-4)
    # The tiny model ties its LM head to the input embedding: saved once, as a single-process run saves it.
    for variant in ("", "ema", "averaged"):
        with safe_open(out / variant / "model.safetensors", framework="pt") as weights:
            assert "lm_head.weight" not in set(weights.keys()), variant


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_shards_and_saves_a_full_model(
    workdir, tiny_data_output, tmp_path, seed, record_property
):
    out, log = pretrain_on_two_processes(workdir, tmp_path, FSDP2_ON_CPU, seed)
    assert "2 process(es), FSDP, sharding: fsdp" in log and "fell back" not in log
    assert_sharded_and_reloadable(out, tiny_data_output, "fsdp", record_property)
    # The EMA is sharded like the parameters: each process checkpoints its own shard.
    assert sorted(p.name for p in (out / "checkpoint-8").glob("ema*")) == [
        "ema-rank0-of-2.safetensors",
        "ema-rank1-of-2.safetensors",
    ]


@pytest.mark.slow
def test_zero3_on_two_cpu_processes_shards_and_saves_a_full_model(
    workdir, tiny_data_output, tmp_path, seed, record_property
):
    pytest.importorskip("deepspeed")
    out, log = pretrain_on_two_processes(workdir, tmp_path, ZERO3_ON_CPU, seed)
    assert "2 process(es), DEEPSPEED, sharding: zero3" in log
    assert_sharded_and_reloadable(out, tiny_data_output, "zero3", record_property)


# accelerate_configs/fsdp_tp.yaml on 4 CPU processes: FSDP2 over 2 groups x tensor parallel over 2 processes.
FSDP2_TP_ON_CPU = FSDP2_ON_CPU.replace(
    "fsdp_cpu_ram_efficient_loading: true", "fsdp_cpu_ram_efficient_loading: false"
)
FSDP2_TP_ON_CPU += (
    "parallelism_config:\n  parallelism_config_dp_shard_size: 2\n  parallelism_config_tp_size: 2\n"
)
TP_STEPS = ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "8", "--logging_steps", "1"]
TP_STEPS += ["--ema_start_step", "2", "--average_last_checkpoints", "2"]
# What transformers' tensor-parallel plan for Llama does on the tp mesh: column-wise layers and the (tied)
# embedding split their output dimension, row-wise layers their input dimension; norms are replicated.
TP_PLACEMENT = {"q_proj": "S(0)", "k_proj": "S(0)", "v_proj": "S(0)", "gate_proj": "S(0)", "up_proj": "S(0)"}
TP_PLACEMENT |= {"o_proj": "S(1)", "down_proj": "S(1)", "embed_tokens": "S(0)", "norm": "R"}


def step_losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_fsdp2_with_tensor_parallel_on_four_cpu_processes_resumes_onto_the_single_process_curve(
    workdir, tiny_data_output, tmp_path, seed, record_property
):
    config = tmp_path / "accelerate.yaml"
    config.write_text(FSDP2_TP_ON_CPU + CPU_PROCESSES.format(processes=4, port=free_port()))
    out = tmp_path / "tp"
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config)]
    args = ["pretrain.py", "--config", "recipes/tiny/pretrain.yaml", "--output_dir", str(out), *TP_STEPS]
    args += ["--per_device_eval_batch_size", str(validation_blocks(workdir)), "--seed", str(seed)]
    command = [*accelerate, str(SCRIPTS / args[0]), *args[1:]]
    killed = subprocess.Popen(
        command,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_file(out / "checkpoint-4" / "trainer_state.json", killed)
    # The launcher and its 4 processes (torchrun starts each in a session of its own), as a machine crash.
    for process in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        process.send_signal(signal.SIGKILL)
    killed.wait()
    result = run_script(args, cwd=workdir, launcher=accelerate)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    record = read_record(str(out))
    assert record["status"] == "complete" and record["resumed_from"] == "checkpoint-4"

    # Recorded from inside the run: every parameter is a DTensor on the 2 x 2 mesh, placed on tp as the plan says
    # and sharded by FSDP2 on the other dimension; each process holds a quarter of each matrix.
    layout = record["shard_layout"]
    assert layout["mesh"] == {"dp_shard": 2, "tp": 2}
    for name, param in layout["parameters"].items():
        kind = next(kind for kind in TP_PLACEMENT if name.split(".")[-2].endswith(kind))
        assert param["placements"]["tp"] == TP_PLACEMENT[kind], (name, param)
        assert param["placements"]["dp_shard_cp"] != "R", (name, param)
        copies = 2 if TP_PLACEMENT[kind] == "R" else 1  # a norm is whole on both processes of a tp group
        assert sum(param["per_process"]) == copies * param["numel"], (name, param)
        assert max(param["per_process"]) * 4 <= copies * param["numel"] * 1.1, (name, param)  # uneven vocab

    # The same 32 blocks per step in one process: the same losses, step by step, across the kill.
    reference = tmp_path / "single"
    single = [
        "pretrain.py",
        "--config",
        "recipes/tiny/pretrain.yaml",
        "--output_dir",
        str(reference),
        *TP_STEPS,
    ]
    single += ["--per_device_train_batch_size", "32", "--seed", str(seed)]
    result = run_script(single, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    differences = [abs(a - b) for a, b in zip(step_losses(out), step_losses(reference), strict=True)]
    record_property("tp_max_step_loss_difference", max(differences))
    # BOUND tp-matches-single: largest |loss difference| over the 8 steps, seeds 0-2 x 1, 2 threads: 9.5e-07 /
    # 9.5e-07 / 1.4e-06 (min / median / max: 2-3 float32 ulps of a loss of ~6, summation order only); the
    # bound is 70x the worst run, and 600x below the loss's own moves (0.06-0.47 per step from step 2 to 8).
    assert len(differences) == 8 and max(differences) < 1e-4

    # The gathered final, EMA and averaged models are plain directories that score what the sharded model
    # reported (the averaged weights were cut back into FSDP2-over-TP shards to be evaluated).
    for variant, name in (("", "eval"), ("ema", "eval_ema"), ("averaged", "eval_averaged")):
        reloaded = validation_loss(out / variant, tiny_data_output, batch_size=validation_blocks(workdir))
        assert reloaded == pytest.approx(record["metrics"][name]["eval_loss"], abs=1e-4), variant
        assert "distributed_config" not in json.loads((out / variant / "config.json").read_text())


CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_ask_for_what_their_names_say(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys fail
    kind = str(config.distributed_type).split(".")[-1]
    name = path.stem
    if "fsdp" in name or "hsdp" in name:
        assert kind == "FSDP" and config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_offload_params"] == (name == "fsdp_offload")
        assert (
            config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        )  # the final model is gathered
    elif name.startswith("zero"):
        assert kind == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == int(name[4])
        offloaded = (
            config.deepspeed_config["offload_param_device"],
            config.deepspeed_config["offload_optimizer_device"],
        )
        assert offloaded == (("cpu", "cpu") if name.endswith("offload") else ("none", "none"))
        if config.deepspeed_config["zero_stage"] == 3:  # else output_dir would hold no full model
            assert config.deepspeed_config["zero3_save_16bit_model"]
    assert (config.num_machines > 1) == name.startswith("multi_node")
    # The mesh its name promises, over exactly the processes it launches (accelerate checks this only at run time).
    sizes = {key.split("_", 2)[2].removesuffix("_size"): n for key, n in config.parallelism_config.items()}
    wanted = {"tp": "_tp" in name, "cp": "_cp" in name, "dp_replicate": "hsdp" in name}
    assert {dim for dim, on in wanted.items() if on} == {dim for dim in wanted if sizes.get(dim, 1) > 1}
    if sizes:
        assert math.prod(sizes.values()) == config.num_processes
    assert config.use_cpu == (name == "cpu")


def test_slurm_launcher_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(CONFIGS / "launch.slurm")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(["bash", str(CONFIGS / "launch.slurm")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: sbatch" in result.stderr


@pytest.mark.parametrize("gpus_per_node", [4, 8])
def test_slurm_launcher_checks_the_mesh_against_the_allocation(gpus_per_node):
    """multi_node_hsdp_tp.yaml lays out 2 x 4 x 2 = 16 processes: 2 nodes of 4 GPUs stop before srun."""
    args = ["scripts/pretrain.py", "recipes/tiny/pretrain.yaml", "accelerate_configs/multi_node_hsdp_tp.yaml"]
    env = {**os.environ, "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": str(gpus_per_node)}
    env.pop("SLURM_JOB_NODELIST", None)  # past the check, the script needs Slurm's node list: stops there
    result = subprocess.run(
        ["bash", str(CONFIGS / "launch.slurm"), *args],
        cwd=CONFIGS.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    mismatch = "lays out 16 processes (2x4x2) but the allocation has 8 GPUs"
    assert (mismatch in result.stderr) == (gpus_per_node == 4), result.stderr
    assert ("SLURM_JOB_NODELIST" in result.stderr) == (gpus_per_node == 8), result.stderr


def test_context_parallel_on_cpu_stops_before_any_weights_load(monkeypatch, tmp_path):
    """torch 2.13's ring attention has no CPU kernel rule: the run says so before loading the model."""
    from trellis.train.distributed import DistributedSetupError
    from trellis.train.parallelism import training_layout
    from trellis.train.pretraining import PretrainConfig

    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    args = PretrainConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(DistributedSetupError, match="context parallelism .*cp_size: 2.* needs GPUs"):
        training_layout(args)
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "1")
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    assert training_layout(args).tp_size == 2 and args.parallelism_config.tp_size == 2
