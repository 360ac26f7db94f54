"""Cleaning and quality filtering of raw text documents, one document at a time.

`clean_text` is a transform (normalisation, encoding repair, boilerplate lines, PII redaction);
`rejection_reason` applies the filters in order and names the first one a document fails, or
returns None to keep it. Both are pure functions of the text and the recipe, so they run under
`datasets.map(num_proc=...)` and their results are cached by the recipe's fingerprint.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

from trellis.data.arguments import DataArguments

DEFAULT_BLOCKLIST = Path(__file__).with_name("resources") / "blocklist.txt"
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("-", "*", "•", "‣", "▪", "●", "◦", "–")
ELLIPSES = ("...", "…")
LINE_END_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’")

# --- cleaning ----------------------------------------------------------------------------------------

# Characters that UTF-8 text shows when it was decoded as cp1252 or latin-1 ("cafÃ©", "donâ€™t").
_MOJIBAKE = re.compile("[ÃÂâ][\u0080-\u00bf\u2018-\u203a\u0152-\u0192\u02c6\u02dc\u20ac\u2122]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Phone numbers: an optional +country code, then 9-12 digits in groups separated by spaces, dots,
# dashes or a parenthesised area code. Dates (2024-01-02) and plain numbers are not matched.
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w-])"
)
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
PII_PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>"}


def fix_encoding(text: str) -> str:
    """Repair mojibake: UTF-8 bytes that were decoded as cp1252 (or latin-1) somewhere upstream."""
    if not _MOJIBAKE.search(text):
        return text
    for codec in ("cp1252", "latin-1"):
        try:
            repaired = text.encode(codec).decode("utf-8")
        except UnicodeError:
            continue
        if len(_MOJIBAKE.findall(repaired)) < len(_MOJIBAKE.findall(text)):
            return repaired
    return text


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def redact_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace emails, phone numbers and IP addresses with placeholders; count what was replaced."""
    counts = {}
    for kind, patterns in (("email", (EMAIL,)), ("ip", (IPV4, IPV6)), ("phone", (PHONE,))):
        total = 0
        for pattern in patterns:
            text, found = pattern.subn(PII_PLACEHOLDERS[kind], text)
            total += found
        counts[kind] = total
    return text, counts


