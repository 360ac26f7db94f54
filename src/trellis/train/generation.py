"""The generate stage: a model answers a prompt set, k samples a prompt; a checker may keep only answers
whose final answer is the prompt's right one, a reward model may score every answer and keep those at or
above a threshold (rejection sampling) or each prompt's best (best-of-n); the kept answers become a chat
dataset the SFT stage reads (`messages`), e.g. a teacher's worked answers for a student to be distilled on.

Prompts are answered in batches; each batch is written to its own file when it is whole, sampled with
its own seed (the recipe's seed plus the batch's first prompt), so a killed run resumes at the first
missing batch and ends with the same answers as an uninterrupted one. A rerun with other settings,
models or prompts starts afresh (batches/settings.json holds what the batches were made with).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trellis.core.errors import TrellisError
from trellis.core.recipe import Problem
from trellis.data.arguments import DatasetSource, as_source

logger = logging.getLogger(__name__)

BATCHES_DIR = "batches"  # one jsonl per batch of prompts: every sample, its score and whether it was kept
KEPT_NAME = "train.jsonl"  # the kept answers as conversations: what the SFT stage reads


class GenerationError(TrellisError):
    """A model or a filter the generate stage cannot use."""


@dataclass
class GenerateArguments:
    """The generate stage: a model, the prompts it answers, how it samples, and which answers to keep."""

    nested_items: ClassVar[dict[str, type]] = {"datasets": DatasetSource}

    model_name_or_path: str = field(
        metadata={"help": "The model that answers: a local directory (e.g. outputs/tiny/sft) or a Hub id."}
    )
    output_dir: str = field(
        metadata={"help": f"Where {KEPT_NAME} (the kept answers, as conversations) and {BATCHES_DIR}/ go."}
    )
    datasets: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "The prompts (keys of a dataset source): a `prompt` column, or conversations whose last "
            "turn is the answer to replace."
        },
    )
    num_samples: int = field(default=1, metadata={"help": "Answers sampled per prompt (k)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 answers greedily."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: the smallest set of this mass."})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens an answer may have at most."})
    batch_size: int = field(
        default=16,
        metadata={"help": "Prompts per generation call (and per file written: the unit of resuming)."},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Answer only the first N prompts."})
    check_answers: bool = field(
        default=False,
        metadata={
            "help": "Keep only answers whose final answer (what follows the last answer_marker, without end "
            "punctuation) is the prompt's `answer` column: a checker, for questions with one right answer."
        },
    )
    answer_marker: str = field(
        default="Answer:",
        metadata={
            "help": "What precedes the final answer in an answer (check_answers); '': the whole answer."
        },
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "A reward model (the reward stage's output) that scores every answer; its tokenizer "
            "must be the model's."
        },
    )
    min_reward: float | None = field(
        default=None,
        metadata={"help": "Keep only answers the reward model scores at least this (rejection sampling)."},
    )
    best_of_n: bool = field(
        default=False,
        metadata={
            "help": "Keep only each prompt's best-scored answer (of num_samples), if it passes min_reward."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights' dtype.", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds each batch's sampling (plus the batch's first prompt)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model repository's own code (only for models you trust)."}
    )

    def __post_init__(self) -> None:
        self.datasets = [as_source(item) for item in self.datasets]

    def recipe_problems(self) -> list[Problem]:
        problems = []
        if not self.datasets:
            problems.append(Problem("datasets", "required: the prompts to answer (a dataset source)"))
        for key in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                problems.append(Problem(key, f"must be at least 1, got {getattr(self, key)}"))
        if (self.min_reward is not None or self.best_of_n) and not self.reward_model_path:
            key = "min_reward" if self.min_reward is not None else "best_of_n"
            problems.append(
                Problem(key, "scores answers: set reward_model_path to the reward model that scores them")
            )
        if self.best_of_n and self.num_samples < 2:
            problems.append(
                Problem("best_of_n", "picks the best of num_samples answers: set num_samples to 2 or more")
            )
        return problems


@dataclass
class Prompt:
    conversation: list[dict]  # ending before the answer
    answer: str | None = None  # the right final answer, if the prompt set has one (check_answers)


def prompts_of(args: GenerateArguments) -> list[Prompt]:
    """The prompts as conversations ending before the answer (a plain string is one user turn), each with
    its right answer when the answers are checked."""
    from trellis.data.sources import load_mixture

    dataset = load_mixture(args.datasets, args.seed, task="prompts")
    if args.check_answers and "answer" not in dataset.column_names:
        paths = ", ".join(source.path for source in args.datasets)
        raise GenerationError(
            f"check_answers: the prompts ({paths}) have no `answer` column to check answers against; add "
            "each prompt's right final answer as `answer`, or set check_answers: false"
        )
    answers = dataset["answer"] if args.check_answers else [None] * len(dataset)
    prompts = [
        Prompt([{"role": "user", "content": p}] if isinstance(p, str) else p, answer)
        for p, answer in zip(dataset["prompt"], answers, strict=True)
    ]
    return prompts[: args.max_prompts] if args.max_prompts is not None else prompts


def final_answer(text: str, marker: str) -> str | None:
    """What follows the last `marker` in `text` (all of it if the marker is empty), without surrounding
    space and end punctuation; None without the marker."""
    if marker:
        if marker not in text:
            return None
        text = text.rsplit(marker, 1)[1]
    return text.strip().rstrip(".!").strip()


def load_models(args: GenerateArguments):
    """(model, tokenizer, reward model or None), checked: the reward model reads the model's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trellis.train import alignment
    from trellis.train.models import torch_dtype

    tokenizer = AutoTokenizer.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code
    )
    if not tokenizer.chat_template:
        raise GenerationError(
            f"model_name_or_path: {args.model_name_or_path!r} has no chat template; the generate stage answers "
            "conversations: use a chat model (the SFT stage's output)"
        )
    reward_model = None
    if args.reward_model_path:
        alignment.check_reward_model(args.reward_model_path, tokenizer)
        reward_model = alignment.load_scoring_model(
            args.reward_model_path, args.dtype, args.trust_remote_code
        )
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, dtype=torch_dtype(args.dtype), trust_remote_code=args.trust_remote_code
    )
    return model.eval(), tokenizer, reward_model


