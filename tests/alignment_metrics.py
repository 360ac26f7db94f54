"""Independent measurements of preference models on held-out pairs, for the alignment tests."""

from __future__ import annotations

import json
import re
import string
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


def held_out_qa(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "data/tiny/eval/qa.jsonl").read_text().splitlines()]


def greedy_replies(
    model, tokenizer, questions: list[str], max_new_tokens: int = 48
) -> list[tuple[str, bool]]:
    """Greedy replies to single-turn questions (in the chat template), each with whether it ended its turn
    (the end-of-turn token within `max_new_tokens`)."""
    eos, replies = tokenizer.eos_token_id, []
    model.eval()
    for start in range(0, len(questions), 64):
        prompts = [
            _ids(tokenizer, [{"role": "user", "content": q}], True) for q in questions[start : start + 64]
        ]
        batch = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            ended = eos in row
            reply = tokenizer.decode(row[: row.index(eos)] if ended else row, skip_special_tokens=True)
            replies.append((reply.strip(), ended))
    return replies


def _normalized(text: str) -> str:
    return text.lower().translate(str.maketrans("", "", string.punctuation)).strip()


def qa_scores(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """The tiny QA measures on data/tiny/eval/qa.jsonl rows, as the lm-eval tasks compute them:
    `exact` (tiny_qa: the reply's first line is the answer sentence, case and punctuation ignored),
    `clean` (tiny_qa_clean: the whole reply is the answer sentence and the turn ended there) and
    `clean_form` (the whole reply is in the answer's form, with any single word as the fact, and ended:
    what preference learning fixes, measurable on a model that does not know the held-out facts)."""
    replies = greedy_replies(model, tokenizer, [row["question"] for row in rows])
    scores = {"exact": 0.0, "clean": 0.0, "clean_form": 0.0}
    for row, (reply, ended) in zip(rows, replies, strict=True):
        stem = re.escape(row["target"].rsplit(" ", 1)[0])
        scores["exact"] += _normalized(reply.split("\n")[0]) == _normalized(row["target"])
        scores["clean"] += ended and reply == row["target"]
        scores["clean_form"] += ended and re.fullmatch(stem + r" \w+\.", reply) is not None
    return {key: value / len(rows) for key, value in scores.items()}


def clean_form(workdir: Path, model_dir: Path) -> float:
    """Rule-judged, no reward model: the share of held-out questions whose greedy reply is the answer sentence
    (any fact: the tests' SFT model is not pretrained, so it cannot know held-out facts) and ends the turn
    there. The SFT policy rambles or hedges after the answer to casual questions (the tiny world's designed
    flaw); the preference data prefers the concise answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
    )
    return qa_scores(model, tokenizer, held_out_qa(workdir))["clean_form"]
