"""The data stage: raw text -> cleaned, filtered, deduplicated, decontaminated, tokenized, packed.

Output contract (read by the pretraining stage through trellis.data.packing.load_packed):

    <output_dir>/packed/       datasets.DatasetDict (save_to_disk), splits train and validation, one
                               column `input_ids`: blocks of exactly block_size tokens, documents
                               joined with EOS (the last block of a split is filled with pad tokens)
    <output_dir>/tokenizer/    transformers tokenizer directory (trained, or copied from the base)
    <output_dir>/data_report.json, data_report.md, trellis_run.json

Heavy per-document work runs in `datasets.map(num_proc=...)`; what needs the whole corpus (hash
sets, LSH buckets, packing) runs in the main process on numpy arrays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from trellis.core.hashing import content_hash, file_stamps
from trellis.core.run_record import config_dict, read_record
from trellis.core.tables import markdown_table
from trellis.data import dedup, text_quality
from trellis.data.arguments import DataArguments, DatasetSource
from trellis.data.packing import PACKED_DIR, TOKENIZER_DIR, build_tokenizer, compression, tokenize_and_pack
from trellis.data.sources import DataError, apply_weight, load_source

logger = logging.getLogger("trellis")

REPORT_JSON = "data_report.json"
REPORT_MD = "data_report.md"
_EXAMPLE_CHARS = 300
_COMPRESSION_SAMPLE = 2000  # held-out documents the tokenizer's compression is measured on
# Code whose change must invalidate a cached result.
_CODE_FILES = (
    "corpus.py",
    "packing.py",
    "dedup.py",
    "text_quality.py",
    "tokenizer.py",
    "sources.py",
    "formats.py",
    "datatrove_stage.py",
    "datatrove_blocks.py",
    "datatrove_report.py",
)


# --- caching ------------------------------------------------------------------------------------


def _source_stamps(source: DatasetSource) -> dict | str:
    """Local files by content; a Hub dataset by name (pin `revision` for a cache that cannot go stale)."""
    import glob

    path = os.path.expanduser(source.path)
    if any(ch in path for ch in "*?["):
        local = sorted(glob.glob(path))
    else:
        local = [path] if os.path.exists(path) else []
    if not local:
        return f"hub:{source.path}:{source.name}:{source.split}:{source.revision}"
    return {name: stamp for item in local for name, stamp in file_stamps(item).items()}


def _model_stamps(name: str | None) -> dict | str | None:
    """A local model or tokenizer directory by content; a Hub id by name (its revision is a recipe key)."""
    if name and os.path.exists(os.path.expanduser(name)):
        return file_stamps(os.path.expanduser(name))
    return name


def fingerprint(args: DataArguments) -> str:
    """Hash of everything the output depends on: recipe values, input file contents, base tokenizer,
    quality model, blocklist and the stage's code. `num_proc` and `output_dir` do not change the result."""
    values = config_dict(args)
    for key in ("num_proc", "output_dir"):
        values.pop(key)
    # Where the steps run does not change the result; how the input is split into tasks orders it.
    values["executor"] = {"tasks": args.executor.get("tasks", 1)} if isinstance(args.executor, dict) else {}
    here = Path(__file__).parent
    return content_hash(
        {
            "recipe": values,
            "sources": [_source_stamps(s) for s in [*args.datasets, *args.decontamination_datasets]],
            "tokenizer": _model_stamps(args.tokenizer_name_or_path),
            "quality_model": _model_stamps(args.quality_model),
            "blocklist": file_stamps(args.blocklist_file or str(text_quality.DEFAULT_BLOCKLIST))
            if args.blocklist_filter
            else None,
            # stamped by name, not path: a checkout elsewhere computes the same
            "code": {name: file_stamps(str(here / name))[str(here / name)] for name in _CODE_FILES},
        }
    )


def is_up_to_date(output_dir: str, expected: str) -> bool:
    """True if output_dir holds a complete result computed from exactly these inputs and recipe."""
    record = read_record(output_dir) or {}
    return (
        record.get("stage") == "data"
        and record.get("status") == "complete"
        and record.get("inputs", {}).get("fingerprint") == expected
        and os.path.isdir(os.path.join(output_dir, PACKED_DIR))
        and os.path.isdir(os.path.join(output_dir, TOKENIZER_DIR))
    )


def clear_outputs(output_dir: str) -> None:
    """Remove a previous result, so nothing stale survives next to a new run record."""
    for name in (PACKED_DIR, TOKENIZER_DIR):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    for name in (REPORT_JSON, REPORT_MD):
        Path(output_dir, name).unlink(missing_ok=True)


