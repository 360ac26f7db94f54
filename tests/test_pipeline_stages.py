"""The stage registry end to end: every alignment kind (GRPO, RLOO, KTO, ORPO) runs as a pipeline stage,
launched from the registry's script (kto and orpo run dpo.py, rloo grpo.py), and the report shows the
held-out metric each one targets."""

from __future__ import annotations

import re

from conftest import write_recipe

from trellis.pipeline.runner import run_pipeline
from trellis.pipeline.spec import load_pipeline
from trellis.stages import STAGES, stage_flag

ALIGNMENT = """
name: align
output_dir: out/align
env: {HF_HUB_OFFLINE: "1", HF_DATASETS_OFFLINE: "1", TOKENIZERS_PARALLELISM: "false"}
stages:
  - name: grpo
    recipe: recipes/tiny/grpo.yaml
    overrides: {model_name_or_path: SFT, reward_model_path: REWARD, output_dir: out/align/grpo, max_steps: 2, save_steps: 2, logging_steps: 1}
  - name: rloo
    recipe: recipes/tiny/rloo.yaml
    overrides: {model_name_or_path: SFT, reward_model_path: REWARD, output_dir: out/align/rloo, max_steps: 2, save_steps: 2, logging_steps: 1}
  - name: kto_short
    stage: kto
    recipe: recipes/tiny/kto.yaml
    overrides: {model_name_or_path: SFT, output_dir: out/align/kto, max_steps: 4, eval_steps: 4, save_steps: 4}
  - name: orpo
    recipe: recipes/tiny/orpo.yaml
    overrides: {model_name_or_path: SFT, output_dir: out/align/orpo, max_steps: 4, eval_steps: 4, save_steps: 4}
"""


def test_kto_and_orpo_share_dpos_script_and_rloo_grpos():
    assert STAGES["kto"].script == STAGES["orpo"].script == "dpo.py"
    assert STAGES["rloo"].script == "grpo.py"
    assert stage_flag("kto") == ["--stage", "kto"] and stage_flag("dpo") == []


def test_grpo_rloo_kto_and_orpo_run_as_pipeline_stages(workdir, sft_model, reward_model, monkeypatch):
    monkeypatch.chdir(workdir)
    text = ALIGNMENT.replace("SFT", str(sft_model)).replace("REWARD", str(reward_model))
    path = write_recipe(workdir / "pipelines" / "align.yaml", text)
    pipeline = load_pipeline(str(path))
    # A stage named other than its kind still runs its kind's flow: the command says which.
    assert pipeline.stage("kto_short").kind == "kto"

    state = run_pipeline(str(path))

    assert state["status"] == "complete"
    commands = {name: entry["command"] for name, entry in state["stages"].items()}
    assert "scripts/grpo.py" in commands["rloo"] and "--stage rloo" in commands["rloo"]
    assert "scripts/dpo.py" in commands["kto_short"] and "--stage kto" in commands["kto_short"]
    for name, entry in state["stages"].items():
        assert entry["status"] == "complete", name
    report = (workdir / "out" / "align" / "report.md").read_text()
    for name, kind in (("grpo", "grpo"), ("rloo", "rloo"), ("kto_short", "kto"), ("orpo", "orpo")):
        target = STAGES[kind].target.metric
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} | {kind} |"))
        # e.g. "| grpo | grpo | complete | ran | 12 s | mean_reward 2.1 → 2.3 improved |"
        assert re.search(rf"{re.escape(target)} \S+ → \S+ (improved|NOT improved)", row), row
