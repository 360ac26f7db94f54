"""`trellis_run.json`: what a stage ran with and what it produced.

Written to the stage's output_dir when the stage starts (status "running"), and rewritten when it
ends: "complete" only after the final model is fully saved, "failed" (with the error) otherwise.
So a directory whose record does not say "complete" is never mistaken for a finished model. Secrets
(Hub tokens) are never written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_NAME = "trellis_run.json"
PACKAGES = (
    "trellis",
    "torch",
    "transformers",
    "datasets",
    "trl",
    "peft",
    "accelerate",
    "bitsandbytes",
    "tokenizers",
    "huggingface-hub",
    "lm-eval",
    "gptqmodel",
    "optimum",
    "torchao",
)
SECRET_KEYS = {"hub_token", "push_to_hub_token", "token", "hf_token", "wandb_api_key"}
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """Drop secrets from a JSON-like value: secret keys, and anything shaped like a Hub token."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in SECRET_KEYS and v else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _TOKEN_PATTERN.sub(REDACTED, value)
    return value


def redact_argv(argv: list[str]) -> list[str]:
    redacted, hide_next = [], False
    for arg in argv:
        flag = arg.lstrip("-").split("=")[0]
        if hide_next:
            redacted.append(REDACTED)
            hide_next = False
        elif arg.startswith("--") and flag in SECRET_KEYS:
            hide_next = "=" not in arg
            redacted.append(arg if hide_next else f"--{flag}={REDACTED}")
        else:
            redacted.append(redact(arg))
    return redacted


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict[str, Any] | None:
    """The commit of the Trellis checkout that ran, and whether it had local changes."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def config_dict(obj: Any) -> dict:
    """A dataclass (or TrainingArguments) as plain JSON-able values."""
    values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    return json.loads(json.dumps(values, default=str))


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_by_step(output_dir: str) -> list[str]:
    """The fully written checkpoint-N directories in output_dir, oldest first.

    The Trainer writes trainer_state.json last, so a checkpoint without it was cut off mid-save
    (e.g. the process was killed) and is skipped.
    """
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            steps.append(int(match.group(1)))
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in sorted(steps)]


def read_record(output_dir: str) -> dict | None:
    path = Path(output_dir) / RECORD_NAME
    return json.loads(path.read_text()) if path.exists() else None


class RunRecord:
    """The run record of one stage; use as a context manager so failures are recorded too."""

    def __init__(self, stage: str, output_dir: str, configs: dict[str, Any], is_main_process: bool = True):
        self.path = Path(output_dir) / RECORD_NAME
        self.is_main_process = is_main_process
        previous = read_record(output_dir) or {}
        self._start = time.monotonic()
        self.data: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished_at": None,
            "command": redact_argv(sys.argv),
            "config": redact({name: config_dict(obj) for name, obj in configs.items()}),
            "packages": package_versions(),
            "git": git_commit(),
            "inputs": {},
            # A resumed run keeps what the interrupted one measured before training.
            "metrics": {"initial": previous.get("metrics", {}).get("initial", {})},
        }
        self.save()

    @property
    def initial_metrics(self) -> dict:
        return self.data["metrics"]["initial"]

    def set_input(self, name: str, value: Any) -> None:
        self.data["inputs"][name] = redact(value)

    def set_metrics(self, name: str, metrics: dict[str, float]) -> None:
        self.data["metrics"][name] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.save()

    def save(self) -> None:
        if not self.is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)  # atomic: a reader never sees half a record

    def _finish(self, status: str, **extra: Any) -> None:
        self.data.update(
            status=status,
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            duration_s=round(time.monotonic() - self._start, 1),
            **extra,
        )
        self.save()

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self._finish(self.data.pop("status_on_success", "complete"))
        else:
            self._finish("failed", error=redact(f"{exc_type.__name__}: {exc}"))