# --- the report -----------------------------------------------------------------------------------


def utf8_bytes(dataset) -> int:
    """UTF-8 size of the `text` column (of the selected rows), computed in Arrow."""
    import pyarrow.compute as pc

    if "text" not in dataset.column_names or len(dataset) == 0:
        return 0
    return int(pc.sum(pc.binary_length(dataset.with_format("arrow")["text"])).as_py())


def _example(text: str) -> str:
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + "..."


class Report:
    """Documents and words in/out and time of every step, plus what each step removed and why."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}

    @contextmanager
    def step(self, name: str, dataset) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {
            "step": name,
            "documents_in": len(dataset) if dataset is not None else 0,
            "bytes_in": utf8_bytes(dataset) if dataset is not None else 0,
        }
        logger.info("Step %s: %d documents in", name, entry["documents_in"])
        start = time.perf_counter()
        yield entry
        entry["seconds"] = round(time.perf_counter() - start, 3)
        self.steps.append(entry)
        logger.info(
            "Step %s: %s documents out (%.1f s)", name, entry.get("documents_out", "-"), entry["seconds"]
        )

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, **self.details}

    def markdown(self) -> str:
        lines = [
            "# Data report",
            "",
            markdown_table(
                ["step", "documents in", "MB in", "documents out", "words out", "seconds"],
                [
                    [s["step"], s["documents_in"], f"{s['bytes_in'] / 1e6:.3f}", s.get("documents_out", "")]
                    + [s.get("words_out", ""), s["seconds"]]
                    for s in self.steps
                ],
                numeric=range(1, 6),
            ),
        ]
        for section, value in self.details.items():
            lines += [
                "",
                f"## {section}",
                "",
                "```json",
                json.dumps(value, indent=2, ensure_ascii=False),
                "```",
            ]
        return "\n".join(lines) + "\n"

    def write(self, output_dir: str) -> None:
        Path(output_dir, REPORT_JSON).write_text(
            json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n"
        )
        Path(output_dir, REPORT_MD).write_text(self.markdown())


def _ensure_documents(dataset, step: str, removed: dict[str, int]) -> None:
    if len(dataset) == 0:
        why = ", ".join(f"{reason}: {count}" for reason, count in sorted(removed.items())) or "nothing"
        raise DataError(
            f"no documents left after step '{step}' (removed: {why}); relax the thresholds of that step "
            f"in the recipe (or turn it off) or check the input data"
        )


# --- steps -------------------------------------------------------------------------------------------


def load_corpus(args: DataArguments):
    """Every source's text column as one `text` column, weighted as the recipe says."""
    import datasets

    parts = []
    for source in args.datasets:
        column = source.text_field or "text"
        dataset = _load_text_source(source, column)
        if len(dataset) == 0:
            raise DataError(f"dataset {source.path!r} is empty")
        parts.append(apply_weight(dataset, source.weight, args.seed))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _load_text_source(source: DatasetSource, column: str):
    import datasets

    if source.streaming:
        # Check the first record here: an error inside the generator would surface wrapped by datasets.
        first = next(iter(load_source(source, streaming=True)), None)
        if first is not None and column not in first:
            raise DataError(missing_column_message(source, column, list(first)))
        return datasets.Dataset.from_generator(
            _stream_texts,
            gen_kwargs={"source": source, "column": column},
            features=datasets.Features({"text": datasets.Value("string")}),
        )
    dataset = load_source(source)
    if column not in dataset.column_names:
        raise DataError(missing_column_message(source, column, dataset.column_names))
    if source.max_documents is not None:
        dataset = dataset.select(range(min(source.max_documents, len(dataset))))
    dataset = dataset.select_columns([column])
    return dataset.rename_column(column, "text") if column != "text" else dataset


def _stream_texts(source: DatasetSource, column: str) -> Iterator[dict]:
    stream = load_source(source, streaming=True)
    for record in stream.take(source.max_documents) if source.max_documents else stream:
        yield {"text": record[column]}


def missing_column_message(source: DatasetSource, column: str, columns: list[str]) -> str:
    return (
        f"dataset {source.path!r} has no text column {column!r}; it has {sorted(columns)}: set "
        f"`text_field` of this source in the recipe to one of them"
    )


def _clean_batch(batch: dict, args: DataArguments) -> dict:
    texts, pii = [], []
    for text in batch["text"]:
        cleaned, counts = text_quality.clean_text(text or "", args)
        texts.append(cleaned)
        pii.append(sum(counts.values()))
    return {"text": texts, "pii_redacted": pii}


