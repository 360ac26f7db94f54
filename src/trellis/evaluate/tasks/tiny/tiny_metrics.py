"""Metrics of the tiny tasks that lm-eval's built-in ones do not cover."""

import re


def answer_form(doc: dict, results: list[str]) -> dict:
    """1 if the reply is the target sentence with any single word in place of the fact, else 0."""
    stem = doc["target"].rsplit(" ", 1)[0]
    return {"acc": float(re.fullmatch(re.escape(stem) + r" \w+\.", results[0].strip()) is not None)}