def generate(
    args: GenerateArguments, model, tokenizer, reward_model, prompts: list[Prompt]
) -> dict[str, Any]:
    """Answer every batch of prompts not yet written, write each batch whole, then the kept answers."""
    folder = Path(args.output_dir, BATCHES_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_if_made_otherwise(folder, settings_key(args))
    starts = range(0, len(prompts), args.batch_size)
    done = [start for start in starts if _batch_path(folder, start).exists()]
    if done:
        logger.info("Resuming: %d of %d batches are already written", len(done), len(starts))
    for number, start in enumerate(starts, 1):
        path = _batch_path(folder, start)
        if path.exists():
            continue
        batch = prompts[start : start + args.batch_size]
        records = answer_batch(args, model, tokenizer, reward_model, batch, start)
        partial = path.with_suffix(".partial")  # renamed when whole: a killed run leaves no half batch
        partial.write_text("".join(json.dumps(record) + "\n" for record in records))
        os.replace(partial, path)
        kept = sum(record["kept"] for record in records)
        logger.info(
            "Batch %d/%d: %d prompts, %d answers, %d kept",
            number,
            len(starts),
            len(batch),
            len(records),
            kept,
        )
    return write_kept(args.output_dir, [_batch_path(folder, start) for start in starts])


def settings_key(args: GenerateArguments) -> str:
    """What decides the answers and which are kept: every key but where they go and how many prompts
    (a prefix of the same batches), plus the local models' and prompt files' contents."""
    import dataclasses

    from trellis.core.hashing import content_hash, file_stamps

    values = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "max_prompts")}
    paths = [args.model_name_or_path, args.reward_model_path, *(source.path for source in args.datasets)]
    # weights by size and modification time; small files (configs, tokenizers, prompts) by content
    values["files"] = [file_stamps(path, 1 << 20) for path in paths if path and os.path.exists(path)]
    return content_hash(values)


