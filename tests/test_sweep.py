"""Seed sweeps (`trellis run PIPELINE --seeds`) run for real on a short pipeline, and the machine named in
every run record and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe

from trellis.core.run_record import RECORD_NAME, machine_info, read_record
from trellis.pipeline.runner import PIPELINE_RUN
from trellis.pipeline.seed_table import effect_to_spread
from trellis.pipeline.sweep import parse_seeds

SWEPT = """
name: swept
output_dir: out/swept
env: {HF_HUB_OFFLINE: "1", HF_DATASETS_OFFLINE: "1", TOKENIZERS_PARALLELISM: "false", OMP_NUM_THREADS: "1"}
stages:
  - name: data
    recipe: recipes/tiny/data.yaml
    overrides: {output_dir: out/swept/data}
  - name: pretrain
    recipe: recipes/tiny/pretrain.yaml
    overrides:
      dataset_path: ${stages.data.output_dir}
      output_dir: out/swept/pretrain
      max_steps: 10
      save_steps: 10
      eval_steps: 10
      logging_steps: 5
      ema_decay: null
      average_last_checkpoints: 0
  - name: eval
    recipe: recipes/tiny/eval.yaml
    overrides:
      output_dir: out/swept/eval
      checkpoints:
        - {name: base, model_config: recipes/tiny/model.json, tokenizer_name_or_path: "${stages.data.output_dir}/tokenizer"}
        - {name: pretrain, path: "${stages.pretrain.output_dir}"}
      candidate: pretrain
      tasks: []
      perplexity: [{label: tiny_corpus, path: data/tiny/corpus/validation.jsonl, max_length: 128, stride: 64, limit: 10}]
      gates: []
