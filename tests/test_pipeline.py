"""One-file pipelines: validation before any stage runs, resume after a kill, invalidation of what changed and
what follows it, the report, and publishing (the Hub is the one thing replaced, by a recorder of the calls)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, RecordingHub, write_recipe
from record_opens import run_recording_opens

from trellis.core.hub import files_to_upload
from trellis.core.run_record import read_record
from trellis.pipeline.runner import PIPELINE_RUN, run_pipeline
from trellis.pipeline.spec import PipelineError, load_pipeline

SECRET = "hf_" + "Zq7" * 12  # shaped like a Hub token: must never reach a file or a log

SHORT = """
name: short
output_dir: out/short
env: {HF_HUB_OFFLINE: "1", HF_DATASETS_OFFLINE: "1", TOKENIZERS_PARALLELISM: "false"}
stages:
  - name: data
    recipe: recipes/tiny/data.yaml
    overrides: {output_dir: out/short/data}
  - name: pretrain
    recipe: recipes/tiny/pretrain.yaml
    overrides:
      dataset_path: ${stages.data.output_dir}
      output_dir: out/short/pretrain
      max_steps: 30
      save_steps: 10
      eval_steps: 30
      logging_steps: 5
      ema_decay: null
      average_last_checkpoints: 0
  - name: eval
    recipe: recipes/tiny/eval.yaml
    overrides:
      output_dir: out/short/eval
      checkpoints:
        - {name: base, model_config: recipes/tiny/model.json, tokenizer_name_or_path: "${stages.data.output_dir}/tokenizer"}
        - {name: pretrain, path: "${stages.pretrain.output_dir}"}
      candidate: null                        # eval.yaml names one; here it is picked:
      select_from: [base, pretrain]          # the lower perplexity (its direction)
      select_by: tiny_corpus.perplexity
      tasks: []
      perplexity: [{label: tiny_corpus, path: data/tiny/corpus/validation.jsonl, max_length: 128, stride: 64, limit: LIMIT}]
      gates: []
  - name: publish
    stage: publish
    eval: ${stages.eval.output_dir}           # no model: the evaluation's candidate
    repo_id: someone/tiny-short
    private: false
    revision: experiment
    commit_message: Short tiny run
    dry_run: DRY
"""


def short_pipeline(workdir: Path, name: str = "short.yaml", limit: int = 20, dry: bool = True) -> Path:
    text = SHORT.replace("LIMIT", str(limit)).replace("DRY", str(dry).lower())
    return write_recipe(workdir / "pipelines" / name, text)


def trellis_run(workdir: Path, pipeline: Path, log: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_TOKEN": SECRET}
    command = [sys.executable, "-m", "trellis.cli", "run", str(pipeline)]
    with open(log, "ab") as sink:
        return subprocess.Popen(command, cwd=workdir, stdout=sink, stderr=subprocess.STDOUT, env=env, **popen)


def stage_entries(workdir: Path) -> dict:
    return json.loads((workdir / "out" / "short" / PIPELINE_RUN).read_text())["stages"]


def last_actions(workdir: Path) -> dict[str, str]:
    return {name: entry["last_action"] for name, entry in stage_entries(workdir).items()}


# --- validation ------------------------------------------------------------------------------------------


def _fails(workdir: Path, monkeypatch, text: str, *expected: str) -> str:
    monkeypatch.chdir(workdir)
    path = write_recipe(workdir / "pipelines" / "bad.yaml", text)
    with pytest.raises(PipelineError) as failure:
        load_pipeline(str(path))
    message = str(failure.value)
    for part in expected:
        assert part in message, message
    assert not (workdir / "out" / "bad").exists()
    return message


BAD = """
output_dir: out/bad
stages:
  - name: data
    recipe: recipes/tiny/data.yaml
    overrides: {output_dir: out/bad/data}
  - name: pretrain
    STAGE
    recipe: recipes/tiny/pretrain.yaml
    overrides:
      output_dir: out/bad/pretrain
      dataset_path: REFERENCE
