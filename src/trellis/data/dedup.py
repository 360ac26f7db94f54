"""Exact and near-duplicate detection (MinHash + LSH, vectorised with numpy) and decontamination.

Hashes are xxh64 (deterministic across processes, unlike Python's `hash`), so signatures computed
by `datasets.map(num_proc=...)` workers agree and can be cached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

_TOKEN = re.compile(r"\w+")
# Odd 64-bit multiplier combining consecutive word hashes into one n-gram hash.
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def normalized_words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation: what shingles and n-grams are built from."""
    return _TOKEN.findall(text.lower())


def exact_hash(text: str) -> int:
    """Hash of the text up to case, punctuation and whitespace."""
    return xxhash.xxh64_intdigest(" ".join(normalized_words(text)).encode()) >> 1  # fits an int64 column


def ngram_hashes(words: Sequence[str], n: int) -> np.ndarray:
    """uint64 hashes of every word n-gram (one hash of the whole text when it has fewer words)."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    word_hashes = np.fromiter(
        (xxhash.xxh64_intdigest(w.encode()) for w in words), dtype=np.uint64, count=len(words)
    )
    if len(words) < n:
        n = len(words)
    count = len(words) - n + 1
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is intended
        for offset in range(n):
            hashes = hashes * _NGRAM_MULTIPLIER + word_hashes[offset : offset + count]
    return hashes


@dataclass
class MinHasher:
    """MinHash signatures from `num_perm` multiply-add-shift hash functions of the shingle hashes:
    h(x) = ((a*x + b) mod 2**64) >> 32 with random odd a (Dietzfelbinger's universal family)."""

    num_perm: int = 128
    ngram: int = 5
    seed: int = 0
    a: np.ndarray = field(init=False, repr=False)
    b: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        top = np.iinfo(np.uint64).max
        self.a = rng.integers(0, top, size=self.num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self.b = rng.integers(0, top, size=self.num_perm, dtype=np.uint64, endpoint=True)

    def signature(self, text: str) -> np.ndarray:
        shingles = np.unique(ngram_hashes(normalized_words(text), self.ngram))
        if shingles.size == 0:
            return np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is intended
            hashed = (self.a[:, None] * shingles[None, :] + self.b[:, None]) >> np.uint64(32)
        return hashed.min(axis=1).astype(np.uint32)


def jaccard(a: str, b: str, ngram: int) -> float:
    """Exact Jaccard similarity of two documents' word n-gram shingle sets."""
    first = set(ngram_hashes(normalized_words(a), ngram).tolist())
    second = set(ngram_hashes(normalized_words(b), ngram).tolist())
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        x, y = self.find(x), self.find(y)
        if x != y:  # the lower index (the first document seen) stays the root
            self.parent[max(x, y)] = min(x, y)


def near_duplicate_clusters(
    signatures: np.ndarray,
    bands: int,
    rows: int,
    threshold: float,
    texts: Sequence[str] | None = None,
    ngram: int = 5,
) -> list[list[int]]:
    """Clusters (lists of row indices, first kept) of near-duplicate documents.

    LSH: documents whose signatures agree on all `rows` of any band share a bucket and become
    candidates. Each candidate pair is verified: with `texts`, by the exact shingle Jaccard;
    without, by the share of agreeing signature values. Verified pairs are joined transitively.
    """
    count = len(signatures)
    union = _UnionFind(count)
    with np.errstate(over="ignore"):
        for band in range(bands):
            block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
            keys = np.zeros(count, dtype=np.uint64)
            for column in range(rows):
                keys = keys * _NGRAM_MULTIPLIER + block[:, column] + np.uint64(1)
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1
            if same.size == 0:
                continue
            # Each member of a bucket is compared with the bucket's first (lowest-index) member.
            starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
            first_of_bucket = order[starts[np.searchsorted(starts, same, side="right") - 1]]
            for head, member in zip(first_of_bucket.tolist(), order[same].tolist(), strict=True):
                if union.find(head) == union.find(member):
                    continue
                if texts is not None:
                    similar = jaccard(texts[head], texts[member], ngram) >= threshold
                else:
                    similar = float(np.mean(signatures[head] == signatures[member])) >= threshold
                if similar:
                    union.union(head, member)
    clusters: dict[int, list[int]] = {}
    for index in range(count):
        clusters.setdefault(union.find(index), []).append(index)
    return [members for members in clusters.values() if len(members) > 1]


# --- decontamination -----------------------------------------------------------------------------


def strings_in(record) -> Iterable[str]:
    """Every string in a record (nested lists and mappings too: messages, choices, answers)."""
    if isinstance(record, str):
        yield record
    elif isinstance(record, dict):
        for value in record.values():
            yield from strings_in(value)
    elif isinstance(record, (list, tuple)):
        for value in record:
            yield from strings_in(value)


def eval_ngrams(records: Iterable[dict], n: int) -> np.ndarray:
    """Sorted unique hashes of the word n-grams of every string field of the evaluation records.

    Each field is taken separately (no n-gram spans two fields); a field shorter than n words
    cannot be told from ordinary text by an n-gram match and contributes none.
    """
    hashes = [
        ngram_hashes(words, n)
        for record in records
        for text in strings_in(record)
        if len(words := normalized_words(text)) >= n
    ]
    return np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, dtype=np.uint64)


def is_contaminated(text: str, eval_hashes: np.ndarray, n: int) -> bool:
    words = normalized_words(text)
    if len(words) < n or eval_hashes.size == 0:
        return False
    return bool(np.isin(ngram_hashes(words, n), eval_hashes, assume_unique=False).any())
