"""Throughput of the data stage on a generated web-like corpus, step by step, next to tokenization alone.

    python scripts/benchmark_data.py [--megabytes 100] [--num_proc N] [--engines datasets,datatrove]
                                     [--work_dir DIR] [--json FILE]

Generates a corpus (default 100 MB) of English-like documents with planted exact and near
duplicates, junk and PII; runs the whole data stage on it with each engine side by side (`datasets`:
the previous datasets.map implementation; `datatrove`: the datatrove pipelines, `num_proc` tasks and
workers), each in its own process; then tokenizes the raw corpus alone with the same tokenizer
through `datasets.map`, the floor the other steps should approach. Prints MB/s and documents/s per
core for every step and end to end, each engine's peak RSS (its largest process) and, for datatrove,
each run's largest task's peak RSS (run it at two sizes to see what grows with the corpus). A `datasets`
step's seconds are wall seconds on `num_proc` cores; a `datatrove` step's are task-seconds (summed
over single-core tasks), so both divide by the cores they used. Figures are in docs/benchmarks.md.
"""

import argparse
import itertools
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from trellis.core.errors import exit_on_error

STOP_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "that",
    "is",
    "with",
    "for",
    "on",
    "as",
    "was",
    "be",
    "have",
]
SYLLABLES = [
    "ka",
    "ro",
    "te",
    "li",
    "mon",
    "da",
    "ver",
    "sa",
    "pel",
    "tor",
    "an",
    "mi",
    "gu",
    "ne",
    "ship",
    "ing",
]


def _vocabulary(rng: random.Random, size: int = 6000) -> list[str]:
    return ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(size)]


