"""`trellis_run.json`: what a stage ran with and what it produced.

Written to the stage's output_dir when the stage starts (status "running"), and rewritten when it
ends: "complete" only after the final model is fully saved, "failed" (with the error) otherwise.
So a directory whose record does not say "complete" is never mistaken for a finished model. Secrets
(Hub tokens) are never written.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from trellis.core import threads

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


# CPU features that decide which kernels torch runs, and so the last digits of every number.
CPU_FLAG_PREFIXES = ("avx2", "avx512", "amx", "avx_vnni")


def _cpu() -> tuple[str, list[str]]:
    """The CPU model and its flags that matter, from the first processor in /proc/cpuinfo (Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break  # the first processor is enough: the others are the same model
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    return model, sorted(flag for flag in flags if flag.startswith(CPU_FLAG_PREFIXES))


def _gpus() -> list[str]:
    """GPU names: from the NVIDIA driver's /proc files, else from torch when it has already started CUDA
    (never started here: that would claim memory on device 0 in every process)."""
    names = []
    for path in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        with open(path) as information:
            names += [line.split(":", 1)[1].strip() for line in information if line.startswith("Model:")]
    torch = sys.modules.get("torch")
    if not names and torch is not None and torch.cuda.is_initialized():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return names


def machine_info() -> dict[str, Any]:
    """The machine that produced a result: CPU model and flags, cores, GPUs, torch's threads and kernels.

    Cheap (reads /proc; imports nothing): torch's settings are recorded only if the process imported it."""
    model, flags = _cpu()
    info: dict[str, Any] = {
        "cpu": model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "usable_cores": len(threads.usable_cores()),
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # e.g. AVX512
    return info


def machine_summary(machine: dict, packages: dict | None = None) -> str:
    """One line naming the machine, e.g. 'AMD EPYC (avx2, avx512f, ...), 2 cores (2 usable), no GPU; torch
    2.13.0 on 2 threads (AVX512 kernels)'."""
    flags = f" ({_flag_groups(machine['cpu_flags'])})" if machine.get("cpu_flags") else ""
    cores = f"{machine.get('cores')} cores"
    if machine.get("usable_cores") not in (None, machine.get("cores")):
        cores += f" ({machine['usable_cores']} usable)"
    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
    text = f"{machine.get('cpu')}{flags}, {cores}, {gpus}"
    versions = {
        name: version for name, version in (packages or {}).items() if version and name in _SHOWN_PACKAGES
    }
    torch = [f"torch {versions.pop('torch')}"] if "torch" in versions else []
    if "torch_threads" in machine:
        count = machine["torch_threads"]
        threads = f"{count} thread{'s' * (count != 1)} ({machine.get('torch_cpu_capability')} kernels)"
        torch = [f"{torch[0]} on {threads}" if torch else f"torch on {threads}"]
    return "; ".join([text, *torch, *(f"{name} {version}" for name, version in versions.items())])


def _flag_groups(flags: list[str]) -> str:
    """'avx2, avx512 (bf16 bw f vl), amx (bf16 tile)' from the flags' names."""
    groups: dict[str, list[str]] = {}
    for flag in flags:
        family = next((prefix for prefix in ("avx512", "amx") if flag.startswith(prefix)), flag)
        groups.setdefault(family, []).append(flag[len(family) :].lstrip("_"))
    return ", ".join(
        family if parts == [""] else f"{family} ({' '.join(sorted(parts))})"
        for family, parts in groups.items()
    )


_SHOWN_PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft")


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
            "machine": machine_info(),
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
            machine=machine_info(),  # again: torch (its threads) may have been imported since the start
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
