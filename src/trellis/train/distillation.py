"""The distill stage's two modes.

- `logit`: TRL's GKDTrainer (generalized knowledge distillation), a student trained towards a teacher's
  next-token distributions over the chat data's answers, or over every token of plain text (a `text`
  column, e.g. pretraining documents: distillation as a pruned model's recovery or a small model's
  pretraining).
- `cot` (chain of thought): the student is trained, as in SFT, on a teacher's worked answers (the generate
  stage's output, checked or scored there): the teacher speaks through the data, so it needs no shared
  tokenizer. `answers_only` trains on the final answers alone, the baseline that shows what the reasoning
  adds.

In `logit` mode `beta` picks the divergence (0: forward KL, the classic distillation loss; 1: reverse KL;
between: the generalized Jensen-Shannon divergence), `lmbda` the share of batches whose answers the
student samples itself (on-policy), `seq_kd` trains on answers the teacher samples. The teacher must share
the student's tokenizer (its vocabulary): that is checked before the teacher's weights load.
In its own module so that only this stage imports TRL's experimental GKD code.
"""

from dataclasses import dataclass, field

from trl.experimental.gkd import GKDConfig as TrlGKDConfig
from trl.experimental.gkd import GKDTrainer

from trellis.core.errors import TrellisError
from trellis.core.recipe import Problem

__all__ = [
    "DistillConfig",
    "DistillationError",
    "GKDTrainer",
    "check_teacher",
    "final_answers_only",
    "text_collator",
]


class DistillationError(TrellisError):
    """A teacher the student cannot be distilled from."""


@dataclass
class DistillConfig(TrlGKDConfig):
    """TRL's GKDConfig, with the mode, and the teacher required for logit distillation."""

    mode: str = field(
        default="logit",
        metadata={
            "help": "logit: towards the teacher's next-token distributions (GKD); cot: on the teacher's "
            "worked answers in the datasets (the generate stage's output), as SFT.",
            "choices": ["logit", "cot"],
        },
    )
    answers_only: bool = field(
        default=False,
        metadata={
            "help": "cot mode: train on each answer's final answer alone (from the last answer_marker on), "
            "without the reasoning before it: the baseline chain-of-thought distillation is measured against."
        },
    )
    answer_marker: str = field(
        default="Answer:", metadata={"help": "What precedes the final answer in an answer (answers_only)."}
    )

    def recipe_problems(self) -> list[Problem]:
        problems = []
        if self.mode == "logit" and not self.teacher_model_name_or_path:
            problems.append(
                Problem(
                    "teacher_model_name_or_path",
                    "required in logit mode: the model to distil from (a local directory or a Hub id), with "
                    "the student's tokenizer",
                )
            )
        if self.mode == "cot" and self.teacher_model_name_or_path:
            problems.append(
                Problem(
                    "teacher_model_name_or_path",
                    "unused in cot mode, where the teacher's worked answers are the datasets (the generate "
                    "stage's output): remove it, or set mode: logit",
                )
            )
        if self.answers_only and self.mode != "cot":
            problems.append(
                Problem("answers_only", "a cot-mode baseline: set mode: cot, or remove answers_only")
            )
        return problems


def final_answers_only(dataset, marker: str):
    """Each conversation with its last turn cut to the final answer (from the last `marker` on); a turn
    without the marker is a bad teacher answer: the error names the row."""

    def cut(row: dict, index: int) -> dict:
        last = row["messages"][-1]
        if marker not in last["content"]:
            raise DistillationError(
                f"answers_only: row {index} of the data has no {marker!r} in its last turn "
                f"({last['content']!r:.80}); set answer_marker to what precedes your answers' final answer"
            )
        answer = marker + last["content"].rsplit(marker, 1)[1]
        return {"messages": [*row["messages"][:-1], {**last, "content": answer}]}

    return dataset.map(cut, with_indices=True, desc="Cutting answers to their final answer")


def check_teacher(args: DistillConfig, student_vocab_size: int) -> None:
    """The teacher's vocabulary is the student's: its config says so, read without loading weights."""
    from transformers import AutoConfig

    teacher = AutoConfig.from_pretrained(
        args.teacher_model_name_or_path, trust_remote_code=args.trust_remote_code
    )
    teacher_vocab_size = teacher.get_text_config().vocab_size
    if teacher_vocab_size != student_vocab_size:
        raise DistillationError(
            f"teacher_model_name_or_path: {args.teacher_model_name_or_path!r} has a vocabulary of "
            f"{teacher_vocab_size} tokens, the student {student_vocab_size}: logit distillation compares "
            "distributions over one vocabulary. Pick a teacher of the student's family (same tokenizer), "
            "or distil through generated answers instead (the generate stage, then SFT)."
        )


def text_collator(args: DistillConfig, dataset, tokenizer):
    """For plain text (a `text` column): the dataset tokenized (each record cut at max_length) and a
    collator whose labels are every token, so the student matches the teacher's distribution everywhere.
    None for conversations, which GKD's own collator renders with the chat template."""
    if "text" not in dataset["train"].column_names:
        return dataset, None
    if args.lmbda > 0 or args.seq_kd:
        raise DistillationError(
            f"lmbda: {args.lmbda}, seq_kd: {args.seq_kd}: on-policy and sequence-level distillation generate "
            "answers to prompts, and plain text has none; set lmbda: 0 and seq_kd: false, or distil on "
            "conversations"
        )
    from transformers import DataCollatorForLanguageModeling

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    columns = dataset["train"].column_names
    tokenized = dataset.map(tokenize, batched=True, remove_columns=columns, desc="Tokenizing the text")
    return tokenized, DataCollatorForLanguageModeling(tokenizer, mlm=False)
