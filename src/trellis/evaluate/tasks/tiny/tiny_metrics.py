"""Metrics of the tiny tasks that lm-eval's built-in ones do not cover."""

import re


def answer_form(doc: dict, results: list[str]) -> dict:
    """1 if the reply is the target sentence with any single word in place of the fact, else 0."""
    stem = doc["target"].rsplit(" ", 1)[0]
    return {"acc": float(re.fullmatch(re.escape(stem) + r" \w+\.", results[0].strip()) is not None)}


def clean_answer(doc: dict, results: list[str]) -> dict:
    """Rule-judged, no reward model: 1 if the whole reply is the target sentence (the right fact, in the
    taught form) and the turn ended right after it (generation stops only at the end-of-turn token or
    the token budget), so a reply that rambles, hedges or runs on scores 0.
    """
    return {"acc": float(results[0].strip() == doc["target"])}


def final_answer_match(doc: dict, results: list[str]) -> dict:
    """1 if the reply's final answer (after its last "Answer:", as the generate stage's checker reads it) is
    the right one, whatever reasoning comes before it, else 0."""
    from trellis.train.generation import final_answer

    return {"exact_match": float(final_answer(results[0], "Answer:") == doc["answer"])}