def _clear_if_made_otherwise(folder: Path, key: str) -> None:
    """Batches written with other settings, models or prompts are not resumed from: they are removed."""
    stamp = folder / "settings.json"
    made_with = json.loads(stamp.read_text())["key"] if stamp.exists() else None
    batches = list(folder.glob("*.jsonl"))
    if made_with != key and batches:
        logger.info("Removing %d batches written with other settings, models or prompts", len(batches))
        for path in batches:
            path.unlink()
    stamp.write_text(json.dumps({"key": key}))


def _batch_path(folder: Path, start: int) -> Path:
    return folder / f"{start:08d}.jsonl"


def answer_batch(
    args: GenerateArguments, model, tokenizer, reward_model, prompts: list[Prompt], first: int
) -> list[dict]:
    """num_samples answers to each prompt (`first` is the first prompt's index), checked and scored when
    asked, each marked kept or not."""
    import torch

    torch.manual_seed(args.seed + first)
    ids = [
        tokenizer.apply_chat_template(
            p.conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]
    # left padding: generation continues each prompt at the right edge
    inputs = tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")
    sampling = {"do_sample": False}
    if args.temperature > 0:  # plain temperature and nucleus sampling (no top-k cut)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0}
    with torch.no_grad():
        output = model.generate(
            **inputs.to(model.device),
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.num_samples,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    records = []
    for i, answer in enumerate(answers):
        prompt = prompts[i // args.num_samples]
        record = {
            "prompt_index": first + i // args.num_samples,
            "messages": [*prompt.conversation, {"role": "assistant", "content": answer.strip()}],
        }
        if args.check_answers:
            record["correct"] = final_answer(answer, args.answer_marker) == prompt.answer
        records.append(record)
    if reward_model is not None:
        scores = score_answers(reward_model, tokenizer, [r["messages"] for r in records])
        for record, score in zip(records, scores, strict=True):
            record["score"] = score

    def passes(record: dict) -> bool:
        right = record.get("correct", True)
        return right and (args.min_reward is None or record["score"] >= args.min_reward)

    for group in range(0, len(records), args.num_samples):
        choices = records[group : group + args.num_samples]
        best = max(filter(passes, choices), key=lambda r: r.get("score", 0.0), default=None)
        for record in choices:
            record["kept"] = passes(record) and (not args.best_of_n or record is best)
    return records


def score_answers(
    reward_model, tokenizer, conversations: list[list[dict]], batch_size: int = 32
) -> list[float]:
    """The reward model's score of each whole conversation (its last token's output, as the reward stage
    trained it)."""
    import torch

    scores = []
    for start in range(0, len(conversations), batch_size):
        ids = [
            tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
            for c in conversations[start : start + batch_size]
        ]
        batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(reward_model.device)
        with torch.no_grad():
            scores += reward_model(**batch).logits[:, 0].float().tolist()
    return scores


def write_kept(output_dir: str, batch_files: list[Path]) -> dict[str, Any]:
    """The kept answers, as conversations, to output_dir/train.jsonl; counts for the run record."""
    answers = kept = 0
    scores, checks = [], []
    partial = Path(output_dir, KEPT_NAME + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for path in batch_files:
            for line in path.read_text().splitlines():
                record = json.loads(line)
                answers += 1
                if "score" in record:
                    scores.append(record["score"])
                if "correct" in record:
                    checks.append(record["correct"])
                if record["kept"]:
                    kept += 1
                    out.write(json.dumps({"messages": record["messages"]}) + "\n")
    os.replace(partial, Path(output_dir, KEPT_NAME))
    summary = {"answers": answers, "kept": kept, "kept_fraction": kept / answers if answers else 0.0}
    if scores:
        summary["mean_score"] = sum(scores) / len(scores)
    if checks:
        summary["correct_fraction"] = sum(checks) / len(checks)
    logger.info("Kept %d of %d answers in %s", kept, answers, Path(output_dir, KEPT_NAME))
    return summary
