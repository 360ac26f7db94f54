"""Independent measurements of preference models on held-out pairs, for the alignment tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def preference_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )["input_ids"]


def reward_scores(model, tokenizer, pairs: list[dict]) -> list[tuple[float, float]]:
    """(chosen score, rejected score) of every pair by a reward model."""
    scores = []
    with torch.no_grad():
        for pair in pairs:
            scores.append(
                tuple(
                    model(torch.tensor([_ids(tokenizer, pair["prompt"] + pair[key], False)]))
                    .logits[0, 0]
                    .item()
                    for key in ("chosen", "rejected")
                )
            )
    return scores


def answer_logps(model, tokenizer, pairs: list[dict], per_token: bool = False) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) of every pair under a causal LM, summed over tokens
    (with `per_token`, averaged over the answer's tokens, as ORPO compares answers)."""
    result = []
    with torch.no_grad():
        for pair in pairs:
            prompt = _ids(tokenizer, pair["prompt"], True)
            logps = []
            for key in ("chosen", "rejected"):
                full = _ids(tokenizer, pair["prompt"] + pair[key], False)
                assert full[: len(prompt)] == prompt
                logits = model(torch.tensor([full])).logits[0, :-1].log_softmax(-1)
                targets = torch.tensor(full[1:])
                token_logps = logits.gather(1, targets[:, None])[:, 0]
                answer = token_logps[len(prompt) - 1 :]
                logps.append((answer.mean() if per_token else answer.sum()).item())
            result.append(tuple(logps))
    return result


def accuracy_and_margin(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Share of pairs with chosen above rejected, and the mean chosen-minus-rejected difference."""
    return (
        sum(chosen > rejected for chosen, rejected in pairs) / len(pairs),
        sum(chosen - rejected for chosen, rejected in pairs) / len(pairs),
    )


def kind_of_pair(pair: dict) -> str:
    """How the rejected answer of a tiny-default pair is worse: 'rude', 'rambling' or 'wrong' (a wrong fact)."""
    from trellis.data.tiny import RAMBLE, RUDE_ANSWERS

    rejected = pair["rejected"][-1]["content"]
    return "rude" if rejected in RUDE_ANSWERS else "rambling" if rejected.startswith(RAMBLE) else "wrong"
