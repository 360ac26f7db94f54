"""The datatrove blocks Trellis adds where datatrove has no such step: cleaning, counted PII, the recipe's
length and blocklist rules, scoring with a Hugging Face classifier, rank-keeping readers, MinHash pairs
verified by exact Jaccard, the decontamination index, each task's peak memory; and the datatrove configs
made from a data recipe."""

from __future__ import annotations

import glob
import json
import logging
import os
import struct

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.decont import NGramsDecontConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import TextNormConfig, ngrams, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from trellis.core.memory import reset_peak_rss, rss_kib
from trellis.core.recipe import local_path_problem
from trellis.data import dedup, text_quality
from trellis.data.arguments import DataArguments
from trellis.data.sources import DataError, load_source

logger = logging.getLogger("trellis")


WORK_DIR = "datatrove"


_PII_PLACEHOLDERS = tuple(text_quality.PII_PLACEHOLDERS.values())


# Numbers stay: the tiny corpus is sums ("4 + 5 = 9"), and a leak or a duplicate is about the numbers too.
_NORM = TextNormConfig(norm_numbers=False, norm_unicode_diacritics=False)


EXAMPLE_CHARS = 300


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
        self.args = with_changes(args, redact_pii=False)  # PII is the next block's

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


QUALITY_SCORE = "quality_score"  # the metadata key of a document's score


class QualityFilter(BaseFilter):
    """Scores documents with a Hugging Face sequence-classification model (one output: its logit is the
    score, as with the FineWeb-Edu classifier), in batches, keeps the score in the document's metadata
    and removes documents under the threshold. datatrove's classifier filter is fastText only. The model
    is loaded once per worker process, on its first batch."""

    name = "quality model"

    def __init__(self, args: DataArguments, threads: int, exclusion_writer=None) -> None:
        super().__init__(exclusion_writer, batch_size=args.quality_batch_size)
        self.model_name, self.revision = args.quality_model, args.quality_model_revision
        self.trust_remote_code = args.quality_trust_remote_code
        self.threshold, self.max_length = args.quality_threshold, args.quality_max_length
        self.threads = threads
        self._loaded = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        import torch

        if self._loaded is None:
            torch.set_num_threads(self.threads)  # the worker's share of the cores
            self._loaded = load_quality_model(self.model_name, self.revision, self.trust_remote_code)
        tokenizer, model = self._loaded
        inputs = tokenizer(
            [doc.text for doc in batch],
            truncation=True,
            max_length=min(self.max_length, tokenizer.model_max_length),  # past it, positions run out
            padding=True,
            return_tensors="pt",
        ).to(model.device)
        with torch.no_grad():
            scores = model(**inputs).logits[:, 0].float().tolist()
        results: list[bool | tuple[bool, str]] = []
        for doc, score in zip(batch, scores, strict=True):
            doc.metadata[QUALITY_SCORE] = score
            results.append(True if score >= self.threshold else (False, f"score_below_{self.threshold:g}"))
        return results


def quality_model_config(name: str, revision: str | None, trust_remote_code: bool):
    """The model's config, checked to be a sequence classifier with one output; a DataError (naming
    `quality_model` and the fix) otherwise. Reads config.json only: the check comes before heavy work."""
    from transformers import AutoConfig

    if message := local_path_problem(name, "model directory"):
        raise DataError(f"quality_model: {message}")
    name = _model_source(name)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise DataError(f"quality_model: cannot load {name!r}: {error}") from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise DataError(
            f"quality_model: {name!r} is not a sequence-classification model (its config names "
            f"{architectures or 'no architecture'}): a model without its classification head would score "
            "at random. Use a classifier such as HuggingFaceFW/fineweb-edu-classifier, or save yours "
            "with AutoModelForSequenceClassification(num_labels=1).save_pretrained"
        )
    if config.num_labels != 1:
        raise DataError(
            f"quality_model: {name!r} has {config.num_labels} outputs; the score is a regression head's one "
            "output (num_labels=1, like HuggingFaceFW/fineweb-edu-classifier)"
        )
    if os.path.isdir(name) and not glob.glob(os.path.join(name, "*.safetensors")):
        raise DataError(
            f"quality_model: {name!r} has no .safetensors weights (Trellis loads no pickled weights): save "
            "the model again with save_pretrained"
        )
    return config


