"""What a recipe says about data: the sources of a training mixture (every stage), and the data stage's recipe
(sources, cleaning, filters, deduplication, decontamination, tokenizer, packing)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trellis.core.recipe import Problem

DATASET_FORMATS = (
    "auto",
    "messages",
    "alpaca",
    "sharegpt",
    "hh",
    "prompt_completion",
    "text",
    "preference",
    "unpaired",
    "prompt",
)


@dataclass
class DatasetSource:
    """One source of a dataset mixture: a Hub dataset, a local directory or local files."""

    path: str = field(
        metadata={
            "help": "Hub dataset id, a local dataset directory, or local file(s) (json, jsonl, parquet, "
            "csv, txt; compressed too; globs allowed)."
        }
    )
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Split to read (ignored for local files)."})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    weight: float = field(
        default=1.0,
        metadata={"help": "Share of this source to use: 0.5 takes a seeded half, 2.0 repeats it twice."},
    )
    format: str = field(
        default="auto",
        metadata={
            "help": "Record format, converted to what the stage trains on: `messages` (SFT), "
            "prompt/chosen/rejected (reward, DPO, ORPO), prompt/completion/label (KTO; pairs are "
            "unpaired) or `prompt` (PPO, GRPO, RLOO).",
            "choices": list(DATASET_FORMATS),
        },
    )
    text_field: str | None = field(
        default=None,
        metadata={"help": "Data stage: the column holding the raw text (default: `text`)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Data stage: stream a Hub dataset instead of downloading it whole; only the text "
            "column is kept (with `max_documents`, only that many records are read)."
        },
    )
    max_documents: int | None = field(
        default=None, metadata={"help": "Data stage: read at most this many records of the source."}
    )


@dataclass
class ScriptArguments:
    """Data for a stage: a weighted mixture of sources, and held-out evaluation data."""

    nested_items: ClassVar[dict[str, type]] = {"datasets": DatasetSource, "eval_datasets": DatasetSource}

    datasets: list[dict] = field(
        default_factory=list,
        metadata={"help": "Training sources, each a mapping with the keys of DatasetSource."},
    )
    eval_datasets: list[dict] = field(
        default_factory=list,
        metadata={"help": "Held-out evaluation sources (same keys as `datasets`)."},
    )
    test_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Without eval_datasets: hold out this fraction (or count) of the training mixture."
        },
    )
    eval_before_training: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the untrained model first, so the run record shows what training changed."
        },
    )
    max_bad_record_fraction: float = field(
        default=0.01,
        metadata={
            "help": "Records a converter cannot use (broken JSON or UTF-8, missing fields or roles, empty "
            "turns, pairs that differ before the last turn, too long for max_length) are dropped, counted "
            "per reason and reported in trellis_run.json; the stage stops before training when more than "
            "this share of a source (or of what the trainer is given) is dropped."
        },
    )

    def __post_init__(self) -> None:
        self.datasets = [as_source(item) for item in self.datasets]
        self.eval_datasets = [as_source(item) for item in self.eval_datasets]


def as_source(item: dict | DatasetSource) -> DatasetSource:
    return item if isinstance(item, DatasetSource) else DatasetSource(**item)


UNICODE_FORMS = ("NFC", "NFKC", "none")
EXECUTOR_KINDS = ("local", "slurm", "ray")
ENGINES = ("datatrove", "datasets")


@dataclass
class ExecutorSpec:
    """Where the datatrove steps run: `local` (processes here), `slurm` (sbatch job arrays) or `ray`."""

    kind: str = "local"
    tasks: int = 1  # parallel tasks of each per-document step (input files are shared out among them)
    workers: int | None = None  # local: processes at once (default: the recipe's num_proc, else all cores)
    partition: str | None = None  # slurm
    time: str = "24:00:00"  # slurm: time limit of a job
    cpus_per_task: int = 1  # slurm and ray
    mem_per_cpu_gb: int = 2  # slurm
    job_name: str = "trellis_data"  # slurm: each step's job is <job_name>_<step>
    sbatch_args: dict = field(default_factory=dict)  # slurm: extra #SBATCH options, e.g. {account: x}
    venv_path: str | None = None  # slurm: virtual environment the jobs activate
    address: str | None = None  # ray: cluster address (null: start a local one)

    _KIND_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "local": ("workers",),
        "slurm": (
            "partition",
            "time",
            "cpus_per_task",
            "mem_per_cpu_gb",
            "job_name",
            "sbatch_args",
            "venv_path",
        ),
        "ray": ("address", "cpus_per_task"),
    }


def executor_problems(value: dict) -> tuple[ExecutorSpec | None, list[Problem]]:
    """The `executor` section checked key by key (kind, then the keys that kind takes)."""
    if not isinstance(value, dict):
        return None, [
            Problem("executor", f"expected a mapping such as {{kind: local, tasks: 4}}, got {value!r}")
        ]
    kind = value.get("kind", "local")
    if kind not in EXECUTOR_KINDS:
        return None, [Problem("executor.kind", f"expected one of {list(EXECUTOR_KINDS)}, got {kind!r}")]
    allowed = ("kind", "tasks", *ExecutorSpec._KIND_KEYS[kind])
    problems = [
        Problem(f"executor.{key}", f"not a key of the {kind} executor; it takes {sorted(allowed)}")
        for key in value
        if key not in allowed
    ]
    for key in ("tasks", "workers", "cpus_per_task", "mem_per_cpu_gb"):
        if key in value and value[key] is not None and (not isinstance(value[key], int) or value[key] < 1):
            problems.append(Problem(f"executor.{key}", f"expected a whole number >= 1, got {value[key]!r}"))
    if kind == "slurm" and not value.get("partition"):
        problems.append(
            Problem("executor.partition", "required for the slurm executor: the partition to run on")
        )
    if "sbatch_args" in value and not isinstance(value["sbatch_args"], dict):
        problems.append(Problem("executor.sbatch_args", f"expected a mapping, got {value['sbatch_args']!r}"))
    if problems:
        return None, problems
    return ExecutorSpec(**value), []


def _help(text: str, **extra: Any) -> dict:
    return {"help": text, **extra}


@dataclass
class DataArguments:
    """The data stage: sources, cleaning, filters (each off with `false`/null), dedup, decontamination,
    tokenizer, packing. Every threshold is a key of the recipe."""

    nested_items: ClassVar[dict[str, type]] = {
        "datasets": DatasetSource,
        "decontamination_datasets": DatasetSource,
    }

    output_dir: str = field(metadata=_help("Where the packed dataset, tokenizer and report are written."))
    datasets: list[dict] = field(
        default_factory=list,
        metadata=_help("Raw text sources (keys of DatasetSource; `text_field` names the text column)."),
    )
    decontamination_datasets: list[dict] = field(
        default_factory=list,
        metadata=_help("Evaluation sets: training documents sharing a long n-gram with them are dropped."),
    )
    seed: int = field(
        default=0, metadata=_help("Seed for mixture weights, shuffling and the held-out split.")
    )
    num_proc: int | None = field(
        default=None, metadata=_help("Worker processes (default: all CPU cores); executor.workers wins.")
    )
    engine: str = field(
        default="datatrove",
        metadata=_help(
            "`datatrove`: datatrove blocks on `executor`; `datasets`: the previous datasets.map "
            "implementation, kept for comparison (scripts/benchmark_data.py).",
            choices=list(ENGINES),
        ),
    )
    executor: dict = field(
        default_factory=dict,
        metadata=_help(
            "Where the datatrove steps run: {kind: local, tasks, workers}, {kind: slurm, tasks, partition, "
            "time, cpus_per_task, mem_per_cpu_gb, job_name, sbatch_args, venv_path} or {kind: ray, tasks, "
            "address, cpus_per_task}. Reruns skip completed tasks."
        ),
    )
    # cleaning (transforms)
    unicode_normalization: str = field(
        default="NFC", metadata=_help("Unicode normal form.", choices=list(UNICODE_FORMS))
    )
    fix_encoding: bool = field(default=True, metadata=_help("Repair UTF-8 text decoded as cp1252/latin-1."))
    normalize_whitespace: bool = field(
        default=True, metadata=_help("Collapse runs of spaces and blank lines.")
    )
    remove_boilerplate_lines: bool = field(
        default=False, metadata=_help("Drop lines matching `boilerplate_patterns`.")
    )
    boilerplate_patterns: list[str] = field(
        default_factory=lambda: [
            r"\bcookie(s| policy)\b",
            r"\ball rights reserved\b",
            r"\b(privacy policy|terms of (use|service))\b",
            r"\bclick here\b",
            r"\b(subscribe|sign up) (to|for) (our|the) newsletter\b",
            r"\benable javascript\b",
        ],
        metadata=_help("Regular expressions (Python, case-insensitive) of boilerplate lines."),
    )
    redact_pii: bool = field(
        default=True, metadata=_help("Replace emails, phone numbers and IP addresses with placeholders.")
    )
    # length filters
    min_chars: int | None = field(default=50, metadata=_help("Drop shorter documents (null: off)."))
    max_chars: int | None = field(default=None, metadata=_help("Drop longer documents (null: off)."))
    min_words: int | None = field(default=None, metadata=_help("Drop documents with fewer words."))
    max_words: int | None = field(default=None, metadata=_help("Drop documents with more words."))
    # Gopher quality rules (Rae et al. 2021); each threshold null turns that rule off
    gopher_quality: bool = field(default=True, metadata=_help("Apply the Gopher quality rules below."))
    max_symbol_word_ratio: float | None = field(default=0.1, metadata=_help("'#' and '...' per word."))
    min_mean_word_length: float | None = field(default=3.0, metadata=_help("Mean word length, lower bound."))
    max_mean_word_length: float | None = field(default=10.0, metadata=_help("Mean word length, upper bound."))
    min_alpha_word_fraction: float | None = field(
        default=0.8, metadata=_help("Fraction of words with a letter.")
    )
    max_bullet_line_fraction: float | None = field(
        default=0.9, metadata=_help("Lines starting with a bullet.")
    )
    max_ellipsis_line_fraction: float | None = field(default=0.3, metadata=_help("Lines ending in '...'."))
    min_punctuation_line_fraction: float | None = field(
        default=None, metadata=_help("Lines ending in . ! ? or a closing quote (C4-style; null: off).")
    )
    min_stop_words: int | None = field(
        default=2, metadata=_help("English stop words (the, be, to, of, and, that, have, with) needed.")
    )
    # repetition (Gopher)
    repetition_filter: bool = field(default=True, metadata=_help("Apply the repetition rules below."))
    max_duplicate_line_fraction: float | None = field(default=0.3, metadata=_help("Repeated lines."))
    max_duplicate_paragraph_fraction: float | None = field(
        default=0.3, metadata=_help("Repeated paragraphs.")
    )
    max_top_ngram_fraction: dict = field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        metadata=_help("n -> max share of characters in the most frequent word n-gram."),
    )
    max_duplicate_ngram_fraction: dict = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        metadata=_help("n -> max share of characters in word n-grams that occur more than once."),
    )
    c4_quality: bool = field(default=False, metadata=_help("datatrove's C4 quality filter (its defaults)."))
    fineweb_quality: bool = field(
        default=False, metadata=_help("datatrove's FineWeb quality filter (its defaults).")
    )
    # model-based quality scoring (datatrove engine)
    quality_model: str | None = field(
        default=None,
        metadata=_help(
            "A Hugging Face sequence-classification model with one output (Hub id or local directory), "
            "e.g. HuggingFaceFW/fineweb-edu-classifier (scores ~0-5): every document that passes the rules "
            "is scored, and those under quality_threshold are removed (null: off; needs engine: datatrove)."
        ),
    )
    quality_model_revision: str | None = field(default=None, metadata=_help("Hub revision of quality_model."))
    quality_threshold: float = field(
        default=3.0,
        metadata=_help(
            "Documents scoring below this are removed (3: the FineWeb-Edu classifier card's cut)."
        ),
    )
    quality_batch_size: int = field(default=32, metadata=_help("Documents scored at once."))
    quality_max_length: int = field(
        default=512,
        metadata=_help(
            "Tokens of a document the model reads (the rest is truncated; at most the model's own limit)."
        ),
    )
    quality_trust_remote_code: bool = field(
        default=False,
        metadata=_help("Run quality_model's own code from the Hub (off: transformers' classes)."),
    )
    # harmful content
    blocklist_filter: bool = field(default=True, metadata=_help("Drop documents with blocklisted words."))
    blocklist_file: str | None = field(
        default=None, metadata=_help("One word or phrase per line (default: Trellis's shipped list).")
    )
    max_blocklist_hits: int = field(default=0, metadata=_help("Blocklist matches a document may have."))
    # deduplication
    exact_dedup: bool = field(default=True, metadata=_help("Drop documents whose normalised text repeats."))
    near_dedup: bool = field(default=True, metadata=_help("MinHash + LSH near-duplicate removal."))
    minhash_ngram: int = field(default=5, metadata=_help("Word n-gram size of the shingles."))
    minhash_num_perm: int = field(default=128, metadata=_help("Hash functions in a signature."))
    minhash_bands: int = field(default=32, metadata=_help("LSH bands (bands x rows = num_perm)."))
    minhash_rows: int = field(default=4, metadata=_help("Signature rows per LSH band."))
    minhash_threshold: float = field(
        default=0.7, metadata=_help("Shingle Jaccard similarity at which two documents are duplicates.")
    )
    # decontamination
    decontamination_ngram: int = field(default=13, metadata=_help("Word n-gram length of a leak."))
    # tokenizer
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata=_help("Use this tokenizer (Hub id or local dir); unset: train a BPE tokenizer."),
    )
    tokenizer_vocab_size: int = field(
        default=32000, metadata=_help("Vocabulary size of a trained tokenizer.")
    )
    tokenizer_special_tokens: list[str] = field(
        default_factory=list, metadata=_help("Extra special tokens of a trained tokenizer.")
    )
    tokenizer_train_documents: int | None = field(
        default=None, metadata=_help("Train the tokenizer on at most this many documents.")
    )
    # packing
    block_size: int = field(default=2048, metadata=_help("Tokens per packed block."))
    validation_fraction: float = field(
        default=0.01, metadata=_help("Documents held out for validation: a fraction, or a count if >= 1.")
    )
    report_examples: int = field(default=3, metadata=_help("Removed documents shown per filter."))

    def __post_init__(self) -> None:
        self.datasets = [as_source(item) for item in self.datasets]
        self.decontamination_datasets = [as_source(item) for item in self.decontamination_datasets]
        if isinstance(self.executor, dict):
            spec, _ = executor_problems(self.executor)
            self.executor_spec = spec or ExecutorSpec()
            if spec is not None and spec.workers is None and spec.kind == "local":
                spec.workers = self.num_proc

    def recipe_problems(self) -> list[Problem]:
        """Checks across the data recipe's keys (trellis.core.recipe checks that local paths exist)."""
        problems = list(executor_problems(self.executor)[1]) if isinstance(self.executor, dict) else []
        if not self.datasets:
            problems.append(
                Problem(
                    "datasets",
                    "required: list the raw text, e.g.\n      datasets:\n        - path: corpus/*.jsonl",
                )
            )
        if self.quality_model and self.engine != "datatrove":
            problems.append(
                Problem(
                    "quality_model",
                    f"model scoring runs on the datatrove engine only, and this recipe sets engine: "
                    f"{self.engine}; remove `engine` (datatrove is the default) or `quality_model`",
                )
            )
        if self.minhash_bands * self.minhash_rows != self.minhash_num_perm:
            problems.append(
                Problem(
                    "minhash_bands",
                    "minhash_bands x minhash_rows must equal minhash_num_perm: "
                    f"{self.minhash_bands} x {self.minhash_rows} != {self.minhash_num_perm}",
                )
            )
        if not 0 < self.minhash_threshold <= 1:
            problems.append(Problem("minhash_threshold", f"must be in (0, 1], got {self.minhash_threshold}"))
        if self.block_size < 2:
            problems.append(Problem("block_size", f"must be at least 2, got {self.block_size}"))
        if self.validation_fraction <= 0:
            problems.append(
                Problem("validation_fraction", "must be > 0: the pretraining stage needs held-out data")
            )
        for index, pattern in enumerate(self.boilerplate_patterns):
            try:
                re.compile(pattern)
            except re.error as error:
                problems.append(
                    Problem(f"boilerplate_patterns[{index}]", f"not a valid regular expression: {error}")
                )
        for key in ("max_top_ngram_fraction", "max_duplicate_ngram_fraction"):
            table = getattr(self, key)
            if not all(
                isinstance(n, int) and n > 0 and isinstance(v, (int, float)) for n, v in table.items()
            ):
                problems.append(Problem(key, f"expected a mapping of n-gram size to fraction, got {table!r}"))
        return problems
