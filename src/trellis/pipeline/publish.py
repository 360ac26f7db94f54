"""Publishing a stage's output to the Hugging Face Hub with a model card that says where it came from.

A pipeline publishes with a `publish` stage, or with `push_to_hub: {repo_id: ...}` on any stage. The
card names the base model, the training data, the exact (resolved) recipe of every stage in the
model's lineage with its config hash, run record hash and code commit, and the evaluation results
(`model-index` metadata). Only the final model's files go up: no checkpoints, no pickles. The
token comes from `HF_TOKEN` or `hf auth login` inside huggingface_hub; Trellis never reads or
writes it. `dry_run: true` writes the card and the upload plan without touching the network.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from trellis.core import hub
from trellis.core.errors import TrellisError
from trellis.core.hub import CARD, upload_model
from trellis.core.recipe import looks_like_local_path
from trellis.core.run_record import RunRecord, git_commit, read_record, redact
from trellis.core.tables import markdown_table, number
from trellis.evaluate import comparison
from trellis.evaluate.comparison import RESULTS_JSON, markdown
from trellis.pipeline.spec import PUBLISH, Pipeline, Stage, ancestry, is_within
from trellis.pipeline.verdicts import stage_metrics
from trellis.stages import STAGES

logger = logging.getLogger("trellis")
PLAN = "upload_plan.json"
# --- the model card -------------------------------------------------------------------------------------------


def producer(folder: str, pipeline: Pipeline) -> Stage | None:
    found = [s for s in pipeline.stages if s.kind != PUBLISH and is_within(folder, s.output_dir)]
    return found[-1] if found else None


def eval_results(folder: str, eval_dir: str | None, pipeline: Pipeline) -> tuple[str, dict, dict, str] | None:
    """(column, metrics of the published model, metric sources, comparison table) from an evaluation stage."""
    directories = [eval_dir] if eval_dir else [s.output_dir for s in pipeline.stages if s.kind == "eval"]
    for directory in directories:
        path = Path(directory) / RESULTS_JSON
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        recipe = next((s.resolved for s in pipeline.stages if s.output_dir == directory), {})
        columns = {
            c["name"]: c.get("path")
            for c in recipe.get("checkpoints", [])
            if isinstance(c, dict) and c.get("name")
        }
        column = next(
            (n for n, p in columns.items() if p and os.path.normpath(p) == os.path.normpath(folder)),
            result["candidate"] if eval_dir else None,
        )
        if column is None:
            continue
        metrics = {m: v[column] for m, v in result["metrics"].items() if v.get(column) is not None}
        sources = {p["label"]: p["path"] for p in recipe.get("perplexity", []) if isinstance(p, dict)}
        return column, metrics, sources, markdown(result)
    return None


def evaluation_candidate(eval_dir: str, pipeline: Pipeline) -> str:
    """The model directory an evaluation stage chose as its candidate (its `candidate`, or the best of its
    `select_from` by the gates), read from its results after it ran."""
    path = Path(eval_dir) / RESULTS_JSON
    if not path.exists():
        raise TrellisError(f"{path} does not exist: run the evaluation stage before publishing its candidate")
    candidate = json.loads(path.read_text())["candidate"]
    recipe = next((s.resolved for s in pipeline.stages if s.output_dir == eval_dir), {})
    checkpoint = next((c for c in recipe.get("checkpoints", []) if c.get("name") == candidate), {})
    if not checkpoint.get("path"):
        raise TrellisError(f"{eval_dir}: the candidate {candidate!r} is not a model directory of that stage")
    return checkpoint["path"]


def card_for(folder: str, options: dict, pipeline: Pipeline, state: dict) -> str:
    """The model card: evaluation results (model-index), base model, data, lineage and exact recipes."""
    from huggingface_hub import ModelCardData

    name = options["repo_id"].split("/")[-1]
    made_by = producer(folder, pipeline)
    lineage = ancestry(made_by, pipeline) if made_by else []
    data = ModelCardData(model_name=name, tags=["trellis"], library_name="transformers")
    evaluation = "No evaluation stage scored this model."
    if evaluated := eval_results(folder, options.get("eval"), pipeline):
        column, metrics, sources, table = evaluated
        data.eval_results = comparison.eval_results(metrics, sources)
        evaluation = (
            f"This model is column `{column}`.\n\nMeasured by the Trellis evaluation stage.\n\n{table}"
        )

    training = [s for s in lineage if STAGES[s.kind].trains]
    start = training[0].resolved if training else {}
    base = start.get("model_name_or_path")
    if base and not looks_like_local_path(base):
        data.base_model = base
    sources = [
        (source["path"], stage.name)
        for stage in lineage
        for source in (stage.resolved.get("datasets") or []) + (stage.resolved.get("eval_datasets") or [])
        if isinstance(source, dict) and source.get("path")
    ]
    data.datasets = sorted({path for path, _ in sources if not looks_like_local_path(path)}) or None
    sections = {
        "Evaluation": evaluation,
        "Base model": f"`{base}`"
        if base
        else f"trained from scratch (model config `{start.get('model_config')}`)",
        "Training data": "\n".join(f"- `{path}` ({stage})" for path, stage in sources) or "-",
        "Lineage": _lineage(lineage, pipeline, state),
        "Run it": hub.vllm_usage(options["repo_id"]),
        "Recipes": "The exact recipe of each stage (overrides and references resolved):\n\n"
        + "\n\n".join(
            f"### {s.name}\n\n```yaml\n{yaml.safe_dump(s.resolved, sort_keys=False)}```" for s in lineage
        ),
    }
    return str(hub.model_card(data, name, sections))


def _lineage(lineage: list[Stage], pipeline: Pipeline, state: dict) -> str:
    """Each stage that made the model: its recipe, config and run record hashes and held-out target."""
    commit = (state.get("git") or git_commit() or {}).get("commit", "unknown")
    rows = []
    for stage in lineage:
        entry = state.get("stages", {}).get(stage.name, {})
        _, verdict = stage_metrics(read_record(stage.output_dir) or {})
        target = (
            f"{verdict['metric']} {number(verdict['before'])} → {number(verdict['after'])}"
            if verdict
            else "-"
        )
        hashes = (f"`{entry.get(key, '-')}`" for key in ("config_hash", "record_hash"))
        rows.append([stage.name, stage.kind, f"`{stage.recipe}`", *hashes, target])
    header = ["stage", "kind", "recipe", "config hash", "run record", "held-out target"]
    return (
        f"Made by the Trellis pipeline `{pipeline.path}` at commit `{commit}`, stage by stage:\n\n"
        + markdown_table(header, rows)
    )


def publish_from_pipeline(stage: Stage, pipeline: Pipeline, state: dict, api: Any = None) -> dict:
    """Publish a pipeline stage's model (a publish stage's `model`, else its evaluation's candidate; or a stage's
    own output with push_to_hub)."""
    options = dict(stage.publish)
    folder = str(options.get("model") or evaluation_candidate(options["eval"], pipeline))
    record = read_record(folder)
    if not os.path.isdir(folder) or (record is not None and record.get("status") != "complete"):
        raise TrellisError(
            f"stage {stage.name!r}: {folder} is not a complete model directory; nothing published"
        )
    out = Path(pipeline.output_dir) / "publish" / stage.name
    card = card_for(folder, options, pipeline, state)
    arguments = dict(
        folder=folder,
        repo_id=options["repo_id"],
        card=card,
        private=bool(options.get("private", True)),
        revision=options.get("revision"),
        commit_message=options.get("commit_message"),
        dry_run=bool(options.get("dry_run", False)),
        api=api,
    )
    if stage.kind != PUBLISH:
        return _write_plan(out, card, upload_model(**arguments))
    with RunRecord(PUBLISH, str(out), {}) as run:
        run.data["config"] = {"publish": redact(options)}
        plan = _write_plan(out, card, upload_model(**arguments))
        run.set_input("model", record_of(folder))
        run.data["plan"] = plan
    return plan


def record_of(folder: str) -> dict:
    record = read_record(folder) or {}
    return {"path": folder, "stage": record.get("stage"), "finished_at": record.get("finished_at")}


def _write_plan(out: Path, card: str, plan: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD).write_text(card)
    (out / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
    return plan