def _filter_batch(batch: dict, args: DataArguments) -> dict:
    return {
        "reason": [text_quality.rejection_reason(t, args) or "" for t in batch["text"]],
        "words": [len(text_quality.words_of(t)) for t in batch["text"]],
    }


def _removal_summary(dataset, reasons: list[str], keep_examples: int) -> dict[str, Any]:
    counts = Counter(r for r in reasons if r)
    examples: dict[str, list[str]] = {reason: [] for reason in counts}
    for index, reason in enumerate(reasons):
        if reason and len(examples[reason]) < keep_examples:
            examples[reason].append(_example(dataset[index]["text"]))
    return {reason: {"removed": counts[reason], "examples": examples[reason]} for reason in sorted(counts)}


def _words(dataset) -> int:
    return int(np.sum(dataset.with_format("numpy")[:]["words"])) if len(dataset) else 0


def _minhash_batch(batch: dict, hasher: dedup.MinHasher) -> dict:
    return {"minhash": [hasher.signature(t) for t in batch["text"]]}


def _exact_hash_batch(batch: dict) -> dict:
    return {"exact_hash": [dedup.exact_hash(t) for t in batch["text"]]}


def _contaminated_batch(batch: dict, eval_hashes: np.ndarray, n: int) -> dict:
    return {"contaminated": [dedup.is_contaminated(t, eval_hashes, n) for t in batch["text"]]}


