"""The pretraining stage: the tiny model must learn, EMA and averaged weights load and are evaluated,
the divergence guard stops before a bad update, and a killed run resumes onto the same curve."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import SCRIPTS, run_script, wait_for_file
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trellis.core.run_record import read_record
from trellis.train.averaging import average_checkpoints
from trellis.train.memory import estimate_training_memory
from trellis.train.pretraining import BlockCollator, DivergenceError, GuardedTrainer, PretrainConfig


def pretrain(workdir, out: Path, *overrides: str, env: dict | None = None):
    """recipes/tiny/pretrain.yaml as a user runs it (it reads outputs/tiny/data of the workdir)."""
    args = ["pretrain.py", "--config", "recipes/tiny/pretrain.yaml", "--output_dir", str(out), *overrides]
    if env:
        os.environ.update(env)
    try:
        return run_script(args, cwd=workdir)
    finally:
        for key in env or {}:
            os.environ.pop(key)


def validation_loss(model_dir: Path, data: Path, batch_size: int = 32) -> float:
    """Mean validation loss per block, computed outside the Trainer from the saved model directory."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    collate = BlockCollator(tokenizer.pad_token_id)
    rows = list(datasets.load_from_disk(str(data / "packed"))["validation"])
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            total += float(model(**batch).loss) * len(batch["input_ids"])
    return total / len(rows)


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar the run wrote to TensorBoard (output_dir/runs/...), by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({path.parent for path in run_dir.glob("runs/**/events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events)).Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: [value for _, value in sorted(points)] for tag, points in scalars.items()}


# The recipe decays the learning rate to its end, where the weights barely move and the model still
# improves: there EMA and checkpoint averaging only lag (the recipe's EMA 0.5 ends 0.0001 nats better to
# 0.0002 worse than the raw weights, by CPU). They help where the weights are noisy, so this run keeps a
# high learning rate (1e-2, constant after warmup) and averages its last, noisy steps: EMA of horizon ~20
# steps from step 200, and the checkpoints of steps 280, 290 and 300. Measured (docs/test_bounds.md): at
# 3e-3 the EMA gain was 0.013-0.039 nats and averaging steps 250-300 lagged (-0.006 nats, seed 1); at 2e-2
# training was unstable (perplexity 5-6).
NOISY_END = [
    "--max_steps",
    "300",
    "--lr_scheduler_type",
    "constant_with_warmup",
    "--lr_scheduler_kwargs",
    "{}",
]
NOISY_END += ["--learning_rate", "1e-2", "--ema_decay", "0.95"]
NOISY_END += ["--ema_start_step", "200", "--save_steps", "10"]


@pytest.mark.slow
def test_tiny_pretraining_learns_with_ema_and_averaging(
    workdir, tiny_data_output, tmp_path, seed, record_property
):
    out = tmp_path / "pretrain"
    # On CPU, accelerate drops FSDP silently; the stage must say so.
    result = pretrain(
        workdir,
        out,
        "--report_to",
        "tensorboard",
        "--seed",
        str(seed),
        *NOISY_END,
        env={"ACCELERATE_USE_FSDP": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Estimated memory per device" in log and "accelerate fell back" in log
    # Monitoring, on the console and in TensorBoard.
    for logged in (
        "'loss'",
        "'learning_rate'",
        "'grad_norm'",
        "'tokens_per_second'",
        "'num_input_tokens_seen'",
    ):
        assert logged in log, logged
    assert "'eval_loss'" in log and "'eval_perplexity'" in log  # periodic validation, in the progress log
    # After training the progress log is closed: the raw, EMA and averaged results are Trellis's own lines.
    for name in ("eval", "eval_ema", "eval_averaged"):
        assert re.search(rf"{name}\s+validation loss [0-9.]+, perplexity [0-9.]+", log), name
    scalars = tensorboard_scalars(out)
    for tag in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        assert len(scalars[f"train/{tag}"]) == 300 // 25, tag  # every logging step
    assert all(v > 0 for v in scalars["train/tokens_per_second"])
    seen = scalars["train/num_input_tokens_seen"]  # with every training and evaluation log
    assert seen == sorted(seen) and 0.95 < seen[-1] / (300 * 16 * 128) <= 1  # steps x batch x block
    record_property("train_loss_last_over_first", scalars["train/loss"][-1] / scalars["train/loss"][0])
    # BOUND pretrain-train-loss: last/first logged loss 0.246 / 0.257 / 0.311 (seeds 0-4, 1 and 2 threads).
    assert scalars["train/loss"][-1] < scalars["train/loss"][0] / 2
    assert len(scalars["eval/loss"]) >= 3 and len(scalars["eval/perplexity"]) == len(scalars["eval/loss"])
    assert scalars["eval/perplexity"][-1] == pytest.approx(math.exp(scalars["eval/loss"][-1]), rel=1e-4)
    assert {"eval/ema_loss", "eval/ema_perplexity", "eval/averaged_loss"} <= set(scalars)

    record = read_record(str(out))
    metrics = record["metrics"]
    raw = metrics["eval"]["eval_loss"]
    ema_gain, averaged_gain = (
        raw - metrics["eval_ema"]["eval_loss"],
        raw - metrics["eval_averaged"]["eval_loss"],
    )
    record_property("eval_perplexity", metrics["eval"]["eval_perplexity"])
    record_property("ema_gain_nats", ema_gain)
    record_property("averaged_gain_nats", averaged_gain)
    untrained = math.exp(metrics["initial"]["eval_loss"])
    assert untrained > 300  # about uniform over the 640-token vocabulary
    # BOUND pretrain-perplexity: 3.074 / 3.313 / 4.152 (min / median / max, seeds 0-4, 1 and 2 threads;
    # seed 2's run at the noisy end's high rate ends higher). In nats 1.12 / 1.20 / 1.42 (untrained 6.5):
    # the bound, ln 12 = 2.48, is 3.5x that spread above the worst seed.
    assert metrics["eval"]["eval_perplexity"] < 12, metrics["eval"]
    # Held-out loss of the raw weights minus that of the EMA / the averaged checkpoints, nats.
    # BOUND pretrain-ema: 0.0354 / 0.0442 / 0.0627; BOUND pretrain-averaged: 0.0312 / 0.0415 / 0.0589
    # (seeds 0-4, 1 and 2 threads). The median is 1.6x / 1.5x the spread, not 3x: the bound is the
    # property (the variant beats the raw weights), which the worst seed clears by 1.3x / 1.1x the spread.
    assert ema_gain > 0.0, metrics
    assert averaged_gain > 0.0, metrics
    assert record["memory_estimate_gib"]["total"] > 0

    # Every variant is a model directory (safetensors, no pickles) that loads and scores what the record says.
    for variant in ("", "ema", "averaged"):
        assert (out / variant / "model.safetensors").exists() and not list((out / variant).glob("*.bin"))
    for variant, name in (("", "eval"), ("ema", "eval_ema"), ("averaged", "eval_averaged")):
        loss = validation_loss(out / variant, tiny_data_output)
        assert loss == pytest.approx(metrics[name]["eval_loss"], abs=2e-3), variant


@pytest.mark.slow
def test_killed_pretraining_resumes_onto_the_same_curve(workdir, tiny_data_output, tmp_path):
    # EMA from step 10, so the resumed run must also restore the EMA state from the checkpoint.
    overrides = (
        "--max_steps 60 --save_steps 20 --eval_steps 60 --average_last_checkpoints 0 --ema_start_step 10"
    )
    overrides = overrides.split()
    killed = tmp_path / "killed"
    command = [
        sys.executable,
        str(SCRIPTS / "pretrain.py"),
        "--config",
        "recipes/tiny/pretrain.yaml",
        "--output_dir",
        str(killed),
        *overrides,
    ]
    process = subprocess.Popen(
        command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_file(killed / "checkpoint-20" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_record(str(killed))["status"] == "running"

    resumed = pretrain(workdir, killed, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = pretrain(workdir, tmp_path / "reference", *overrides)
    assert reference.returncode == 0, reference.stderr[-3000:]
    got, want = read_record(str(killed)), read_record(str(tmp_path / "reference"))
    assert got["resumed_from"] in ("checkpoint-20", "checkpoint-40")
    for name in ("eval", "eval_ema"):  # the EMA state is checkpointed too
        assert got["metrics"][name]["eval_loss"] == pytest.approx(
            want["metrics"][name]["eval_loss"], abs=1e-4
        )


def test_divergence_guard_stops_before_the_bad_update(workdir, tiny_data_output, tmp_path):
    from trellis.train.models import config_from_recipe

    tokenizer = AutoTokenizer.from_pretrained(tiny_data_output / "tokenizer")
    model = AutoModelForCausalLM.from_config(
        config_from_recipe(str(workdir / "recipes/tiny/model.json"), tokenizer)
    )
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 8th forward pass returns a NaN loss
        calls["n"] += 1
        if calls["n"] == 8:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    args = PretrainConfig(
        output_dir=str(tmp_path),
        max_steps=20,
        save_steps=5,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="steps",
    )
    trainer = GuardedTrainer(
        model=model,
        args=args,
        data_collator=BlockCollator(tokenizer.pad_token_id),
        train_dataset=datasets.load_from_disk(str(tiny_data_output / "packed"))["train"],
    )
    with pytest.raises(DivergenceError, match="loss is nan at step 8"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]
    weights = load_file(str(tmp_path / "checkpoint-5" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN update was never applied"


def test_checkpoint_averaging_is_the_weighted_mean(tmp_path):
    for step, value in ((1, 1.0), (2, 2.0), (3, 4.0)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        save_file({"w": torch.full((2, 2), value)}, str(path / "model.safetensors"))
        (path / "config.json").write_text("{}")
    paths = [str(tmp_path / f"checkpoint-{s}") for s in (1, 2, 3)]
    uniform = average_checkpoints(paths, str(tmp_path / "uniform"))
    assert torch.allclose(load_file(f"{uniform}/model.safetensors")["w"], torch.full((2, 2), 7 / 3))
    weighted = average_checkpoints(paths, str(tmp_path / "weighted"), [0.0, 1.0, 3.0])
    assert torch.allclose(load_file(f"{weighted}/model.safetensors")["w"], torch.full((2, 2), 3.5))
    assert (tmp_path / "weighted" / "config.json").exists()


def test_averaging_keeps_the_weight_names_the_model_directory_stores(tmp_path):
    # As after FSDP: the checkpoint holds a tied head under its own name too; the final model, written
    # in shards with an index, stores it once.
    checkpoint, final = tmp_path / "checkpoint-1", tmp_path / "final"
    checkpoint.mkdir(), final.mkdir()
    save_file({"embed": torch.ones(2), "head": torch.ones(2)}, str(checkpoint / "model.safetensors"))
    (final / "config.json").write_text("{}")
    (final / "model.safetensors.index.json").write_text(
        '{"weight_map": {"embed": "model-00001-of-00001.safetensors"}}'
    )
    averaged = average_checkpoints([str(checkpoint)], str(tmp_path / "averaged"), model_files_from=str(final))
    assert set(load_file(f"{averaged}/model.safetensors")) == {"embed"}


def test_memory_estimate_arithmetic():
    kw = dict(
        params=1_000_000,
        trainable=1_000_000,
        param_bytes=4,
        batch_size=2,
        seq_len=128,
        hidden_size=64,
        num_layers=2,
        vocab_size=1000,
    )
    single = estimate_training_memory(**kw)
    assert (single.weights, single.gradients, single.optimizer) == (4e6, 4e6, 8e6)
    sharded = estimate_training_memory(**kw, sharding="fsdp", world_size=4)
    assert (sharded.weights, sharded.gradients, sharded.optimizer) == (1e6, 1e6, 2e6)
    zero2 = estimate_training_memory(**kw, sharding="zero2", world_size=4)
    assert (zero2.weights, zero2.gradients, zero2.optimizer) == (4e6, 1e6, 2e6)
    checkpointed = estimate_training_memory(**kw, activation_checkpointing=True)
    assert checkpointed.activations < single.activations
    # 8 processes as dp_shard 4 x tp 2: states split 8 ways, as full FSDP over 8, but layer activations shrink.
    tp = estimate_training_memory(**kw, sharding="fsdp", world_size=8, mesh={"dp_shard": 4, "tp": 2})
    full8 = estimate_training_memory(**kw, sharding="fsdp", world_size=8)
    assert (tp.weights, tp.gradients, tp.optimizer) == (0.5e6, 0.5e6, 1e6)
    assert tp.activations < full8.activations
    # HSDP: 2 replicas of dp_shard 4 hold what FSDP over 4 holds.
    hsdp = estimate_training_memory(
        **kw, sharding="fsdp", world_size=8, mesh={"dp_replicate": 2, "dp_shard": 4}
    )
    assert (hsdp.weights, hsdp.gradients, hsdp.optimizer) == (1e6, 1e6, 2e6)
    # cp 2 over 4 processes: FSDP shards over all 4, each process holds half of each sequence's activations.
    cp = estimate_training_memory(**kw, sharding="fsdp", world_size=4, mesh={"dp_shard": 2, "cp": 2})
    assert (cp.weights, cp.activations) == (sharded.weights, sharded.activations / 2)


def test_dry_run_prices_the_accelerate_configs_parallel_layout(workdir, monkeypatch):
    from trellis.pipeline.plan import memory_estimate
    from trellis.pipeline.spec import load_pipeline

    monkeypatch.chdir(workdir)
    pipeline = load_pipeline("recipes/tiny/pipeline.yaml")
    stage = pipeline.stage("pretrain")
    estimates = {}
    for config in ("fsdp", "fsdp_tp", "fsdp_cp"):
        stage.accelerate_config = f"accelerate_configs/{config}.yaml"
        text = memory_estimate(stage, pipeline)
        estimates[config] = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()[2:]}
        estimates[config]["summary"] = text.splitlines()[0]
    assert "fsdp sharding over 8 process(es) (dp_shard 4 x tp 2)" in estimates["fsdp_tp"]["summary"]
    assert "(dp_shard 4 x cp 2)" in estimates["fsdp_cp"]["summary"]
    assert estimates["fsdp_tp"]["weights"] == estimates["fsdp"]["weights"]  # split 8 ways either way
    assert estimates["fsdp_tp"]["activations"] < estimates["fsdp"]["activations"]
    assert estimates["fsdp_cp"]["activations"] < estimates["fsdp"]["activations"]


def test_block_collator_masks_only_the_trailing_padding():
    batch = BlockCollator(pad_token_id=0)([{"input_ids": [5, 0, 6, 0, 0]}, {"input_ids": [1, 2, 3, 4, 5]}])
    assert batch["labels"].tolist() == [[5, 0, 6, -100, -100], [1, 2, 3, 4, 5]]
    assert batch["input_ids"].tolist() == [[5, 0, 6, 0, 0], [1, 2, 3, 4, 5]]
