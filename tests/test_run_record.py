"""trellis_run.json: written at start, marked complete only at the end, and free of secrets."""

from __future__ import annotations

import json

import pytest
from transformers import TrainingArguments

from trellis.core.run_record import RunRecord, read_record, redact_argv
from trellis.data.arguments import ScriptArguments

TOKEN = "hf_" + "x" * 34


def test_record_lifecycle_and_no_token_anywhere(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["scripts/sft.py", "--config", "r.yaml", "--hub_token", TOKEN])
    training = TrainingArguments(output_dir=str(tmp_path), hub_token=TOKEN, use_cpu=True, report_to="none")
    script = ScriptArguments(datasets=[{"path": f"https://user:{TOKEN}@example.com/data.jsonl"}])
    with RunRecord("sft", str(tmp_path), {"script": script, "training": training}) as record:
        assert read_record(str(tmp_path))["status"] == "running"
        record.set_metrics("eval", {"eval_loss": 1.5, "note": "not a number"})
    data = read_record(str(tmp_path))
    assert data["status"] == "complete" and data["metrics"]["eval"] == {"eval_loss": 1.5}
    assert data["config"]["training"]["output_dir"] == str(tmp_path)
    assert data["packages"]["transformers"] and data["finished_at"]
    assert TOKEN not in (tmp_path / "trellis_run.json").read_text()


def test_failure_is_recorded(tmp_path):
    with pytest.raises(RuntimeError), RunRecord("sft", str(tmp_path), {}):
        raise RuntimeError(f"upload failed for {TOKEN}")
    data = json.loads((tmp_path / "trellis_run.json").read_text())
    assert data["status"] == "failed" and data["error"].startswith("RuntimeError: upload failed")
    assert TOKEN not in data["error"]


def test_rerun_keeps_the_initial_metrics(tmp_path):
    with RunRecord("sft", str(tmp_path), {}) as first:
        first.set_metrics("initial", {"eval_loss": 6.3})
    assert RunRecord("sft", str(tmp_path), {}).initial_metrics == {"eval_loss": 6.3}


def test_argv_redaction():
    assert redact_argv(["--hub_token", TOKEN, f"--token={TOKEN}", "--lr", "1"]) == [
        "--hub_token",
        "<redacted>",
        "--token=<redacted>",
        "--lr",
        "1",
    ]
