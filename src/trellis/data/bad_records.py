"""Records a stage cannot use: why each was dropped (BAD_REASONS), a report per source, the share of a
source or split that may be dropped before the stage stops, and the run's receiver of the counts.

Real datasets hold records no converter can use (a line of broken UTF-8, an empty reply, a turn without a
role, an HH pair whose dialogues differ before the last reply). Such a record is dropped and counted per
reason with where the first of each reason is and what it looked like; the counts go to the log and the run
record, and a source with more than `max_bad_record_fraction` of its records dropped stops the stage before
training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from trellis.core.errors import TrellisError

logger = logging.getLogger(__name__)


DEFAULT_MAX_BAD_FRACTION = 0.01  # ScriptArguments.max_bad_record_fraction


class DataError(TrellisError):
    """A dataset could not be read or converted."""


# Why a record was dropped -> what the log and the error say about it.
BAD_REASONS = {
    "not_utf8": "bytes that are not UTF-8",
    "bad_json": "not a JSON object",
    "missing_field": "a field of the format missing or null",
    "wrong_type": "a field of another type than in the other records",
    "missing_role": "a turn without a known role",
    "empty_turn": "a turn or answer with no text",
    "no_reply": "no assistant reply to learn from",
    "bad_transcript": "not an HH transcript",
    "dialogues_differ": "chosen and rejected dialogues differ before the last turn",
    "same_answers": "chosen and rejected answers are the same",
}


class TooManyBadRecords(DataError):
    """More of a source's records cannot be used than the recipe allows; `report` says which and where."""

    def __init__(self, message: str, report: SourceReport):
        super().__init__(message)
        self.report = report


class BadRecord(DataError):
    """One record a converter cannot use; `reason` is a key of BAD_REASONS, `line` the raw text of a line
    that is no record at all (not UTF-8 or not JSON)."""

    def __init__(self, reason: str, detail: str, line: str | None = None):
        super().__init__(detail)
        self.reason, self.line = reason, line


@dataclass
class SourceReport:
    """What reading one source dropped, per reason: how many, where the first one is, and what it said."""

    source: str
    read: int = 0
    kept: int = 0
    dropped: dict[str, dict] = field(default_factory=dict)

    def add(self, reason: str, where: dict, problem: str, record: Any) -> None:
        if reason not in self.dropped:
            example = (
                record if isinstance(record, str) else json.dumps(record, ensure_ascii=False, default=str)
            )
            self.dropped[reason] = {"count": 0, **where, "problem": problem, "example": example[:200]}
        self.dropped[reason]["count"] += 1

    @property
    def fraction(self) -> float:
        return (self.read - self.kept) / self.read if self.read else 0.0

    def lines(self) -> list[str]:
        lines = []
        for reason, bad in sorted(self.dropped.items(), key=lambda item: -item[1]["count"]):
            where = (
                f"{bad['file']}:{bad['line']}" if "line" in bad else f"{bad['file']} record {bad['record']}"
            )
            lines.append(
                f"  - {reason} ({BAD_REASONS[reason]}): {bad['count']}, first at {where}: {bad['problem']}; "
                f"the record: {bad['example'][:120]}"
            )
        return lines

    def as_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "kept": self.kept, "dropped": self.dropped}


def require_some(kept: list, report: SourceReport) -> None:
    if not kept:
        raise DataError(f"dataset {report.source!r}: no record can be used\n" + "\n".join(report.lines()))


def check_fraction(report: SourceReport, max_bad_fraction: float) -> None:
    """Log what a source dropped; raise DataError when it is more than `max_bad_fraction` of it."""
    if not report.dropped:
        return
    dropped = report.read - report.kept
    summary = f"{report.source}: {dropped} of {report.read} records ({report.fraction:.1%}) cannot be used"
    if report.fraction > max_bad_fraction:
        raise TooManyBadRecords(
            f"{summary}, more than max_bad_record_fraction {max_bad_fraction} allows:\n"
            + "\n".join(report.lines())
            + "\nFix or remove these records, or raise `max_bad_record_fraction` in the recipe to drop them.",
            report,
        )
    logger.warning("%s; dropped them:\n%s", summary, "\n".join(report.lines()))


# The run's receiver of what the data loading dropped (see reporting_bad_records).
_bad_record_sink: ContextVar[Callable[[dict], None] | None] = ContextVar("bad_record_sink", default=None)


@contextmanager
def reporting_bad_records(sink: Callable[[dict], None]):
    """Within this block, load_train_eval hands `sink` what it dropped (the run record keeps it)."""
    token = _bad_record_sink.set(sink)
    try:
        yield
    finally:
        _bad_record_sink.reset(token)


def check_lengths(trainer, bad_records: dict) -> None:
    """Add to `bad_records` (what load_train_eval reported) what the trainer dropped or truncated for
    max_length, per split, from its prepared datasets: `bad_records["too_long"]`.

    TRL drops the records it could learn nothing from (SFT: no loss token left after truncation; DPO and
    KTO: the prompt alone fills max_length; reward: a pair longer than max_length) and truncates the
    rest. Raises DataError, before training, when the drops are more than max_fraction of a split.
    """
    args = trainer.args
    max_length = getattr(args, "max_length", None)
    if max_length is None or getattr(args, "packing", False):
        return
    rows, max_bad_fraction = bad_records["rows"], bad_records["max_fraction"]
    report = bad_records["too_long"] = {}
    for split, dataset in (("train", trainer.train_dataset), ("test", trainer.eval_dataset)):
        if split not in rows or not hasattr(dataset, "column_names"):
            continue
        dropped = rows[split] - len(dataset)
        answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in dataset.column_names]
        counts = {"records": rows[split], "dropped_too_long": dropped}
        if "prompt_ids" in dataset.column_names and answers:  # the collator truncates prompt + answer
            lengths = zip(*(dataset[c] for c in ["prompt_ids", *answers]), strict=True)
            counts["truncated"] = sum(
                len(prompt) + max(map(len, rest)) > max_length for prompt, *rest in lengths
            )
        elif "input_ids" in dataset.column_names:
            # SFT truncated them when it tokenized: those it cut are among those that now fill max_length.
            counts["at_max_length"] = sum(len(ids) >= max_length for ids in dataset["input_ids"])
        report[split] = counts
        if dropped:
            share = dropped / rows[split]
            message = (
                f"{split}: the trainer drops {dropped} of {rows[split]} records ({share:.1%}) as too long for "
                f"max_length {max_length}"
            )
            if share > max_bad_fraction:
                raise DataError(
                    f"{message}, more than max_bad_record_fraction {max_bad_fraction} allows. Raise max_length, "
                    "shorten or remove those records, or raise `max_bad_record_fraction`."
                )
            logger.warning(message)
        if counts.get("truncated"):
            logger.info(
                "%s: %d records are truncated to max_length %d", split, counts["truncated"], max_length
            )
        if counts.get("at_max_length"):
            logger.info(
                "%s: %d records fill max_length %d (truncated, or exactly that long)",
                split,
                counts["at_max_length"],
                max_length,
            )


def bad_record_sink() -> Callable[[dict], None] | None:
    """The receiver reporting_bad_records set for this run, if any."""
    return _bad_record_sink.get()
