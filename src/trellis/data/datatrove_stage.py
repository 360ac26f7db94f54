"""The data stage on datatrove: read, clean, filter, deduplicate and decontaminate with datatrove blocks
on a local, Slurm or Ray executor; then (in this process) split, train the tokenizer and pack.

Seven datatrove runs, each resumable per task (`skip_completed`: a rerun skips tasks whose completion
file exists), under <output_dir>/datatrove/<fingerprint>/:

    1 filter            readers -> clean + PII -> length, Gopher quality, Gopher repetition, [C4],
                        [FineWeb], blocklist, [quality model] -> filtered/ ; exact-dedup signatures
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
import os
import shutil
import time
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.decont import NGramsDecontFilter
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader
from datatrove.pipeline.writers import JsonlWriter

from trellis.data.arguments import DataArguments, DatasetSource, ExecutorSpec
from trellis.data.datatrove_blocks import (
    WORK_DIR,
    BlocklistFilter,
    CountedPII,
    LengthFilter,
    PeakMemory,
    QualityFilter,
    RankFile,
    TrellisClean,
    VerifiedPairs,
    WhitespaceWords,
    decont_config,
    exact_key,
    minhash_config,
    quality_model_config,
    with_changes,
    write_decontamination_index,
)
from trellis.data.datatrove_report import (
    count_documents,
    filter_removals,
    kept_documents,
    raise_if_empty,
    removed_records,
    report_steps,
)
from trellis.data.sources import DataError, load_source


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
    from trellis.data.corpus import missing_column_message

    column = source.text_field or "text"
    first = next(iter(load_source(source, streaming=True)), None)
    if first is not None and column not in first:
        raise DataError(missing_column_message(source, column, list(first)))


def _materialize(source: DatasetSource, args: DataArguments, folder: str) -> str:
    from trellis.data.corpus import load_corpus

    if not os.path.exists(os.path.join(folder, "done")):
        os.makedirs(folder, exist_ok=True)
        load_corpus(with_changes(args, datasets=[source])).to_json(os.path.join(folder, "00000.jsonl"))
        Path(folder, "done").touch()
    return folder


Run = tuple[str, list[PipelineStep], int]  # (name, pipeline, tasks)

_EXACT = ExactDedupConfig(content_getter=exact_key)


def pipelines(args: DataArguments, work: str, index: str) -> list[Run]:
    """The seven runs, as in the module docstring's table (those the recipe turns off left out)."""
    tasks = args.executor_spec.tasks
    runs = [("filter", filter_run(args, work), tasks)]
    if args.exact_dedup:
        find = ExactFindDedups(_at(work, "exact_sigs"), _at(work, "exact_dups"), config=_EXACT)
        runs.append(("exact_find", [find], 1))
    runs.append(("exact_filter", exact_filter_run(args, work, index), tasks))
    if args.near_dedup:
        runs += minhash_runs(args, work)
    return runs


def filter_run(args: DataArguments, work: str) -> list[PipelineStep]:
    """Run 1: readers -> clean [+ PII] -> filters -> filtered/, [+ the exact-dedup signatures]."""
    pii = [CountedPII()] if args.redact_pii else []
    steps = [*readers(args, work), TrellisClean(args), *pii, *filters(args, work), _written(work, "filtered")]
    if args.exact_dedup:
        steps.append(ExactDedupSignature(_at(work, "exact_sigs"), config=_EXACT))
    return steps


def filters(args: DataArguments, work: str) -> list[PipelineStep]:
    """The recipe's filters, each writing what it removes to removed/<its step>/."""
    words = WhitespaceWords()
    steps: list[PipelineStep] = [LengthFilter(args, _removed(work, "length"))]
    if args.gopher_quality:
        steps.append(gopher_quality(args, _removed(work, "gopher"), words))
    if args.repetition_filter:
        steps.append(gopher_repetition(args, _removed(work, "repetition"), words))
    if args.c4_quality:
        steps.append(C4QualityFilter(exclusion_writer=_removed(work, "c4"), language=words))
    if args.fineweb_quality:
        steps.append(FineWebQualityFilter(exclusion_writer=_removed(work, "fineweb"), language=words))
    if args.blocklist_filter:
        steps.append(BlocklistFilter(args, _removed(work, "blocklist")))
    if args.quality_model:  # last: the model costs the most per document, so it sees only what the rules kept
        steps.append(QualityFilter(args, _threads_per_task(args.executor_spec), _removed(work, "quality")))
    return steps


def gopher_quality(args: DataArguments, removed: JsonlWriter, words: WhitespaceWords) -> GopherQualityFilter:
    """datatrove's Gopher quality rules with the recipe's thresholds (length is LengthFilter's)."""
    return GopherQualityFilter(
        min_doc_words=None,
        max_doc_words=None,
        min_avg_word_length=args.min_mean_word_length,
        max_avg_word_length=args.max_mean_word_length,
        max_symbol_word_ratio=args.max_symbol_word_ratio,
        max_bullet_lines_ratio=args.max_bullet_line_fraction,
        max_ellipsis_lines_ratio=args.max_ellipsis_line_fraction,
        max_non_alpha_words_ratio=args.min_alpha_word_fraction,
        min_stop_words=args.min_stop_words,
        exclusion_writer=removed,
        language=words,
    )