def _model_source(name: str) -> str:
    """A local directory with `~` expanded (transformers would take `~/x` for a Hub id), else the Hub id."""
    return os.path.expanduser(name) if os.path.isdir(os.path.expanduser(name)) else name


def load_quality_model(name: str, revision: str | None, trust_remote_code: bool):
    """(tokenizer, model) for scoring: checked, safetensors only, in eval mode, on the GPU if any."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = quality_model_config(name, revision, trust_remote_code)
    name = _model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # decoder classifiers (Llama) come without one; batches need it
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        name, config=config, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if model.config.pad_token_id is None:  # it finds each document's last token by the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


class PeakMemory(PipelineStep):
    """Passes the documents on; when its task is done, records the task process's peak resident memory
    since the task began (`peak_rss_mb`), wherever the task ran: the report shows each run's largest."""

    type = "📏 - MEMORY"
    name = "peak memory"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        # Lazily called when the executor starts pulling documents: before any block upstream has run.
        reset_peak_rss()
        if data:
            yield from data
        if (peak := rss_kib("VmHWM")) is not None:
            self.stat_update(PEAK_RSS, value=round(peak / 1024), unit="task")


PEAK_RSS = "peak_rss_mb"


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


def exact_key(doc: Document) -> str:
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
        texts = DocumentTexts(self.documents)
        os.makedirs(self.verified, exist_ok=True)
        similar: dict[tuple, bool] = {}  # a pair found by several bands is compared once
        for name in sorted(glob.glob(os.path.join(self.candidates, "*.dups"))):
            with open(os.path.join(self.verified, os.path.basename(name)), "wb") as out:
                for a, b in read_pairs(name):
                    if (a, b) not in similar:
                        similar[a, b] = dedup.jaccard(texts[a], texts[b], self.ngram) >= self.threshold
                    self.stat_update("candidates")
                    if similar[a, b]:
                        self.stat_update("verified")
                        out.write(struct.pack("<4I", *a, *b))


def read_pairs(path: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    values = np.fromfile(path, dtype="<u4").reshape(-1, 4)
    return [((int(f1), int(d1)), (int(f2), int(d2))) for f1, d1, f2, d2 in values]


class DocumentTexts:
    """The text of document (task, index) of a folder's per-task files, read from disk when asked: each
    file's line offsets (8 bytes a document) and the last few thousand texts stay in memory, so the
    memory does not grow with the corpus's text."""

    def __init__(self, folder: str, cached: int = 4096) -> None:
        import functools

        self.folder = folder
        self._offsets: dict[int, np.ndarray] = {}
        self._read = functools.lru_cache(maxsize=cached)(self._read_text)

    def __getitem__(self, key: tuple[int, int]) -> str:
        return self._read(*key)

    def _path(self, task: int) -> str:
        return os.path.join(self.folder, f"{task:05d}.jsonl")

    def _read_text(self, task: int, index: int) -> str:
        if task not in self._offsets:
            with open(self._path(task), "rb") as handle:
                lengths = [len(line) for line in handle]
            self._offsets[task] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        with open(self._path(task), "rb") as handle:
            handle.seek(int(self._offsets[task][index]))
            return json.loads(handle.readline())["text"]


def read_records(path: str):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)


def with_changes(args: DataArguments, **changes) -> DataArguments:
    import dataclasses

    return dataclasses.replace(args, **changes)


def write_decontamination_index(args: DataArguments, folder: str) -> int:
    """The n-gram hashes of every string of the evaluation records, in the format datatrove's
    NGramsDecontFilter loads (its indexer reads lighteval tasks only). Returns how many records."""
    config = decont_config(args)
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


def decont_config(args: DataArguments) -> NGramsDecontConfig:
    return NGramsDecontConfig(
        n_grams=args.decontamination_ngram,
        find_query_ngrams=True,
        find_overlap_ngrams=False,
        norm_config=_NORM,
    )


def minhash_config(args: DataArguments) -> MinhashConfig:
    return MinhashConfig(
        n_grams=args.minhash_ngram,
        num_buckets=args.minhash_bands,
        hashes_per_bucket=args.minhash_rows,
        seed=args.seed,
        norm_config=_NORM,
        hash_config=HashConfig(precision=64),
    )