@lru_cache(maxsize=8)
def _boilerplate(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


def clean_text(text: str, args: DataArguments) -> tuple[str, dict[str, int]]:
    """The cleaned text and how many PII items were redacted."""
    text = _CONTROL.sub("", text)
    if args.fix_encoding:
        text = fix_encoding(text)
    if args.unicode_normalization != "none":
        text = unicodedata.normalize(args.unicode_normalization, text)
    if args.remove_boilerplate_lines and (pattern := _boilerplate(tuple(args.boilerplate_patterns))):
        text = "\n".join(line for line in text.split("\n") if not pattern.search(line))
    if args.normalize_whitespace:
        text = normalize_whitespace(text)
    counts = {kind: 0 for kind in PII_PLACEHOLDERS}
    if args.redact_pii:
        text, counts = redact_pii(text)
    return text, counts


# --- filters -----------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def length_reason(text: str, words: list[str], args: DataArguments) -> str | None:
    if args.min_chars is not None and len(text) < args.min_chars:
        return "length: too few characters"
    if args.max_chars is not None and len(text) > args.max_chars:
        return "length: too many characters"
    if args.min_words is not None and len(words) < args.min_words:
        return "length: too few words"
    if args.max_words is not None and len(words) > args.max_words:
        return "length: too many words"
    return None


def gopher_quality_reason(text: str, words: list[str], args: DataArguments) -> str | None:
    """The Gopher quality rules (Rae et al. 2021, appendix A), each off when its threshold is null."""
    if not words:
        return "gopher: no words"
    if args.max_symbol_word_ratio is not None:
        symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
        if symbols / len(words) > args.max_symbol_word_ratio:
            return "gopher: symbol-to-word ratio"
    mean_length = sum(len(w) for w in words) / len(words)
    if args.min_mean_word_length is not None and mean_length < args.min_mean_word_length:
        return "gopher: mean word length too short"
    if args.max_mean_word_length is not None and mean_length > args.max_mean_word_length:
        return "gopher: mean word length too long"
    if args.min_alpha_word_fraction is not None:
        alpha = sum(1 for w in words if _ALPHA.search(w))
        if alpha / len(words) < args.min_alpha_word_fraction:
            return "gopher: too few alphabetic words"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if lines and args.max_bullet_line_fraction is not None:
        bullets = sum(1 for line in lines if line.startswith(BULLETS))
        if bullets / len(lines) > args.max_bullet_line_fraction:
            return "gopher: bullet lines"
    if lines and args.max_ellipsis_line_fraction is not None:
        ellipses = sum(1 for line in lines if line.endswith(ELLIPSES))
        if ellipses / len(lines) > args.max_ellipsis_line_fraction:
            return "gopher: ellipsis lines"
    if lines and args.min_punctuation_line_fraction is not None:
        ended = sum(1 for line in lines if line.endswith(LINE_END_PUNCTUATION))
        if ended / len(lines) < args.min_punctuation_line_fraction:
            return "gopher: lines not ending in punctuation"
    if args.min_stop_words is not None:
        stop_words = sum(1 for w in words if w.lower().strip(".,;:!?\"'()") in STOP_WORDS)
        if stop_words < args.min_stop_words:
            return "gopher: too few stop words"
    return None


def _duplicate_fraction(parts: list[str]) -> tuple[float, float]:
    """Share of parts, and of their characters, that repeat an earlier part."""
    seen, duplicates, duplicate_chars = set(), 0, 0
    for part in parts:
        if part in seen:
            duplicates += 1
            duplicate_chars += len(part)
        seen.add(part)
    total_chars = sum(len(p) for p in parts) or 1
    return duplicates / max(len(parts), 1), duplicate_chars / total_chars


def repetition_reason(text: str, words: list[str], args: DataArguments) -> str | None:
    """Gopher repetition rules: repeated lines/paragraphs, dominant and duplicated word n-grams."""
    lines = [line for line in text.split("\n") if line.strip()]
    if args.max_duplicate_line_fraction is not None and len(lines) > 1:
        by_count, by_chars = _duplicate_fraction(lines)
        if max(by_count, by_chars) > args.max_duplicate_line_fraction:
            return "repetition: duplicate lines"
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if args.max_duplicate_paragraph_fraction is not None and len(paragraphs) > 1:
        by_count, by_chars = _duplicate_fraction(paragraphs)
        if max(by_count, by_chars) > args.max_duplicate_paragraph_fraction:
            return "repetition: duplicate paragraphs"
    if not words:
        return None
    # Word n-grams as integers (word ids combined by a rolling hash), so counting is numpy work.
    ids: dict[str, int] = {}
    word_ids = np.fromiter((ids.setdefault(w, len(ids)) for w in words), dtype=np.uint64, count=len(words))
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    total_chars = int(lengths.sum()) or 1
    for n, limit in sorted(args.max_top_ngram_fraction.items()):
        if len(words) < n:
            continue
        grams = _ngram_ids(word_ids, n)
        values, first, counts = np.unique(grams, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        top_chars = int(lengths[first[top] : first[top] + n].sum())
        if counts[top] > 1 and counts[top] * top_chars / total_chars > limit:
            return f"repetition: top {n}-gram"
    for n, limit in sorted(args.max_duplicate_ngram_fraction.items()):
        if len(words) < n:
            continue
        grams = _ngram_ids(word_ids, n)
        repeated = np.ones(len(grams), dtype=bool)
        repeated[np.unique(grams, return_index=True)[1]] = False  # first occurrences are not repeats
        # Words covered by a repeated n-gram, each counted once.
        coverage = np.zeros(len(words) + 1, dtype=np.int64)
        starts = np.flatnonzero(repeated)
        np.add.at(coverage, starts, 1)
        np.add.at(coverage, starts + n, -1)
        covered = np.cumsum(coverage[:-1]) > 0
        if int(lengths[covered].sum()) / total_chars > limit:
            return f"repetition: duplicate {n}-grams"
    return None


def _ngram_ids(word_ids: np.ndarray, n: int) -> np.ndarray:
    count = len(word_ids) - n + 1
    grams = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is intended
        for offset in range(n):
            grams = grams * np.uint64(1_000_003) + word_ids[offset : offset + count] + np.uint64(1)
    return grams


@lru_cache(maxsize=4)
def load_blocklist(path: str | None) -> re.Pattern | None:
    """Whole-word, case-insensitive matcher for the blocklist (one word or phrase per line, # comments)."""
    text = Path(path or DEFAULT_BLOCKLIST).read_text(encoding="utf-8")
    terms = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not terms:
        return None
    alternatives = "|".join(re.escape(term) for term in sorted(terms, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def blocklist_reason(text: str, args: DataArguments) -> str | None:
    pattern = load_blocklist(args.blocklist_file)
    if pattern is None:
        return None
    for hits, _ in enumerate(pattern.finditer(text), start=1):
        if hits > args.max_blocklist_hits:
            return "harmful content: blocklist"
    return None


def rejection_reason(text: str, args: DataArguments) -> str | None:
    """The first filter the document fails, e.g. 'gopher: too few stop words'; None keeps it."""
    words = words_of(text)
    reason = length_reason(text, words, args)
    if reason is None and args.gopher_quality:
        reason = gopher_quality_reason(text, words, args)
    if reason is None and args.repetition_filter:
        reason = repetition_reason(text, words, args)
    if reason is None and args.blocklist_filter:
        reason = blocklist_reason(text, args)
    return reason
