"""The range every bounded numeric recipe key must lie in, declared once for every stage's dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """The range a numeric recipe value must lie in; `note` says what the edge values mean."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # > low instead of >= low
    high_open: bool = False  # < high instead of <= high
    note: str = ""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None  # None (unset) and wrong types are not ranges' business
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (too_low or too_high):
            return None
        if self.low is not None and self.high is not None:
            expected = (
                f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            expected = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            expected = f"{'<' if self.high_open else '<='} {self.high}"
        return f"must be {expected}{f' ({self.note})' if self.note else ''}, got {value!r}"


_AT_LEAST_1 = Bound(1)
_POSITIVE = Bound(0, low_open=True)
_NOT_NEGATIVE = Bound(0)
_STEPS = Bound(0, low_open=True, note="a step count, or a fraction < 1 of the run")
_FRACTION = Bound(0, 1, high_open=True)  # [0, 1)

# Values outside these ranges are meaningless (or crash deep inside training); a key means the same in
# every stage dataclass that has it. Ranges from the TRL and transformers docs of each field.
VALUE_BOUNDS: dict[str, Bound] = {
    # transformers.TrainingArguments
    "per_device_train_batch_size": _AT_LEAST_1,
    "per_device_eval_batch_size": _AT_LEAST_1,
    "gradient_accumulation_steps": _AT_LEAST_1,
    "eval_accumulation_steps": _AT_LEAST_1,
    "learning_rate": _NOT_NEGATIVE,
    "value_learning_rate": _NOT_NEGATIVE,  # Trellis's PPOConfig
    "weight_decay": _NOT_NEGATIVE,
    "adam_beta1": _FRACTION,
    "adam_beta2": _FRACTION,
    "adam_epsilon": _NOT_NEGATIVE,
    "max_grad_norm": Bound(0, note="0: no clipping"),
    "num_train_epochs": _POSITIVE,
    "max_steps": Bound(-1, note="-1: train for num_train_epochs"),
    "warmup_steps": Bound(0, note="a step count, or a fraction < 1 of the run"),
    "logging_steps": _STEPS,
    "eval_steps": _STEPS,
    "save_steps": _STEPS,
    "label_smoothing_factor": _FRACTION,
    "seed": Bound(0, 2**32 - 1, note="numpy's seed range"),
    "data_seed": Bound(0, 2**32 - 1, note="numpy's seed range"),
    "dataloader_num_workers": _NOT_NEGATIVE,
    # TRL's trainer configs
    "max_length": _AT_LEAST_1,
    "max_prompt_length": _AT_LEAST_1,
    "max_completion_length": _AT_LEAST_1,
    "beta": _NOT_NEGATIVE,  # GRPO and RLOO: 0 turns the KL penalty off; see CONFIG_VALUE_BOUNDS
    "num_generations": Bound(2, note="the group each completion's reward is compared with"),
    "num_iterations": _AT_LEAST_1,
    "temperature": _POSITIVE,
    "top_p": Bound(0, 1, low_open=True),
    "num_ppo_epochs": _AT_LEAST_1,
    "num_mini_batches": _AT_LEAST_1,
    "total_episodes": _AT_LEAST_1,
    "response_length": _AT_LEAST_1,
    "local_rollout_forward_batch_size": _AT_LEAST_1,
    "kl_coef": _NOT_NEGATIVE,
    "vf_coef": _NOT_NEGATIVE,
    "cliprange": _POSITIVE,
    "cliprange_value": _POSITIVE,
    "gamma": Bound(0, 1),
    "lam": Bound(0, 1),
    # TRL's ModelConfig (LoRA)
    "lora_r": _AT_LEAST_1,
    "lora_alpha": _POSITIVE,
    "lora_dropout": _FRACTION,
    # Trellis's data and stage arguments
    "test_split_size": Bound(0, low_open=True, note="a fraction < 1 or a count of examples"),
    "unchunked_loss_max_mib": _NOT_NEGATIVE,
    "batch_size": _AT_LEAST_1,
    "quality_batch_size": _AT_LEAST_1,
    "quality_max_length": _AT_LEAST_1,
    # DatasetSource (an item of `datasets`)
    "weight": Bound(0, low_open=True, note="the share of the source to use: 0.5 a half, 2.0 twice"),
    "max_documents": _AT_LEAST_1,
}

# Where one stage needs a narrower range than VALUE_BOUNDS (by config class name, subclasses included).
CONFIG_VALUE_BOUNDS: dict[str, dict[str, Bound]] = {
    # beta scales the preference margin (DPO; IPO divides by it), KTO's sigmoid and ORPO's odds-ratio
    # term: at 0 the stage learns no preference at all.
    "DPOConfig": {"beta": _POSITIVE},
    "KTOConfig": {"beta": _POSITIVE},
    "ORPOConfig": {"beta": _POSITIVE},
    "GenerateArguments": {"temperature": Bound(0, note="0: greedy")},
}


def value_bounds(dataclass_types: tuple[type, ...]) -> dict[str, Bound]:
    """The declared range of every bounded key of a stage's dataclasses."""
    bounds: dict[str, Bound] = {}
    for cls in dataclass_types:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        bounds.update({name: bound for name, bound in VALUE_BOUNDS.items() if name in names})
        for base in reversed(cls.__mro__):  # the most derived class's range wins
            bounds.update(CONFIG_VALUE_BOUNDS.get(base.__name__, {}))
    return bounds