def gopher_repetition(
    args: DataArguments, removed: JsonlWriter, words: WhitespaceWords
) -> GopherRepetitionFilter:
    """datatrove's Gopher repetition rules with the recipe's thresholds (one fraction bounds both the
    lines' and their characters' share)."""
    return GopherRepetitionFilter(
        dup_line_frac=args.max_duplicate_line_fraction,
        dup_line_char_frac=args.max_duplicate_line_fraction,
        dup_para_frac=args.max_duplicate_paragraph_fraction,
        dup_para_char_frac=args.max_duplicate_paragraph_fraction,
        top_n_grams=tuple(sorted(args.max_top_ngram_fraction.items())),
        dup_n_grams=tuple(sorted(args.max_duplicate_ngram_fraction.items())),
        exclusion_writer=removed,
        language=words,
    )


def exact_filter_run(args: DataArguments, work: str, index: str) -> list[PipelineStep]:
    """Run 3: filtered/ -> [exact-dedup filter] -> [n-gram decontamination] -> deduped/."""
    steps: list[PipelineStep] = [_documents(work, "filtered")]
    if args.exact_dedup:
        steps.append(ExactDedupFilter(_at(work, "exact_dups"), config=_EXACT))
    if args.decontamination_datasets:
        removed = _removed(work, "decontaminate")
        steps.append(NGramsDecontFilter(index, decont_config(args), removed, WhitespaceWords()))
    return [*steps, _written(work, "deduped")]


def minhash_runs(args: DataArguments, work: str) -> list[Run]:
    """Runs 4-7: deduped/ -> signatures -> LSH candidate pairs -> pairs verified, then clustered ->
    MinHash filter -> final/."""
    tasks, minhash = args.executor_spec.tasks, minhash_config(args)
    sigs, candidates = _at(work, "minhash_sigs"), _at(work, "minhash_candidates")
    pairs, remove = _at(work, "minhash_pairs"), _at(work, "minhash_remove")
    signature = MinhashDedupSignature(sigs, config=minhash, language=WhitespaceWords())
    verify = VerifiedPairs(
        candidates, pairs, _at(work, "deduped"), args.minhash_threshold, args.minhash_ngram
    )
    cluster = MinhashDedupCluster(pairs, remove, config=minhash, save_cluster_id=True)
    near = MinhashDedupFilter(remove, exclusion_writer=_removed(work, "near_dedup"), load_cluster_ids=True)
    return [
        # a run of its own: the block's timer spans its input, which is then only a reader
        ("minhash_signature", [_documents(work, "deduped"), signature], tasks),
        ("minhash_buckets", [MinhashDedupBuckets(sigs, candidates, config=minhash)], minhash.num_buckets),
        ("minhash_cluster", [verify, cluster], 1),
        ("minhash_filter", [_documents(work, "deduped"), near, _written(work, "final")], tasks),
    ]


def _at(work: str, folder: str) -> str:
    return os.path.join(work, folder)


def _documents(work: str, folder: str) -> RankFile:
    """What each task wrote to `folder` in an earlier run, read by the same task."""
    return RankFile(_at(work, folder))


def _written(work: str, folder: str) -> JsonlWriter:
    # uncompressed: gzip cost as much as a filter, for files read once more on the same disk
    return JsonlWriter(_at(work, folder), output_filename="${rank}.jsonl", compression=None)


def _removed(work: str, step: str) -> JsonlWriter:
    return _written(work, os.path.join("removed", step))


def _threads_per_task(spec: ExecutorSpec) -> int:
    """Torch threads of a scoring task: its cores (Slurm, Ray), or this machine's shared among the
    local processes running at once."""
    if spec.kind != "local":
        return spec.cpus_per_task
    return max(1, (os.cpu_count() or 1) // min(spec.tasks, spec.workers or spec.tasks))


def executors(spec: ExecutorSpec, runs: list[Run], work: str) -> list:
    """One datatrove executor per run; on Slurm each depends on the previous (afterok), elsewhere they
    run one after the other from here, so an empty result stops the stage with its reasons."""
    made: list = []
    for name, steps, tasks in runs:
        pipeline = [*steps, PeakMemory()]
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
    if args.quality_model:  # a wrong model fails here, not in every task after the filters ran
        quality_model_config(args.quality_model, args.quality_model_revision, args.quality_trust_remote_code)
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
        if name == "filter" and count_documents(work, "filtered") == 0:
            raise_if_empty("filter", {r: v["removed"] for r, v in filter_removals(args, work).items()})
        if name == "exact_filter" and count_documents(work, "deduped") == 0:
            raise_if_empty("decontaminate", {"contaminated": len(removed_records(work, "decontaminate"))})
    return True


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
    documents = corpus.split_documents(kept_documents(args, work), args, report)
    tokenizer = corpus.make_tokenizer(documents, args, report)
    map_kwargs = {"num_proc": None, "batched": True, "batch_size": 256}
    corpus.tokenize_and_pack_documents(documents, tokenizer, args, report, map_kwargs)
    report.write(args.output_dir)
    return report


def _finished(work: str, runs: list[Run]) -> bool:
    """Every task of every run has its completion file (on Slurm: the jobs are done)."""
    for name, _, tasks in runs:
        folder = os.path.join(work, "logs", name, "completions")
        if not os.path.isdir(folder) or len(os.listdir(folder)) < tasks:
            return False
    return True
