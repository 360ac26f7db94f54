"""The distill stage's logit distillation: TRL's GKDTrainer (generalized knowledge distillation), a student
trained towards a teacher's next-token distributions over the chat data's answers.

`beta` picks the divergence (0: forward KL, the classic distillation loss; 1: reverse KL; between: the
generalized Jensen-Shannon divergence), `lmbda` the share of batches whose answers the student samples
itself (on-policy), `seq_kd` trains on answers the teacher samples. The teacher must share the student's
tokenizer (its vocabulary): that is checked before the teacher's weights load.
In its own module so that only this stage imports TRL's experimental GKD code.
"""

from dataclasses import dataclass

from trl.experimental.gkd import GKDConfig as TrlGKDConfig
from trl.experimental.gkd import GKDTrainer

from trellis.core.errors import TrellisError
from trellis.core.recipe import Problem

__all__ = ["DistillConfig", "DistillationError", "GKDTrainer", "check_teacher"]


class DistillationError(TrellisError):
    """A teacher the student cannot be distilled from."""


@dataclass
class DistillConfig(TrlGKDConfig):
    """TRL's GKDConfig, with the teacher required."""

    def recipe_problems(self) -> list[Problem]:
        if not self.teacher_model_name_or_path:
            return [
                Problem(
                    "teacher_model_name_or_path",
                    "required: the model to distil from (a local directory or a Hub id), with the "
                    "student's tokenizer",
                )
            ]
        return []


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
