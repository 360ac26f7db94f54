"""The PPO stage's config, in its own module so that only PPO imports TRL's experimental PPO code."""

from dataclasses import dataclass, field

from trl.experimental.ppo import PPOConfig as TrlPPOConfig


@dataclass
class PPOConfig(TrlPPOConfig):
    """TRL's PPOConfig plus the `trust_remote_code` key every other stage's config has."""

    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models whose code lives in their Hub repository."}
    )
