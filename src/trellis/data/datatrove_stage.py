"""The data stage on datatrove: read, clean, filter, deduplicate and decontaminate with datatrove blocks
on a local, Slurm or Ray executor; then (in this process) split, train the tokenizer and pack.

Seven datatrove runs, each resumable per task (`skip_completed`: a rerun skips tasks whose completion
file exists), under <output_dir>/datatrove/<fingerprint>/:

    1 filter            readers -> clean + PII -> length, Gopher quality, Gopher repetition, [C4],
                        [FineWeb], blocklist -> filtered/ ; exact-dedup signatures
    2 exact_find        exact duplicates across all tasks (1 task)
    3 exact_filter      filtered/ -> exact-dedup filter -> n-gram decontamination -> deduped/
    4 minhash_signature deduped/ -> MinHash signatures
    5 minhash_buckets   LSH buckets -> candidate pairs (one task per band)
    6 minhash_cluster   candidate pairs verified by exact shingle Jaccard (Trellis), then clustered (1 task)
    7 minhash_filter    deduped/ -> MinHash filter -> final/

Removed documents are written per step under removed/ with their reason: the report's counts and
examples are read from those files, so they are the same whichever executor ran the steps.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import TextNormConfig, ngrams, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from trellis.data import dedup, text_quality
from trellis.data.arguments import DataArguments, DatasetSource, ExecutorSpec
from trellis.data.sources import DataError, load_source

logger = logging.getLogger("trellis")

WORK_DIR = "datatrove"
_PII_PLACEHOLDERS = tuple(text_quality.PII_PLACEHOLDERS.values())
# Numbers stay: the tiny corpus is sums ("4 + 5 = 9"), and a leak or a duplicate is about the numbers too.
_NORM = TextNormConfig(norm_numbers=False, norm_unicode_diacritics=False)
_EXAMPLE_CHARS = 300


# --- Trellis blocks: only where datatrove has no such step ------------------------------------------


class WhitespaceWords(WordTokenizer):
    """Words as Trellis has always counted them (runs of non-space): the Gopher thresholds of existing
    recipes keep their meaning, and no spaCy model is needed (datatrove's English default)."""

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return text_quality.words_of(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [line for line in text.split("\n") if line.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for sentence in self.sent_tokenize(text):
            start = text.index(sentence, start)
            spans.append((start, start + len(sentence)))
            start += len(sentence)
        return spans


class TrellisClean(BaseFormatter):
    """Control characters, mojibake repair, Unicode normal form, boilerplate lines, whitespace (datatrove's
    FTFY formatter needs ftfy and repairs differently; these are the recipe's keys)."""

    name = "clean"

    def __init__(self, args: DataArguments) -> None:
        super().__init__()
        self.args = _replace(args, redact_pii=False)  # PII is the next block's

    def format(self, text: str) -> str:
        return text_quality.clean_text(text, self.args)[0]


class CountedPII(PIIFormatter):
    """datatrove's PII formatter (emails, IP addresses) with Trellis's placeholders, plus phone numbers
    (datatrove has no phone rule); counts what it replaced."""

    name = "pii"

    def __init__(self) -> None:
        super().__init__(
            email_replacement=text_quality.PII_PLACEHOLDERS["email"],
            ip_replacement=text_quality.PII_PLACEHOLDERS["ip"],
            only_remove_public_ips=False,
        )

    def format(self, text: str) -> str:
        before = sum(text.count(p) for p in _PII_PLACEHOLDERS)
        text = super().format(text)
        text = text_quality.PHONE.sub(text_quality.PII_PLACEHOLDERS["phone"], text)
        self.stat_update("pii_redacted", value=sum(text.count(p) for p in _PII_PLACEHOLDERS) - before)
        return text


class RecipeRule(BaseFilter):
    """A Trellis rule as a datatrove filter, with Trellis's reason names."""

    def __init__(self, args: DataArguments, exclusion_writer=None) -> None:
        super().__init__(exclusion_writer)
        self.args = args

    def reason(self, text: str) -> str | None:
        raise NotImplementedError

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = self.reason(doc.text)
        return (False, reason) if reason else True


class LengthFilter(RecipeRule):
    """min/max characters and words (datatrove's Gopher filter bounds words only, without symbols)."""

    name = "length"

    def reason(self, text: str) -> str | None:
        return text_quality.length_reason(text, text_quality.words_of(text), self.args)


class BlocklistFilter(RecipeRule):
    """The word and phrase blocklist over the text (datatrove's URLFilter looks at URLs only)."""

    name = "blocklist"

    def reason(self, text: str) -> str | None:
        return text_quality.blocklist_reason(text, self.args)


class RankFile(JsonlReader):
    """Reads the one file its task wrote in the previous run (nothing if that task wrote none): the
    dedup steps address documents by (task, index), which a reader sharing out whatever files exist
    would shift when a task's documents were all removed."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        name = f"{rank:05d}.jsonl"
        if self.data_folder.isfile(name):
            yield from self.read_files_shard([name])


def _exact_key(doc: Document) -> str:
    """Exact duplicates up to case, punctuation and whitespace, as before."""
    return " ".join(dedup.normalized_words(doc.text))


class VerifiedPairs(PipelineStep):
    """Keep the LSH candidate pairs whose exact word-shingle Jaccard reaches the threshold. datatrove
    clusters every pair that shares a band, so its precision is set by bands x rows alone; this step
    makes `minhash_threshold` what decides, as before."""

    type = "🫂 - DEDUP"
    name = "verify candidate pairs"

    def __init__(self, candidates: str, verified: str, documents: str, threshold: float, ngram: int) -> None:
        super().__init__()
        self.candidates, self.verified, self.documents = candidates, verified, documents
        self.threshold, self.ngram = threshold, ngram

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = sorted(glob.glob(os.path.join(self.candidates, "*.dups")))
        pairs = {name: _read_pairs(name) for name in files}
        wanted = {doc for found in pairs.values() for pair in found for doc in pair}
        texts = _texts_of(self.documents, wanted)
        os.makedirs(self.verified, exist_ok=True)
        similar: dict[tuple, bool] = {}
        for name, found in pairs.items():
            with open(os.path.join(self.verified, os.path.basename(name)), "wb") as out:
                for a, b in found:
                    if (a, b) not in similar:
                        similar[a, b] = dedup.jaccard(texts[a], texts[b], self.ngram) >= self.threshold
                    self.stat_update("candidates")
                    if similar[a, b]:
                        self.stat_update("verified")
                        out.write(struct.pack("<4I", *a, *b))


def _read_pairs(path: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    values = np.fromfile(path, dtype="<u4").reshape(-1, 4)
    return [((int(f1), int(d1)), (int(f2), int(d2))) for f1, d1, f2, d2 in values]


def _texts_of(folder: str, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """Texts of the (task, index) documents of `folder`'s per-task files; only those."""
    texts = {}
    for task in sorted({task for task, _ in wanted}):
        keep = {index for t, index in wanted if t == task}
        for index, record in enumerate(_records(os.path.join(folder, f"{task:05d}.jsonl"))):
            if index in keep:
                texts[task, index] = record["text"]
    return texts


def _records(path: str):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)


def _replace(args: DataArguments, **changes) -> DataArguments:
    import dataclasses

    return dataclasses.replace(args, **changes)


def write_decontamination_index(args: DataArguments, folder: str) -> int:
    """The n-gram hashes of every string of the evaluation records, in the format datatrove's
    NGramsDecontFilter loads (its indexer reads lighteval tasks only). Returns how many records."""
    config = _decont_config(args)
    hash_func = create_hash_func(config.hash_config)
    words = WhitespaceWords()
    records = [row for source in args.decontamination_datasets for row in load_source(source)]
    hashes = {
        hash_func(" ".join(gram))
        for record in records
        for text in dedup.strings_in(record)
        for gram in ngrams(words.word_tokenize(simplify_text(text, config.norm_config)), config.n_grams)
    }
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, "eval.partial")  # renamed when whole: a killed run leaves no half index
    np.array(sorted(hashes), dtype=config.hash_config.np_descr).tofile(partial)
    os.replace(partial, os.path.join(folder, "eval.index.hashes"))
    return len(records)


def _decont_config(args: DataArguments) -> NGramsDecontConfig:
    return NGramsDecontConfig(
        n_grams=args.decontamination_ngram,
        find_query_ngrams=True,
        find_overlap_ngrams=False,
        norm_config=_NORM,
    )


def _minhash_config(args: DataArguments) -> MinhashConfig:
    return MinhashConfig(
        n_grams=args.minhash_ngram,
        num_buckets=args.minhash_bands,
        hashes_per_bucket=args.minhash_rows,
        seed=args.seed,
        norm_config=_NORM,
        hash_config=HashConfig(precision=64),
    )


# --- the pipelines -----------------------------------------------------------------------------------


def readers(args: DataArguments, work: str) -> list[PipelineStep]:
    """datatrove readers for local jsonl/parquet files and Hub datasets (a Hub source's max_documents
    is split evenly among the tasks); sources they cannot express (other formats, weights, a local
    source's max_documents, local dataset directories) are loaded by Trellis into a jsonl file that a
    JsonlReader then reads."""
    steps = []
    for number, source in enumerate(args.datasets):
        _check_text_field(source)
        text_key = source.text_field or "text"
        path = os.path.expanduser(source.path)
        local = glob.glob(path) if any(c in path for c in "*?[") else ([path] if os.path.exists(path) else [])
        kind = _file_kind(local)
        if source.weight == 1.0 and source.max_documents is None and kind and all(map(os.path.isfile, local)):
            folder, pattern = os.path.dirname(os.path.abspath(local[0])), None
            if len(local) > 1 or path != local[0]:
                pattern = os.path.relpath(os.path.abspath(path), folder)
            reader = JsonlReader if kind == "jsonl" else ParquetReader
            steps.append(
                reader(folder, glob_pattern=pattern or os.path.basename(local[0]), text_key=text_key)
            )
        elif source.weight == 1.0 and not local:
            options = {"split": source.split, "name": source.name, "revision": source.revision}
            steps.append(
                HuggingFaceDatasetReader(
                    source.path,
                    dataset_options={k: v for k, v in options.items() if v is not None},
                    streaming=source.streaming,
                    # per task: each task reads its share of the files, and of max_documents
                    limit=-(-source.max_documents // args.executor_spec.tasks)
                    if source.max_documents
                    else -1,
                    text_key=text_key,
                )
            )
        else:
            steps.append(JsonlReader(_materialize(source, args, os.path.join(work, f"source_{number}"))))
    return steps


def _file_kind(paths: list[str]) -> str | None:
    """`jsonl` or `parquet` when every path is one (compressed jsonl too), else None."""
    names = [p.removesuffix(".gz").removesuffix(".zst") for p in paths]
    for kind in ("jsonl", "parquet"):
        if names and all(name.endswith(f".{kind}") for name in names):
            return kind
    return None


def _check_text_field(source: DatasetSource) -> None:
    """The text column exists: a reader would otherwise skip every record as empty."""
    from trellis.data.corpus import _missing_column

    column = source.text_field or "text"
    first = next(iter(load_source(source, streaming=True)), None)
    if first is not None and column not in first:
        raise DataError(_missing_column(source, column, list(first)))


def _materialize(source: DatasetSource, args: DataArguments, folder: str) -> str:
    from trellis.data.corpus import load_corpus

    if not os.path.exists(os.path.join(folder, "done")):
        os.makedirs(folder, exist_ok=True)
        load_corpus(_replace(args, datasets=[source])).to_json(os.path.join(folder, "00000.jsonl"))
        Path(folder, "done").touch()
    return folder


def _removed(work: str, step: str) -> JsonlWriter:
    return JsonlWriter(os.path.join(work, "removed", step), output_filename="${rank}.jsonl", compression=None)


def pipelines(args: DataArguments, work: str, index: str) -> list[tuple[str, list, int]]:
    """(name, pipeline, tasks) of the seven runs."""
    tasks = args.executor_spec.tasks
    words = WhitespaceWords()
    exact = ExactDedupConfig(content_getter=_exact_key)
    minhash = _minhash_config(args)
    path = lambda *parts: os.path.join(work, *parts)  # noqa: E731
    filters: list[PipelineStep] = [LengthFilter(args, _removed(work, "length"))]
    if args.gopher_quality:
        filters.append(
            GopherQualityFilter(
                min_doc_words=None,
                max_doc_words=None,
                min_avg_word_length=args.min_mean_word_length,
                max_avg_word_length=args.max_mean_word_length,
                max_symbol_word_ratio=args.max_symbol_word_ratio,
                max_bullet_lines_ratio=args.max_bullet_line_fraction,
                max_ellipsis_lines_ratio=args.max_ellipsis_line_fraction,
                max_non_alpha_words_ratio=args.min_alpha_word_fraction,
                min_stop_words=args.min_stop_words,
                exclusion_writer=_removed(work, "gopher"),
                language=words,
            )
        )
    if args.repetition_filter:
        filters.append(
            GopherRepetitionFilter(
                dup_line_frac=args.max_duplicate_line_fraction,
                dup_line_char_frac=args.max_duplicate_line_fraction,
                dup_para_frac=args.max_duplicate_paragraph_fraction,
                dup_para_char_frac=args.max_duplicate_paragraph_fraction,
                top_n_grams=tuple(sorted(args.max_top_ngram_fraction.items())),
                dup_n_grams=tuple(sorted(args.max_duplicate_ngram_fraction.items())),
                exclusion_writer=_removed(work, "repetition"),
                language=words,
            )
        )
    if args.c4_quality:
        filters.append(C4QualityFilter(exclusion_writer=_removed(work, "c4"), language=words))
    if args.fineweb_quality:
        filters.append(FineWebQualityFilter(exclusion_writer=_removed(work, "fineweb"), language=words))
    if args.blocklist_filter:
        filters.append(BlocklistFilter(args, _removed(work, "blocklist")))
    formatters: list[PipelineStep] = [TrellisClean(args)] + ([CountedPII()] if args.redact_pii else [])
    docs = lambda folder: RankFile(path(folder))  # noqa: E731
    # uncompressed: gzip cost as much as a filter, for files read once more on the same disk
    write = lambda folder: JsonlWriter(path(folder), output_filename="${rank}.jsonl", compression=None)  # noqa: E731
    filter_steps = [*readers(args, work), *formatters, *filters, write("filtered")]
    exact_steps: list[PipelineStep] = [docs("filtered")]
    if args.exact_dedup:
        filter_steps.append(ExactDedupSignature(path("exact_sigs"), config=exact))
        exact_steps.append(ExactDedupFilter(path("exact_dups"), config=exact))
    if args.decontamination_datasets:
        exact_steps.append(
            NGramsDecontFilter(index, _decont_config(args), _removed(work, "decontaminate"), words)
        )
    exact_steps.append(write("deduped"))
    runs: list[tuple[str, list, int]] = [("filter", filter_steps, tasks)]
    if args.exact_dedup:
        runs.append(
            ("exact_find", [ExactFindDedups(path("exact_sigs"), path("exact_dups"), config=exact)], 1)
        )
    runs.append(("exact_filter", exact_steps, tasks))
    if args.near_dedup:
        runs += [
            (  # a run of its own: the block's timer spans its input, which is then only a reader
                "minhash_signature",
                [
                    docs("deduped"),
                    MinhashDedupSignature(path("minhash_sigs"), config=minhash, language=words),
                ],
                tasks,
            ),
            (
                "minhash_buckets",
                [MinhashDedupBuckets(path("minhash_sigs"), path("minhash_candidates"), config=minhash)],
                minhash.num_buckets,
            ),
            (
                "minhash_cluster",
                [
                    VerifiedPairs(
                        path("minhash_candidates"),
                        path("minhash_pairs"),
                        path("deduped"),
                        args.minhash_threshold,
                        args.minhash_ngram,
                    ),
                    MinhashDedupCluster(
                        path("minhash_pairs"), path("minhash_remove"), config=minhash, save_cluster_id=True
                    ),
                ],
                1,
            ),
            (
                "minhash_filter",
                [
                    docs("deduped"),
                    MinhashDedupFilter(
                        path("minhash_remove"),
                        exclusion_writer=_removed(work, "near_dedup"),
                        load_cluster_ids=True,
                    ),
                    write("final"),
                ],
                tasks,
            ),
        ]
    return runs


def executors(spec: ExecutorSpec, runs: list[tuple[str, list, int]], work: str) -> list:
    """One datatrove executor per run; on Slurm each depends on the previous (afterok), elsewhere they
    run one after the other from here, so an empty result stops the stage with its reasons."""
    made: list = []
    for name, pipeline, tasks in runs:
        logs = os.path.join(work, "logs", name)
        previous = made[-1] if made and spec.kind == "slurm" else None
        if spec.kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            made.append(
                LocalPipelineExecutor(pipeline, tasks=tasks, workers=spec.workers or -1, logging_dir=logs)
            )
        elif spec.kind == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            made.append(
                SlurmPipelineExecutor(
                    pipeline,
                    tasks=tasks,
                    time=spec.time,
                    partition=spec.partition,
                    cpus_per_task=spec.cpus_per_task,
                    mem_per_cpu_gb=spec.mem_per_cpu_gb,
                    job_name=f"{spec.job_name}_{name}",
                    sbatch_args=dict(spec.sbatch_args),
                    logging_dir=logs,
                    depends=previous,
                    venv_path=spec.venv_path,
                )
            )
        else:
            from datatrove.executor import RayPipelineExecutor

            made.append(
                RayPipelineExecutor(
                    pipeline,
                    tasks=tasks,
                    cpus_per_task=spec.cpus_per_task,
                    logging_dir=logs,
                    depends=previous,
                )
            )
    return made


# --- running and reporting -----------------------------------------------------------------------------


def work_dir(output_dir: str, fingerprint: str) -> str:
    """This recipe's datatrove folder; those of other recipes (stale) are removed."""
    root = os.path.join(output_dir, WORK_DIR)
    for old in glob.glob(os.path.join(root, "*")):
        if os.path.basename(old) != fingerprint[:16]:
            shutil.rmtree(old, ignore_errors=True)
    return os.path.join(root, fingerprint[:16])


def run_datatrove(args: DataArguments, work: str, wall: dict[str, float] | None = None) -> bool:
    """Run (local, Ray) or submit (Slurm) the seven runs; True when their output is ready here (on Slurm:
    when a rerun finds every task complete)."""
    wall = {} if wall is None else wall
    index = os.path.join(work, "decont_index")
    if args.decontamination_datasets and not os.path.exists(os.path.join(index, "eval.index.hashes")):
        write_decontamination_index(args, index)
    runs = pipelines(args, work, index)
    chain = executors(args.executor_spec, runs, work)
    os.environ.setdefault("DATATROVE_COLORIZE_LOGS", "0")
    if args.executor_spec.kind == "ray":
        import ray

        if not ray.is_initialized():
            address = args.executor_spec.address
            # no address: a local cluster of this machine's cores, without the dashboard's processes
            ray.init(address=address) if address else ray.init(include_dashboard=False)
    if args.executor_spec.kind == "slurm":
        chain[-1].run()  # submits its dependencies first; submits nothing once every task is complete
        return _finished(work, runs)
    for (name, _, _), executor in zip(runs, chain, strict=True):
        start = time.perf_counter()
        executor.run()
        wall[name] = time.perf_counter() - start
        if name == "filter" and _count(work, "filtered") == 0:
            _raise_empty("filter", {r: v["removed"] for r, v in filter_removals(args, work).items()})
        if name == "exact_filter" and _count(work, "deduped") == 0:
            _raise_empty("decontaminate", {"contaminated": len(_removed_records(work, "decontaminate"))})
    return True


def _count(work: str, folder: str) -> int:
    return sum(
        sum(1 for _ in open(p, encoding="utf-8")) for p in glob.glob(os.path.join(work, folder, "*.jsonl"))
    )


def _removed_records(work: str, step: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(work, "removed", step, "*.jsonl")))
    return [record for name in files for record in _records(name)]


def _stat(work: str, run: str, block: str, key: str) -> int:
    total = 0
    for name in glob.glob(os.path.join(work, "logs", run, "stats", "*.json")):
        for entry in json.loads(Path(name).read_text()):
            if entry["name"].endswith(block):
                value = entry["stats"].get(key, 0)
                total += value["total"] if isinstance(value, dict) else value
    return int(total)


def _example(text: str) -> str:
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + "..."


def report_steps(args: DataArguments, work: str, report, wall: dict[str, float]) -> int:
    """Append the datatrove steps to the report (from the files they left); return the documents read.

    A step's `seconds` are task-seconds: the time its blocks took, summed over the tasks that ran them
    (one core each), wherever they ran; `wall` holds each run's wall-clock seconds.
    """
    filtered, filtered_bytes = _count(work, "filtered"), _bytes(work, "filtered")
    removals = filter_removals(args, work)
    loaded = filtered + sum(r["removed"] for r in removals.values())
    loaded_bytes = filtered_bytes + sum(_bytes(work, f"removed/{step}") for step in _FILTER_STEPS)
    entries = [
        {
            "step": "load",
            "documents_in": 0,
            "bytes_in": 0,
            "documents_out": loaded,
            "bytes_out": loaded_bytes,
        },
        {
            "step": "clean",
            "documents_in": loaded,
            "bytes_in": loaded_bytes,
            "documents_out": loaded,
            "pii_redacted": _stat(work, "filter", "pii", "pii_redacted"),
        },
        {"step": "filter", "documents_in": loaded, "bytes_in": loaded_bytes, "documents_out": filtered},
    ]
    report.details["filters"] = removals
    contaminated = _removed_records(work, "decontaminate")
    deduped, deduped_bytes = _count(work, "deduped"), _bytes(work, "deduped")
    if args.exact_dedup:
        entries.append(
            {
                "step": "exact_dedup",
                "documents_in": filtered,
                "bytes_in": filtered_bytes,
                "documents_out": deduped + len(contaminated),
            }
        )
    if args.decontamination_datasets:
        entries.append(
            {
                "step": "decontaminate",
                "documents_in": deduped + len(contaminated),
                "bytes_in": deduped_bytes + sum(len(r["text"].encode()) for r in contaminated),
                "documents_out": deduped,
            }
        )
        report.details["decontamination"] = {
            "removed": len(contaminated),
            "examples": [_example(r["text"]) for r in contaminated[: args.report_examples]],
        }
    if args.near_dedup:
        final = _count(work, "final")
        entries.append(
            {"step": "near_dedup", "documents_in": deduped, "bytes_in": deduped_bytes, "documents_out": final}
        )
        report.details["near_duplicates"] = _near_duplicate_details(args, work)
    seconds = task_seconds(work)
    for entry in entries:
        entry["seconds"] = round(seconds.get(entry["step"], 0.0), 3)
    report.details["datatrove"] = {
        "executor": args.executor_spec.kind,
        "tasks": args.executor_spec.tasks,
        "wall_seconds": {run: round(value, 3) for run, value in wall.items()},
        "task_seconds": {step: round(value, 3) for step, value in seconds.items()},
    }
    report.steps.extend(entries)
    return loaded


_FILTER_STEPS = ("length", "gopher", "repetition", "c4", "fineweb", "blocklist")


def _bytes(work: str, folder: str) -> int:
    files = glob.glob(os.path.join(work, folder, "*.jsonl"))
    return sum(len(r["text"].encode()) for name in files for r in _records(name))


# Blocks whose timer spans the whole run (they iterate their input, and yield, inside it).
_SPANNING = ("exact-deduplication stage 3", "MinHash stage 1")
RUNS = (
    "filter",
    "exact_find",
    "exact_filter",
    "minhash_signature",
    "minhash_buckets",
    "minhash_cluster",
    "minhash_filter",
)


def task_seconds(work: str) -> dict[str, float]:
    """Seconds per report step, summed over blocks and tasks; reading and writing the intermediate
    files between runs is `intermediate_io`. A block whose timer spans its run is given its run's time
    less the other blocks' time."""
    totals: Counter = Counter()
    for run in RUNS:
        for name in glob.glob(os.path.join(work, "logs", run, "stats", "*.json")):
            blocks = {
                block["name"]: block["time_stats"].get("total", 0.0)
                for block in json.loads(Path(name).read_text())
                if isinstance(block.get("time_stats"), dict)
            }
            spanning = [block for block in blocks if block.endswith(_SPANNING)]
            own = sum(seconds for block, seconds in blocks.items() if block not in spanning)
            for block, seconds in blocks.items():
                totals[_step_of(run, block)] += max(seconds - own, 0.0) if block in spanning else seconds
    return dict(totals)


def _step_of(run: str, block: str) -> str:
    if "READER" in block:
        return "load" if run == "filter" else "intermediate_io"
    if "WRITER" in block:
        return "intermediate_io"
    if run.startswith("minhash") or "MinHash" in block or "minhash" in block.lower():
        return "near_dedup"
    if "FORMAT" in block:
        return "clean"
    if "FILTER" in block:
        return "filter"
    if "DECONT" in block:
        return "decontaminate"
    return "exact_dedup"


def filter_removals(args: DataArguments, work: str) -> dict[str, dict]:
    """reason -> documents removed and the first few of them, from the filters' exclusion files."""
    reasons: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for step in _FILTER_STEPS:
        for record in _removed_records(work, step):
            reason = _reason(step, record["metadata"].get("filter_reason", step))
            reasons[reason] += 1
            shown = examples.setdefault(reason, [])
            if len(shown) < args.report_examples:
                shown.append(_example(record["text"]))
    return {r: {"removed": reasons[r], "examples": examples[r]} for r in sorted(reasons)}


def _reason(step: str, reason: str) -> str:
    return reason if ":" in reason else f"{step}: {reason}"


def _raise_empty(step: str, removed: dict) -> None:
    why = ", ".join(f"{reason}: {count}" for reason, count in sorted(removed.items())) or "nothing"
    raise DataError(
        f"no documents left after step '{step}' (removed: {why}); relax the thresholds of that step "
        f"in the recipe (or turn it off) or check the input data"
    )


def _near_duplicate_details(args: DataArguments, work: str) -> dict[str, Any]:
    removed = _removed_records(work, "near_dedup")
    clusters: dict[int, list[str]] = {}
    for record in removed:
        clusters.setdefault(record["metadata"]["minhash_cluster_id"], []).append(record["text"])
    shown = sorted(clusters)[: args.report_examples]
    kept = {}
    for record in (
        r for name in sorted(glob.glob(os.path.join(work, "final", "*.jsonl"))) for r in _records(name)
    ):
        cluster = record["metadata"].get("minhash_cluster_id", -1)
        if cluster in shown:
            kept[cluster] = record["text"]
    return {
        "clusters": len(clusters),
        "removed": len(removed),
        "largest_cluster": 1 + max((len(c) for c in clusters.values()), default=0) if clusters else 0,
        "examples": [[_example(kept.get(c, "")), _example(clusters[c][0])] for c in shown],
    }


def kept_documents(args: DataArguments, work: str):
    """The documents that survived, in task order, as a `text` dataset."""
    import datasets

    folder = "final" if args.near_dedup else "deduped"
    texts = [
        r["text"] for name in sorted(glob.glob(os.path.join(work, folder, "*.jsonl"))) for r in _records(name)
    ]
    return datasets.Dataset.from_dict({"text": texts})


def prepare(args: DataArguments, fingerprint: str, record):
    """The datatrove steps, then the split, tokenizer and packing of corpus.py; the report, or None when
    the steps were submitted to Slurm (rerun the same command once the jobs are done)."""
    from trellis.data import corpus

    work = work_dir(args.output_dir, fingerprint)
    wall: dict[str, float] = {}
    if not run_datatrove(args, work, wall):
        return None
    report = corpus.Report()
    record.set_input("documents", report_steps(args, work, report, wall))
    documents = corpus._split(kept_documents(args, work), args, report)
    tokenizer = corpus._tokenizer(documents, args, report)
    map_kwargs = {"num_proc": None, "batched": True, "batch_size": 256}
    corpus._tokenize_and_pack(documents, tokenizer, args, report, map_kwargs)
    report.write(args.output_dir)
    return report


def _finished(work: str, runs: list[tuple[str, list, int]]) -> bool:
    """Every task of every run has its completion file (on Slurm: the jobs are done)."""
    for name, _, tasks in runs:
        folder = os.path.join(work, "logs", name, "completions")
        if not os.path.isdir(folder) or len(os.listdir(folder)) < tasks:
            return False
    return True
