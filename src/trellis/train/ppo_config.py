"""The PPO stage's config, in its own module so that only PPO imports TRL's experimental PPO code."""

from dataclasses import dataclass, field

from trl.experimental.ppo import PPOConfig as TrlPPOConfig


@dataclass
class PPOConfig(TrlPPOConfig):
    """TRL's PPOConfig plus the `trust_remote_code` key every other stage's config has and the value
    model's own learning rate."""

    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models whose code lives in their Hub repository."}
    )
    value_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "The value model's learning rate (unset: `learning_rate`, as TRL has it). The value "
            "model starts from the reward model, which scores finished replies, not prefixes: at a policy's "
            "learning rate it stays wrong for the whole run, and its errors reach the policy as advantages."
        },
    )
