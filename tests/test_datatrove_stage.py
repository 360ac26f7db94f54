"""The data stage on datatrove: near-dup quality of its MinHash stages on the planted corpus, resuming a
killed run, the Slurm jobs it submits, and the `executor` recipe section."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SCRIPTS, run_script, write_recipe
from test_dedup import NGRAM, THRESHOLD, planted_corpus

from trellis.core.run_record import read_record
from trellis.data import datatrove_blocks, datatrove_report, datatrove_stage
from trellis.data.arguments import DataArguments
from trellis.data.dedup import jaccard
from trellis.data.packing import load_packed

# Only the MinHash steps: no cleaning change to the text, no filter, no exact dedup.
NEAR_DEDUP_ONLY = dict(
    min_chars=None,
    gopher_quality=False,
    repetition_filter=False,
    blocklist_filter=False,
    exact_dedup=False,
    redact_pii=False,
    minhash_threshold=THRESHOLD,
    minhash_ngram=NGRAM,
)


def test_near_dedup_recall_and_precision_on_planted_duplicates(tmp_path):
    texts, families = planted_corpus()
    truth = {
        pair
        for family in families
        for pair in itertools.combinations(sorted(family), 2)
        if jaccard(texts[pair[0]], texts[pair[1]], NGRAM) >= THRESHOLD
    }
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    args = DataArguments(
        output_dir=str(tmp_path / "out"),
        datasets=[{"path": str(corpus)}],
        executor={"workers": 1},
        **NEAR_DEDUP_ONLY,
    )
    work = str(tmp_path / "work")
    assert datatrove_stage.run_datatrove(args, work)

    kept = [
        r
        for name in sorted(Path(work, "final").glob("*.jsonl"))
        for r in datatrove_blocks.read_records(str(name))
    ]
    removed = datatrove_report.removed_records(work, "near_dedup")
    clusters: dict[int, list[int]] = {}
    for record in [*kept, *removed]:
        if (cluster := record["metadata"].get("minhash_cluster_id", -1)) != -1:
            clusters.setdefault(cluster, []).append(int(record["id"]))
    predicted = {pair for members in clusters.values() for pair in itertools.combinations(sorted(members), 2)}
    found = len(predicted & truth)
    recall, precision = found / len(truth), found / max(len(predicted), 1)
    print(
        f"datatrove near-dup: {len(truth)} true pairs, {len(predicted)} predicted, recall {recall}, precision {precision}"
    )
    # Measured: 1.0 / 1.0 (the previous implementation: 1.0 / 1.0). Candidates come from datatrove's
    # LSH (32 bands x 4 rows: a pair at Jaccard 0.7 is a candidate with probability 1 - 1e-6) and are
    # verified by exact Jaccard, so neither can fall by chance.
    assert recall == 1.0 and precision == 1.0
    assert len(kept) + len(removed) == len(texts) and len(removed) == len(truth)


def test_dedup_stays_aligned_when_a_task_loses_all_its_documents(tmp_path):
    """Exact and near dedup address documents by (task, index): a task left with no documents (here the
    middle file: only short ones) must not shift the next task's files onto its index."""
    texts, families = planted_corpus()
    distinct = [texts[family[0]] for family in families[:80]]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    parts = [
        distinct[:40],
        ["too short"] * 20,
        distinct[40:] + [t.upper() for t in distinct[:10]] + distinct[40:45],
    ]
    for number, part in enumerate(parts):
        (corpus / f"part{number}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    args = DataArguments(
        output_dir=str(tmp_path / "out"),
        datasets=[{"path": str(corpus / "*.jsonl")}],
        executor={"tasks": 3, "workers": 1},
        **{**NEAR_DEDUP_ONLY, "min_chars": 20, "exact_dedup": True},
    )
    work = str(tmp_path / "work")
    assert datatrove_stage.run_datatrove(args, work)
    kept = datatrove_report.kept_documents(args, work)["text"]
    assert sorted(t.lower() for t in kept) == sorted(t.lower() for t in distinct)