"""
SEEDS = (0, 1)
STAGES = ("data", "pretrain", "eval")


def test_seeds_are_ranges_or_lists():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,5") == [0, 2, 5]
    assert parse_seeds("0-2, 7") == [0, 1, 2, 7]
    for bad, message in (
        ("3-1", "runs backwards"),
        ("0,x", "not a seed"),
        ("0-2,1", "twice"),
        ("", "not a seed"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)


def test_effect_to_spread_is_the_median_change_over_its_range_between_seeds():
    assert effect_to_spread({"0": 0.44, "1": 0.49, "2": 0.52}) == "6.1x"  # 0.49 / 0.08
    assert effect_to_spread({"0": -0.2, "1": 0.1, "2": 0.3}) == "0.2x"  # a change inside the noise
    assert effect_to_spread({"0": -1.0, "1": -0.9}) == "-9.5x"  # the sign of the median
    assert effect_to_spread({"0": 0.5, "1": 0.5}) == "inf" and effect_to_spread({"0": -1, "1": -1}) == "-inf"
    assert effect_to_spread({"0": 0, "1": 0}) == "0"
    assert effect_to_spread({"3": 0.5}) == "-"  # one seed: no spread to compare with


def test_machine_names_the_cpu_as_proc_cpuinfo_does():
    info = machine_info()
    cpuinfo = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []
    )
    for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile"):
        assert (flag in info["cpu_flags"]) == (flag in flags)
    assert info["cpu"] and info["cores"] == os.cpu_count() and isinstance(info["gpus"], list)


def trellis(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trellis.cli", *args], cwd=workdir, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def sweep(workdir) -> Path:
    """The short pipeline swept over seeds 0 and 1; the pipeline's output_dir."""
    pipeline = write_recipe(workdir / "pipelines" / "swept.yaml", SWEPT)
    result = trellis(workdir, "run", str(pipeline), "--seeds", ",".join(map(str, SEEDS)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "out" / "swept"


@pytest.mark.slow
def test_each_seed_runs_into_its_own_directories_with_its_seed(sweep):
    losses = {}
    for seed in SEEDS:
        root = sweep / "seeds" / f"seed-{seed}"
        state = json.loads((root / PIPELINE_RUN).read_text())
        assert state["status"] == "complete" and list(state["stages"]) == list(STAGES)
        for name in STAGES:
            assert state["stages"][name]["output_dir"] == str(Path("out/swept/seeds") / f"seed-{seed}" / name)
            assert (root / name / RECORD_NAME).exists()
            resolved = yaml.safe_load((root / "recipes" / f"{name}.yaml").read_text())
            assert resolved["seed"] == seed  # every stage takes a seed (eval's draws the base model)
        pretrain = read_record(str(root / "pretrain"))
        assert pretrain["config"]["training"]["seed"] == seed
        losses[seed] = pretrain["metrics"]["eval"]["eval_loss"]
    assert not (sweep / "pretrain").exists()  # nothing written where the unswept run would be
    assert losses[0] != losses[1]  # different seeds, different models


@pytest.mark.slow
def test_sweep_table_holds_each_seeds_recorded_metrics(sweep):
    table = json.loads((sweep / "seeds" / "sweep.json").read_text())
    assert table["seeds"] == list(SEEDS)
    records = {
        seed: {n: read_record(str(sweep / "seeds" / f"seed-{seed}" / n)) for n in STAGES} for seed in SEEDS
    }
    [target] = table["targets"]  # data and eval have no target metric
    assert (target["stage"], target["metric"]) == ("pretrain", "eval_loss")
    for seed in SEEDS:
        metrics = records[seed]["pretrain"]["metrics"]
        assert target["before"][str(seed)] == metrics["initial"]["eval_loss"]
        assert target["after"][str(seed)] == metrics["eval"]["eval_loss"]
    after = sorted(target["after"].values())
    assert target["summary"]["after"] == {"median": sum(after) / 2, "min": after[0], "max": after[1], "n": 2}
    evaluation = {(row["checkpoint"], row["metric"]): row for row in table["evaluation"]}
    assert ("pretrain", "tiny_corpus.perplexity") in evaluation
    for (checkpoint, metric), row in evaluation.items():
        for seed in SEEDS:
            assert row["values"][str(seed)] == records[seed]["eval"]["metrics"][checkpoint][metric]
    # The change from the baseline (the untrained model), paired seed by seed.
    change = next(row for row in table["changes"] if row["metric"] == "tiny_corpus.perplexity")
    assert change["checkpoint"] == "pretrain" and table["baselines"] == {"eval": "base"}
    for seed in SEEDS:
        values = records[seed]["eval"]["metrics"]
        assert change["values"][str(seed)] == pytest.approx(
            values["pretrain"]["tiny_corpus.perplexity"] - values["base"]["tiny_corpus.perplexity"]
        )
    text = (sweep / "seeds" / "sweep.md").read_text()
    assert "Change from `base`, paired by seed: median [min, max] (median / (max - min)):" in text
    low, high = (f"{value:.4g}" for value in after)
    assert "| pretrain | eval_loss |" in text and f"[{low}, {high}] | 2/2 seeds |" in text
    assert "| tiny_corpus.perplexity |" in text and "Machine: " in text and "on 1 thread (" in text


@pytest.mark.slow
def test_report_shows_the_sweep_and_the_machine(sweep, workdir):
    assert trellis(workdir, "report", str(sweep)).returncode == 0
    report = (sweep / "report.md").read_text()
    assert "## Seed sweep: 2 seeds (0, 1)" in report and "| pretrain | eval_loss |" in report
    seed_report = (sweep / "seeds" / "seed-0" / "report.md").read_text()
    machine = read_record(str(sweep / "seeds" / "seed-0" / "pretrain"))["machine"]
    assert machine["torch_threads"] == 1  # the pipeline's OMP_NUM_THREADS
    line = next(line for line in seed_report.splitlines() if line.startswith("Machine: "))
    assert machine["cpu"] in line and "on 1 thread (" in line and "torch 2." in line


@pytest.mark.slow
def test_sweep_rerun_skips_every_stage_of_every_seed(sweep, workdir):
    started = {
        seed: {n: read_record(str(sweep / "seeds" / f"seed-{seed}" / n))["started_at"] for n in STAGES}
        for seed in SEEDS
    }
    result = trellis(workdir, "run", "pipelines/swept.yaml", "--seeds", "0-1")
    assert result.returncode == 0, result.stderr[-3000:]
    for seed in SEEDS:
        state = json.loads((sweep / "seeds" / f"seed-{seed}" / PIPELINE_RUN).read_text())
        assert {entry["last_action"] for entry in state["stages"].values()} == {"skipped"}
        assert {
            n: read_record(str(sweep / "seeds" / f"seed-{seed}" / n))["started_at"] for n in STAGES
        } == started[seed]


def test_a_path_written_out_to_another_stages_output_is_refused_before_any_stage(workdir, monkeypatch):
    from trellis.pipeline.spec import PipelineError
    from trellis.pipeline.sweep import run_sweep

    monkeypatch.chdir(workdir)
    text = SWEPT.replace("swept", "literal").replace("${stages.data.output_dir}", "out/literal/data", 1)
    pipeline = write_recipe(workdir / "pipelines" / "literal.yaml", text)
    with pytest.raises(PipelineError) as failure:
        run_sweep(str(pipeline), [0, 1])
    message = str(failure.value)
    assert "literal.yaml: stage 'pretrain' key 'dataset_path' names 'out/literal/data'" in message
    assert "${stages.data.output_dir}" in message
    assert not (workdir / "out" / "literal").exists()