class _Texts:
    """Lazy `texts[i]` over a dataset, so verifying LSH candidates does not load the whole corpus."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, index: int) -> str:
        return self.dataset[index]["text"]


def prepare(args: DataArguments, num_proc: int, record) -> Report:
    """Run every step, write packed/, tokenizer/ and the report to output_dir; return the report."""
    report = Report()
    map_kwargs = {"num_proc": num_proc if num_proc > 1 else None, "batched": True, "batch_size": 256}
    with report.step("load", None) as step:
        corpus = load_corpus(args)
        step.update(documents_out=len(corpus), bytes_out=utf8_bytes(corpus))
    record.set_input("documents", len(corpus))
    corpus = _clean(corpus, args, report, map_kwargs)
    corpus = _filter(corpus, args, report, map_kwargs)
    if args.exact_dedup:
        corpus = _exact_dedup(corpus, args, report, map_kwargs)
    if args.decontamination_datasets:
        corpus = _decontaminate(corpus, args, report, map_kwargs)
    if args.near_dedup:
        corpus = _near_dedup(corpus, args, report, map_kwargs)
    documents = split_documents(corpus, args, report)
    tokenizer = make_tokenizer(documents, args, report)
    tokenize_and_pack_documents(documents, tokenizer, args, report, map_kwargs)
    report.write(args.output_dir)
    return report


def _clean(corpus, args: DataArguments, report: Report, map_kwargs: dict):
    """Unicode normalisation, whitespace, PII redaction (counted)."""
    with report.step("clean", corpus) as step:
        corpus = corpus.map(_clean_batch, fn_kwargs={"args": args}, desc="Cleaning", **map_kwargs)
        step.update(documents_out=len(corpus), pii_redacted=int(np.sum(corpus["pii_redacted"])))
        corpus = corpus.remove_columns("pii_redacted")
    return corpus


def _filter(corpus, args: DataArguments, report: Report, map_kwargs: dict):
    """The quality, repetition, language and blocklist filters; removed documents counted per reason, with examples."""
    with report.step("filter", corpus) as step:
        corpus = corpus.map(_filter_batch, fn_kwargs={"args": args}, desc="Filtering", **map_kwargs)
        reasons = corpus["reason"]
        removed = _removal_summary(corpus, reasons, args.report_examples)
        corpus = corpus.filter(lambda r: [not x for x in r], input_columns="reason", batched=True)
        corpus = corpus.remove_columns("reason")
        step.update(documents_out=len(corpus), words_out=_words(corpus))
        report.details["filters"] = removed
        _ensure_documents(corpus, "filter", {k: v["removed"] for k, v in removed.items()})
    return corpus


def _exact_dedup(corpus, args: DataArguments, report: Report, map_kwargs: dict):
    """Keep the first of documents with the same normalised text."""
    with report.step("exact_dedup", corpus) as step:
        hashes = corpus.map(_exact_hash_batch, desc="Hashing", **map_kwargs)["exact_hash"]
        _, first = np.unique(np.asarray(hashes, dtype=np.int64), return_index=True)
        corpus = corpus.select(np.sort(first))
        step.update(documents_out=len(corpus), words_out=_words(corpus))
    return corpus


def _decontaminate(corpus, args: DataArguments, report: Report, map_kwargs: dict):
    """Drop documents sharing an n-gram with the evaluation sets."""
    with report.step("decontaminate", corpus) as step:
        eval_records = [row for source in args.decontamination_datasets for row in load_source(source)]
        eval_hashes = dedup.eval_ngrams(eval_records, args.decontamination_ngram)
        flags = corpus.map(
            _contaminated_batch,
            fn_kwargs={"eval_hashes": eval_hashes, "n": args.decontamination_ngram},
            desc="Decontaminating",
            **map_kwargs,
        )["contaminated"]
        leaked = np.flatnonzero(flags)
        examples = [_example(corpus[int(i)]["text"]) for i in leaked[: args.report_examples]]
        corpus = corpus.select(np.flatnonzero(~np.asarray(flags, dtype=bool)))
        step.update(documents_out=len(corpus), words_out=_words(corpus))
        report.details["decontamination"] = {
            "eval_records": len(eval_records),
            "eval_ngrams": int(eval_hashes.size),
            "removed": int(leaked.size),
            "examples": examples,
        }
        _ensure_documents(corpus, "decontaminate", {"contaminated": int(leaked.size)})
    return corpus


def _near_dedup(corpus, args: DataArguments, report: Report, map_kwargs: dict):
    """MinHash + LSH clusters of near-duplicates, verified by Jaccard; keep one per cluster."""
    with report.step("near_dedup", corpus) as step:
        hasher = dedup.MinHasher(args.minhash_num_perm, args.minhash_ngram, args.seed)
        signed = corpus.map(_minhash_batch, fn_kwargs={"hasher": hasher}, desc="MinHash", **map_kwargs)
        signatures = np.asarray(signed.with_format("numpy")[:]["minhash"], dtype=np.uint32)
        clusters = dedup.near_duplicate_clusters(
            signatures,
            args.minhash_bands,
            args.minhash_rows,
            args.minhash_threshold,
            texts=_Texts(corpus),
            ngram=args.minhash_ngram,
        )
        duplicates = sorted(i for members in clusters for i in members[1:])
        keep = np.setdiff1d(np.arange(len(corpus)), np.asarray(duplicates, dtype=np.int64))
        report.details["near_duplicates"] = {
            "clusters": len(clusters),
            "removed": len(duplicates),
            "largest_cluster": max((len(c) for c in clusters), default=0),
            "examples": [
                [_example(corpus[i]["text"]) for i in members[:2]]
                for members in clusters[: args.report_examples]
            ],
        }
        corpus = corpus.select(keep)
        step.update(documents_out=len(corpus), words_out=_words(corpus), clusters=len(clusters))
    return corpus


def split_documents(corpus, args: DataArguments, report: Report):
    """Hold out validation documents."""
    import datasets

    with report.step("split", corpus) as step:
        size = args.validation_fraction
        size = int(size) if size >= 1 else max(1, round(size * len(corpus)))
        if len(corpus) < size + 1:
            raise DataError(
                f"only {len(corpus)} documents left: too few to hold out {size} for validation; lower "
                f"`validation_fraction` or add data"
            )
        split = corpus.train_test_split(test_size=size, seed=args.seed)
        documents = datasets.DatasetDict(train=split["train"], validation=split["test"])
        step.update(documents_out=len(corpus), train=len(documents["train"]), validation=size)
    return documents


def make_tokenizer(documents, args: DataArguments, report: Report):
    """The base model's tokenizer or one trained on the training documents, saved, with its compression on held-out text."""
    with report.step("tokenizer", documents["train"]) as step:
        tokenizer = build_tokenizer(args, documents["train"])
        tokenizer.save_pretrained(os.path.join(args.output_dir, TOKENIZER_DIR))
        sample = documents["validation"].select(range(min(len(documents["validation"]), _COMPRESSION_SAMPLE)))
        stats = compression(tokenizer, list(sample["text"]))
        stats["vocab_size"] = len(tokenizer)
        stats["trained"] = args.tokenizer_name_or_path is None
        step.update(documents_out=len(documents["train"]), **stats)
        report.details["tokenizer"] = stats
    return tokenizer


def tokenize_and_pack_documents(documents, tokenizer, args: DataArguments, report: Report, map_kwargs: dict):
    """Tokenize every document and pack each split into blocks; save them."""
    with report.step("tokenize_and_pack", documents["train"]) as step:
        packed, pack_stats = tokenize_and_pack(documents, tokenizer, args.block_size, map_kwargs)
        packed.save_to_disk(os.path.join(args.output_dir, PACKED_DIR))
        step.update(documents_out=len(documents["train"]) + len(documents["validation"]), **pack_stats)
        report.details["packed"] = pack_stats