def _split_corpus(workdir: Path, folder: Path, parts: int) -> None:
    """The tiny corpus as `parts` files: datatrove shares input files out among tasks."""
    lines = (workdir / "data/tiny/corpus/train.jsonl").read_text().splitlines()
    folder.mkdir()
    for part in range(parts):
        (folder / f"part{part}.jsonl").write_text("\n".join(lines[part::parts]) + "\n")


def _recipe(workdir: Path, tmp_path: Path, name: str, **changes) -> Path:
    recipe = yaml.safe_load((REPO / "recipes/tiny/data.yaml").read_text())
    recipe.update(datasets=[{"path": str(tmp_path / "corpus" / "*.jsonl")}], output_dir=str(tmp_path / name))
    recipe.update(changes)
    return write_recipe(tmp_path / f"{name}.yaml", yaml.safe_dump(recipe))


@pytest.mark.slow
def test_a_killed_run_resumes_skipping_completed_tasks_and_matches_an_uninterrupted_run(workdir, tmp_path):
    _split_corpus(workdir, tmp_path / "corpus", parts=4)
    executor = {"kind": "local", "tasks": 4, "workers": 1}
    whole = _recipe(workdir, tmp_path, "whole", executor=executor)
    assert run_script(["prepare_data.py", "--config", str(whole)], cwd=workdir).returncode == 0

    killed = _recipe(workdir, tmp_path, "killed", executor=executor)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "prepare_data.py"), "--config", str(killed)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill it as soon as the first filter task is complete: three more filter tasks, five more runs, the
    # tokenizer and the packing are still ahead (seconds of work), so the kill lands mid-way.
    completions = list((tmp_path / "killed" / "datatrove").glob("*/logs/filter/completions"))
    while process.poll() is None and not (completions and list(completions[0].iterdir())):
        time.sleep(0.01)
        completions = list((tmp_path / "killed" / "datatrove").glob("*/logs/filter/completions"))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = sorted(p.name for p in completions[0].iterdir())
    assert 1 <= len(done_before) < 4 and not (tmp_path / "killed" / "packed").exists()
    stats = [completions[0].parent / "stats" / f"{rank}.json" for rank in done_before]
    written = [path.stat().st_mtime_ns for path in stats]

    rerun = run_script(["prepare_data.py", "--config", str(killed)], cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Skipping {len(done_before)} already completed tasks" in rerun.stderr
    assert [path.stat().st_mtime_ns for path in stats] == written  # those tasks did not run again
    assert read_record(str(tmp_path / "killed"))["status"] == "complete"
    (first, _), (second, _) = load_packed(str(tmp_path / "whole")), load_packed(str(tmp_path / "killed"))
    for split in ("train", "validation"):
        assert first[split]["input_ids"] == second[split]["input_ids"]
    reports = [json.loads((tmp_path / name / "data_report.json").read_text()) for name in ("whole", "killed")]
    assert [s["documents_out"] for s in reports[0]["steps"]] == [
        s["documents_out"] for s in reports[1]["steps"]
    ]
    # every run's largest task memory, recorded by the tasks themselves (a process holds > 10 MB)
    peaks = reports[0]["datatrove"]["peak_task_rss_mb"]
    assert sorted(peaks) == sorted(datatrove_report.RUNS) and min(peaks.values()) > 10, peaks


@pytest.mark.slow
def test_a_local_ray_cluster_gives_the_local_executors_output(workdir, tmp_path):
    pytest.importorskip(
        "ray", reason="ray is not installed (`pip install ray`): a large wheel, not a dependency"
    )
    _split_corpus(workdir, tmp_path / "corpus", parts=2)
    outputs = {}
    for kind in ("local", "ray"):
        recipe = _recipe(workdir, tmp_path, kind, executor={"kind": kind, "tasks": 2})
        result = run_script(["prepare_data.py", "--config", str(recipe)], cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[kind] = load_packed(str(tmp_path / kind))[0]
    for split in ("train", "validation"):
        assert outputs["local"][split]["input_ids"] == outputs["ray"][split]["input_ids"]


FAKE_SBATCH = """#!/bin/sh
# Stand-in for Slurm's sbatch: keeps the arguments and the job script, answers like sbatch.
log={log}
count=$(ls "$log" | grep -c '\\.args$')
job=$((1000 + count))
for last; do :; done
printf '%s\\n' "$@" > "$log/$job.args"
cp "$last" "$log/$job.sh"
echo "Submitted batch job $job"
"""


def test_slurm_executor_submits_each_run_as_a_job_array_after_the_previous(workdir, tmp_path):
    _split_corpus(workdir, tmp_path / "corpus", parts=4)
    log, bin_dir = tmp_path / "sbatch", tmp_path / "bin"
    log.mkdir(), bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(log=log))
    (bin_dir / "sbatch").chmod(0o755)
    slurm = {
        "kind": "slurm",
        "tasks": 4,
        "partition": "cpu",
        "time": "02:00:00",
        "cpus_per_task": 2,
        "mem_per_cpu_gb": 3,
        "job_name": "tinydata",
        "sbatch_args": {"account": "lab"},
    }
    recipe = _recipe(workdir, tmp_path, "slurm", executor=slurm)
    env_path = f"{bin_dir}:{os.environ['PATH']}"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "prepare_data.py"), "--config", str(recipe)],
        cwd=workdir,
        env={**os.environ, "PATH": env_path, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted to Slurm" in result.stdout
    assert read_record(str(tmp_path / "slurm"))["status"] == "submitted"
    assert not (tmp_path / "slurm" / "packed").exists()

    jobs = []
    for args_file in sorted(log.glob("*.args")):
        script = args_file.with_suffix(".sh").read_text()
        directives = dict(
            (line.removeprefix("#SBATCH --").split("=", 1) + [""])[:2]
            for line in script.splitlines()
            if line.startswith("#SBATCH --")
        )
        jobs.append((int(args_file.stem), args_file.read_text().split("\n"), directives, script))
    steps = [job for job in jobs if "merge_stats" not in job[3]]
    names = list(datatrove_report.RUNS)
    assert [d["job-name"] for _, _, d, _ in steps] == [f"tinydata_{n}" for n in names]
    arrays = [d["array"] for _, _, d, _ in steps]
    assert arrays == ["0-3", "0-0", "0-3", "0-3", "0-31", "0-0", "0-3"]  # tasks; one per LSH band; single
    for (_, args, directives, script), previous in zip(steps, [None, *steps[:-1]], strict=True):
        assert directives["partition"] == "cpu" and directives["time"] == "02:00:00"
        assert directives["cpus-per-task"] == "2" and directives["mem-per-cpu"] == "3G"
        assert directives["account"] == "lab"
        assert "launch_pickled_pipeline" in script
        dependency = [a for a in args if a.startswith("--dependency=")]
        assert dependency == ([f"--dependency=afterok:{previous[0]}"] if previous else [])
    # One stats-merging job after each step's array.
    merges = [job for job in jobs if "merge_stats" in job[3]]
    assert [d["dependency"] for _, _, d, _ in merges] == [f"afterok:{job}" for job, *_ in steps]


@pytest.mark.parametrize(
    ("executor", "message"),
    [
        ({"kind": "cloud"}, "executor.kind: expected one of ['local', 'slurm', 'ray']"),
        ({"kind": "slurm", "tasks": 2}, "executor.partition: required for the slurm executor"),
        ({"kind": "local", "partition": "cpu"}, "executor.partition: not a key of the local executor"),
        ({"tasks": 0}, "executor.tasks: expected a whole number >= 1"),
    ],
)
def test_bad_executor_section_fails_before_any_work(workdir, tmp_path, executor, message):
    recipe = _recipe(workdir, tmp_path, "bad", executor=executor)
    result = run_script(["prepare_data.py", "--config", str(recipe)], cwd=workdir)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "bad").exists()