"""


def test_unknown_stage_fails_naming_the_place(workdir, monkeypatch):
    text = BAD.replace("STAGE", "stage: pretrian").replace("REFERENCE", "${stages.data.output_dir}")
    _fails(
        workdir,
        monkeypatch,
        text,
        "bad.yaml",
        "line 8",
        "stages[1] (pretrain).stage",
        "did you mean 'pretrain'",
    )


def test_dangling_reference_fails_naming_the_place(workdir, monkeypatch):
    text = BAD.replace("STAGE", "").replace("REFERENCE", "${stages.dta.output_dir}")
    _fails(
        workdir, monkeypatch, text, "bad.yaml", "stages[1] (pretrain).overrides.dataset_path", "'dta'", "data"
    )
    # A reference to a later stage is refused too: stages run in order.
    text = BAD.replace("STAGE", "").replace("REFERENCE", "${stages.pretrain.output_dir}")
    _fails(workdir, monkeypatch, text, "no earlier stage named 'pretrain'")


def test_bad_recipe_key_fails_naming_the_place(workdir, monkeypatch):
    # In the pipeline's overrides: the pipeline file, the line and the closest key.
    text = BAD.replace("STAGE", "").replace("REFERENCE", "${stages.data.output_dir}\n      learnig_rate: 0.1")
    _fails(
        workdir, monkeypatch, text, "stage 'pretrain'", "bad.yaml", "line 13", "did you mean 'learning_rate'"
    )
    # In a stage recipe file: that file and its line.
    recipe = write_recipe(workdir / "pipelines" / "typo_pretrain.yaml", "output_dir: x\nmax_stepz: 3\n")
    text = BAD.replace("STAGE", "").replace("recipes/tiny/pretrain.yaml", str(recipe))
    text = text.replace("REFERENCE", "${stages.data.output_dir}")
    _fails(workdir, monkeypatch, text, "typo_pretrain.yaml", "line 2: max_stepz", "did you mean 'max_steps'")


def test_run_command_stops_before_any_stage_opens_its_data(workdir, tmp_path):
    bad = write_recipe(
        workdir / "pipelines" / "dangling.yaml",
        BAD.replace("STAGE", "").replace("REFERENCE", "${stages.pretrain.output_dir}"),
    )
    result, opened = run_recording_opens(["-m", "trellis.cli", "run", str(bad)], workdir, tmp_path / "opened")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "dangling.yaml" in result.stderr and "stages[1] (pretrain)" in result.stderr
    assert str(workdir / "recipes" / "tiny" / "data.yaml") in opened  # the stage recipes were read ...
    assert not [path for path in opened if path.startswith(str(workdir / "data"))]  # ... not the corpus
    assert not (workdir / "out" / "bad").exists()


# --- running, resuming, invalidating ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(workdir) -> Path:
    """The short pipeline killed (whole process group) during pretraining, then run again to the end."""
    pipeline = short_pipeline(workdir)
    log = workdir / "out" / "short_console.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    process = trellis_run(workdir, pipeline, log, start_new_session=True)
    checkpoint = workdir / "out" / "short" / "pretrain" / "checkpoint-10" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stages = stage_entries(workdir)
    assert stages["data"]["status"] == "complete" and stages["pretrain"]["status"] == "running"
    assert "eval" not in stages

    rerun = trellis_run(workdir, pipeline, log)
    assert rerun.wait(timeout=600) == 0, log.read_text()[-3000:]
    return pipeline


def test_interrupted_pipeline_resumes_without_redoing_finished_stages(workdir, short_run):
    stages = stage_entries(workdir)
    assert last_actions(workdir) == {
        "data": "skipped",
        "pretrain": "resumed",
        "eval": "ran",
        "publish": "ran",
    }
    pretrain = read_record(str(workdir / "out" / "short" / "pretrain"))
    assert pretrain["status"] == "complete" and pretrain["resumed_from"].startswith("checkpoint-")
    assert pretrain["metrics"]["eval"]["eval_loss"] < pretrain["metrics"]["initial"]["eval_loss"]
    state = json.loads((workdir / "out" / "short" / PIPELINE_RUN).read_text())
    assert state["status"] == "complete" and state["packages"]["torch"]
    assert state["git"] is None or len(state["git"]["commit"]) == 40  # None outside a git checkout
    for name in ("data", "pretrain", "eval"):
        entry = stages[name]
        assert entry["config_hash"] and entry["record_hash"] and entry["duration_s"] > 0
        assert Path(workdir / entry["log"]).exists() and entry["command"].startswith(
            ("python", "accelerate launch")
        )
    assert set(stages["eval"]["inputs"]) >= {"data", "pretrain"}
    assert stages["pretrain"]["inputs"]["data"] == stages["data"]["record_hash"]


def test_changed_stage_reruns_with_those_after_it_only(workdir, short_run, capsys, monkeypatch):
    before = {n: read_record(str(workdir / "out" / "short" / n))["started_at"] for n in ("data", "pretrain")}
    changed = short_pipeline(workdir, limit=10)  # the eval stage's recipe changes
    changed_text = changed.read_text()
    log = workdir / "out" / "short_console.log"
    assert trellis_run(workdir, changed, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    assert last_actions(workdir) == {
        "data": "skipped",
        "pretrain": "skipped",
        "eval": "ran",
        "publish": "ran",
    }
    for name, started in before.items():
        assert read_record(str(workdir / "out" / "short" / name))["started_at"] == started
    # A change at the start invalidates everything after it (the dry run says what would run).
    monkeypatch.chdir(workdir)
    upstream = write_recipe(
        workdir / "pipelines" / "short.yaml",
        changed.read_text().replace(
            "overrides: {output_dir: out/short/data}", "overrides: {output_dir: out/short/data, seed: 1}"
        ),
    )
    capsys.readouterr()
    run_pipeline(str(upstream), dry_run=True)
    plan = capsys.readouterr().out
    for line in ("[1] data (data): runs", "[2] pretrain (pretrain): runs", "[3] eval (eval): runs"):
        assert line in plan, plan
    assert "Estimated memory per device" in plan and "accelerate launch --config_file" in plan
    write_recipe(workdir / "pipelines" / "short.yaml", changed_text)
    capsys.readouterr()
    run_pipeline(str(changed), dry_run=True)
    assert "[2] pretrain (pretrain): up to date: skipped" in capsys.readouterr().out


def test_report_shows_each_stage_and_rebuilds(workdir, short_run, monkeypatch):
    from trellis.cli import main

    monkeypatch.chdir(workdir)
    out = workdir / "out" / "short"
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    for heading in ("## data (data)", "## pretrain (pretrain)", "## eval (eval)", "## publish (publish)"):
        assert heading in report
    assert "eval_loss" in report and "improved" in report and "NOT improved" not in report
    assert (out / "report_plots" / "pretrain_loss.png").stat().st_size > 1000
    assert "| tiny_corpus.perplexity |" in report  # the evaluation table across checkpoints
    page = (out / "report.html").read_text()
    assert (
        "<table>" in page
        and '<img alt="pretrain training curves" src="report_plots/pretrain_loss.png">' in page
    )


# --- publishing -------------------------------------------------------------------------------------------


def test_publish_sends_model_card_with_results_and_lineage(workdir, short_run, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = workdir / "out" / "short"
    dry_plan = json.loads((out / "publish" / "publish" / "upload_plan.json").read_text())
    hub = RecordingHub()
    run_pipeline(
        str(short_pipeline(workdir, "short_publish.yaml", limit=10, dry=False)), only="publish", hub_api=hub
    )

    (_, repo, repo_options), (_, _, branch), (_, _, commit) = hub.calls
    assert repo == "someone/tiny-short" and repo_options == {
        "repo_type": "model",
        "private": False,
        "exist_ok": True,
    }
    assert branch["branch"] == "experiment"
    assert commit["revision"] == "experiment" and commit["commit_message"] == "Short tiny run"
    model = out / "pretrain"
    uploaded = sorted(commit["files"])
    assert uploaded == dry_plan["files"] == sorted([*files_to_upload(str(model)), "README.md"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "trellis_run.json"} <= set(uploaded)
    assert not any(f.startswith("checkpoint-") or f.endswith((".bin", ".pt")) for f in uploaded)

    card = commit["files"].pop("README.md").decode()
    results = json.loads((out / "eval" / "results.json").read_text())
    perplexity = results["metrics"]["tiny_corpus.perplexity"]["pretrain"]
    selection = read_record(str(out / "eval"))["selection"]
    assert selection["chosen"] == results["candidate"] == "pretrain"
    assert selection["values"]["base"] > 10 * selection["values"]["pretrain"] == 10 * perplexity
    stages = stage_entries(workdir)
    for expected in (
        "model-index",
        f"value: {round(perplexity, 6)}",
        "This model is column `pretrain`",
        "trained from scratch (model config `recipes/tiny/model.json`)",
        "`data/tiny/corpus/train.jsonl` (data)",
        "## Lineage",
        f"`{stages['data']['config_hash']}`",
        f"`{stages['pretrain']['record_hash']}`",
        "`recipes/tiny/pretrain.yaml`",
        "max_steps: 30",
    ):
        assert expected in card, expected
    assert card == (out / "publish" / "publish" / "README.md").read_text()

    # The token was in the environment of every run above; nothing the runs wrote holds it.
    leaked = [p for p in (workdir / "out").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in card


def test_tiny_pipeline_is_valid(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    pipeline = load_pipeline(str(REPO / "recipes" / "tiny" / "pipeline.yaml"))
    assert pipeline.names == [
        *("data", "pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo", "kto", "orpo"),
        *("eval", "quantize", "export", "serve", "publish"),
    ]
    sft = pipeline.stage("sft").resolved
    assert sft["model_name_or_path"] == "outputs/tiny/pretrain" and sft["model_config"] is None
    assert pipeline.stage("ppo").depends_on == ["sft", "reward"]
    assert pipeline.stage("publish").publish["dry_run"] is True  # no network by default


def test_tiny_reasoning_pipeline_is_valid(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    pipeline = load_pipeline(str(REPO / "recipes" / "tiny" / "pipeline_reasoning.yaml"))
    assert pipeline.names == ["teacher", "generate_rationales", "distill_cot", "distill_answers", "eval"]
    assert pipeline.stage("distill_answers").depends_on == ["generate_rationales"]
    assert pipeline.stage("eval").depends_on == ["teacher", "distill_cot", "distill_answers"]


def test_tiny_compression_pipeline_is_valid(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    pipeline = load_pipeline(str(REPO / "recipes" / "tiny" / "pipeline_compression.yaml"))
    assert pipeline.stage("distill").depends_on == ["sft", "distill_text"]
    assert pipeline.stage("quantize").depends_on == ["sft", "prune", "distill"]
    assert pipeline.stage("train_pretrained").depends_on == ["prune_pretrained"]


def test_report_of_an_evaluation_only_pipeline_copies_its_plots(tmp_path):
    from trellis.evaluate.comparison import RESULTS_JSON, comparison, plot_file_name
    from trellis.pipeline.report import PLOTS, build_report

    evaluation = tmp_path / "eval"
    (evaluation / "plots").mkdir(parents=True)
    scores = {"base": {"metrics": {"qa.acc": 0.5}}, "tuned": {"metrics": {"qa.acc": 0.7}}}
    result = comparison(scores, "base", "tuned")
    (evaluation / RESULTS_JSON).write_text(json.dumps(result))
    (evaluation / "plots" / plot_file_name("qa.acc")).write_bytes(b"png")
    stages = {"eval": {"output_dir": str(evaluation), "stage": "eval", "status": "complete"}}
    (tmp_path / PIPELINE_RUN).write_text(json.dumps({"name": "evals", "stages": stages}))

    report, _ = build_report(str(tmp_path))  # no training stage drew a curve before the evaluation's plots
    assert f"]({PLOTS}/eval_{plot_file_name('qa.acc')})" in report
    assert (tmp_path / PLOTS / f"eval_{plot_file_name('qa.acc')}").read_bytes() == b"png"


def test_report_lists_the_records_a_stage_dropped(tmp_path):
    from trellis.pipeline.report import build_report

    out = tmp_path / "sft"
    dropped = {"empty_turn": {"count": 3, "file": "chats.jsonl", "line": 7}}
    bad_records = {
        "sources": [{"split": "train", "source": "chats.jsonl", "read": 200, "kept": 197, "dropped": dropped}]
    }
    out.mkdir()
    (out / "trellis_run.json").write_text(
        json.dumps({"stage": "sft", "status": "complete", "bad_records": bad_records})
    )
    stages = {"sft": {"output_dir": str(out), "stage": "sft", "status": "complete"}}
    (tmp_path / PIPELINE_RUN).write_text(json.dumps({"name": "one", "stages": stages}))

    report, _ = build_report(str(tmp_path))
    assert "| `chats.jsonl` (train) | empty_turn | 3 | 200 |" in report