def _document(rng: random.Random, vocabulary: list[str], weights: list[float]) -> str:
    paragraphs = []
    for _ in range(rng.randint(2, 8)):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [
                rng.choice(STOP_WORDS) if rng.random() < 0.35 else w
                for w in rng.choices(vocabulary, weights, k=rng.randint(8, 22))
            ]
            sentences.append(" ".join(words).capitalize() + rng.choice(".....!?"))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def _documents(rng: random.Random):
    """An endless stream: 80% distinct documents, 8% exact and 5% near duplicates of recent ones,
    5% junk (navigation, symbol or repeated-line pages), 2% with an email and a phone number."""
    vocabulary = _vocabulary(rng)
    weights = [1 / (rank + 1) ** 0.9 for rank in range(len(vocabulary))]
    recent: list[str] = []
    for index in itertools.count():
        roll = rng.random()
        if roll < 0.08 and recent:
            yield rng.choice(recent)
        elif roll < 0.13 and recent:
            words = rng.choice(recent).split(" ")
            for _ in range(max(1, len(words) // 50)):
                words[rng.randrange(len(words))] = rng.choice(vocabulary)
            yield " ".join(words)
        elif roll < 0.18:
            yield rng.choice(["Home | About | Contact", "#### ### ## # ... ... ...", "Buy now!\n" * 30])
        else:
            text = _document(rng, vocabulary, weights)
            if roll < 0.20:
                text += f"\n\nContact us at desk{index}@example.com or +1 415-555-{index % 10000:04d}."
            recent = (recent + [text])[-200:]
            yield text


def generate_corpus(
    directory: Path, megabytes: float, seed: int = 0, shard_mb: float = 25
) -> tuple[int, int]:
    """Write jsonl shards (`shard_mb` MB each) of about `megabytes` MB; return bytes and documents written.
    A corpus this call wrote before with the same arguments is kept (generating 400 MB takes minutes)."""
    done, settings = directory / "done.json", {"megabytes": megabytes, "seed": seed, "shard_mb": shard_mb}
    if done.exists() and json.loads(done.read_text())["settings"] == settings:
        written = json.loads(done.read_text())
        return written["bytes"], written["documents"]
    if directory.exists():
        for old in directory.glob("shard-*.jsonl"):
            old.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    documents = _documents(random.Random(seed))
    written, count, target = 0, 0, megabytes * 1e6
    while written < target:
        with open(directory / f"shard-{count:08d}.jsonl", "w", encoding="utf-8") as shard:
            shard_bytes = 0
            while written + shard_bytes < target and shard_bytes < shard_mb * 1e6:
                line = json.dumps({"text": next(documents)}) + "\n"
                shard.write(line)
                shard_bytes += len(line.encode())
                count += 1
        written += shard_bytes
    done.write_text(json.dumps({"settings": settings, "bytes": written, "documents": count}))
    return written, count


def throughput_rows(steps: list[dict], cores: int, engine: str) -> list[dict]:
    """MB/s and documents/s per core for every step, from its input size, time and cores."""
    rows = []
    for step in steps:
        mb_in = (step["bytes_in"] or step.get("bytes_out", 0)) / 1e6
        docs_in = step["documents_in"] or step.get("documents_out", 0)
        seconds = max(step["seconds"], 1e-9)
        rows.append(
            {
                "engine": engine,
                "step": step["step"],
                "mb_in": mb_in,
                "documents_in": docs_in,
                "seconds": step["seconds"],
                "cores": cores,
                "mb_per_s_per_core": mb_in / seconds / cores,
                "docs_per_s_per_core": docs_in / seconds / cores,
            }
        )
    return rows


def run_engine(engine: str, recipe: Path, output_dir: Path, num_proc: int) -> tuple[dict, float, float]:
    """The data stage in its own process: its report, wall seconds and peak RSS (MB, largest process)."""
    command = [sys.executable, str(Path(__file__).with_name("prepare_data.py")), "--config", str(recipe)]
    command += ["--engine", engine, "--output_dir", str(output_dir)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(
            f"the {engine} data stage failed (exit {os.waitstatus_to_exitcode(status)}); see above"
        )
    report = json.loads((output_dir / "data_report.json").read_text())
    return report, seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--engines", default="datasets,datatrove")
    parser.add_argument("--work_dir", default="/tmp/trellis-benchmark")
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args()

    import datasets

    from trellis.data import corpus, packing
    from trellis.stages import parse_recipe

    logging.basicConfig(
        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO, stream=sys.stdout
    )
    datasets.disable_caching()  # every step really runs, also on a second benchmark run
    work = Path(options.work_dir)
    start = time.perf_counter()
    # at least two files per core: datatrove shares input files out among its tasks
    shard_mb = min(25.0, options.megabytes / (2 * options.num_proc))
    corpus_bytes, corpus_docs = generate_corpus(work / "corpus", options.megabytes, shard_mb=shard_mb)
    logging.info(
        "Corpus: %.1f MB (%d documents), ready in %.0f s",
        corpus_bytes / 1e6,
        corpus_docs,
        time.perf_counter() - start,
    )
    eval_file = work / "eval.jsonl"
    eval_file.write_text(
        json.dumps(
            {
                "question": "Which river flows through the ancient city founded by the twin brothers of the legend?"
            }
        )
        + "\n"
    )
    cores = options.num_proc
    shards = len(list((work / "corpus").glob("*.jsonl")))
    recipe = {
        "datasets": [{"path": str(work / "corpus" / "*.jsonl")}],
        "decontamination_datasets": [{"path": str(eval_file)}],
        "output_dir": str(work / "out"),
        "num_proc": cores,
        "executor": {"kind": "local", "tasks": max(1, min(cores, shards)), "workers": cores},
        "tokenizer_vocab_size": 8000,
        "tokenizer_train_documents": 10000,
        "block_size": 1024,
    }
    (work / "data.yaml").write_text(json.dumps(recipe))
    rows, summary = [], {}
    for engine in options.engines.split(","):
        report, seconds, rss = run_engine(engine, work / "data.yaml", work / f"out_{engine}", cores)
        step_cores = 1 if engine == "datatrove" else cores  # task-seconds are single-core seconds
        rows += throughput_rows(
            [s for s in report["steps"] if s["step"] not in ("split", "tokenizer", "tokenize_and_pack")],
            step_cores,
            engine,
        )
        rows += throughput_rows(
            [s for s in report["steps"] if s["step"] in ("tokenizer", "tokenize_and_pack")], cores, engine
        )
        rows += throughput_rows(
            [
                {
                    "step": "end_to_end",
                    "documents_in": corpus_docs,
                    "bytes_in": corpus_bytes,
                    "seconds": seconds,
                }
            ],
            cores,
            engine,
        )
        summary[engine] = {"seconds": round(seconds, 2), "peak_rss_mb": round(rss, 1)}
        if "datatrove" in report:  # each run's largest task (the engine's peak is its main process)
            summary[engine]["peak_task_rss_mb"] = report["datatrove"]["peak_task_rss_mb"]

    from transformers import AutoTokenizer

    (args,) = parse_recipe("data", ["--config", str(work / "data.yaml")])
    tokenizer_dir = work / f"out_{options.engines.split(',')[0]}" / packing.TOKENIZER_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    raw = corpus.load_corpus(args)
    start = time.perf_counter()
    raw.map(
        packing.tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=raw.column_names,
        num_proc=cores if cores > 1 else None,
        batched=True,
        batch_size=256,
        desc="Tokenizing alone",
    )
    alone = {"step": "tokenization_alone", "documents_in": len(raw), "bytes_in": corpus.utf8_bytes(raw)}
    alone["seconds"] = round(time.perf_counter() - start, 3)
    rows += throughput_rows([alone], cores, "-")

    print(f"\ncorpus: {corpus_bytes / 1e6:.1f} MB, {corpus_docs} documents; {cores} core(s)\n")
    print(
        f"{'engine':<11}{'step':<20}{'MB in':>10}{'docs in':>10}{'seconds':>10}{'cores':>7}"
        f"{'MB/s per core':>16}{'docs/s per core':>18}"
    )
    for row in rows:
        print(
            f"{row['engine']:<11}{row['step']:<20}{row['mb_in']:>10.1f}{row['documents_in']:>10}"
            f"{row['seconds']:>10.2f}{row['cores']:>7}{row['mb_per_s_per_core']:>16.2f}"
            f"{row['docs_per_s_per_core']:>18.0f}"
        )
    alone_rate = rows[-1]["mb_per_s_per_core"]
    for engine, figures in summary.items():
        end = next(r for r in rows if r["engine"] == engine and r["step"] == "end_to_end")
        figures["end_to_end_vs_tokenization_alone"] = round(end["mb_per_s_per_core"] / alone_rate, 3)
        print(
            f"{engine}: end to end {figures['seconds']} s, {figures['end_to_end_vs_tokenization_alone']:.0%} of "
            f"tokenization alone per core; peak RSS {figures['peak_rss_mb']} MB"
        )
        if "peak_task_rss_mb" in figures:
            runs = ", ".join(f"{run} {mb}" for run, mb in figures["peak_task_rss_mb"].items())
            print(f"{engine}: peak RSS of a task (MB), per run: {runs}")
    if options.json:
        figures = {
            "corpus_mb": corpus_bytes / 1e6,
            "documents": corpus_docs,
            "cores": cores,
            "engines": summary,
            "steps": rows,
        }
        Path(options.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    with exit_on_error():
        main()
