"""The ORPO stage: TRL's ORPOTrainer, with the language-modelling half of its loss on the answer only.

TRL (like the ORPO paper's code) takes the chosen sequence's NLL over prompt *and* answer. Measured on
the tiny world (pipeline, seeds 0-4, from the pretrained model): two seeds in five then learn the
training prompts' names and answer every held-out question about someone else (exact match 0.03 and 0,
SFT's 0.86 and 1.0); with the NLL on the answer tokens, as SFT's `assistant_only_loss` takes it, every
seed keeps its facts (exact match change from SFT 0 to +0.04) and fixes the flaw as well as DPO.
In its own module so that only ORPO imports TRL's experimental ORPO code.
"""

from dataclasses import dataclass, field

import torch
from trl.experimental.orpo import ORPOConfig as TrlORPOConfig
from trl.experimental.orpo import ORPOTrainer as TrlORPOTrainer


@dataclass
class ORPOConfig(TrlORPOConfig):
    """TRL's ORPOConfig plus where the NLL term is taken."""

    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Take ORPO's NLL term over the chosen answer's tokens only (false: over prompt and "
            "answer, as TRL and the ORPO paper's code do)."
        },
    )


class ORPOTrainer(TrlORPOTrainer):
    """TRL's ORPOTrainer; with `completion_only_loss` the NLL term skips the prompt, as its log-odds does."""

    def concatenated_forward(self, model, batch):
        outputs = super().concatenated_forward(model, batch)
        if not self.args.completion_only_loss or self.is_encoder_decoder:
            return outputs
        chosen_logits = outputs[2]  # decoder-only: already shifted, position t predicts token t + 1
        # The chosen labels (-100 on prompt and padding), padded like the logits to the pair's longer answer.
        labels = batch["chosen_labels"]
        labels = torch.nn.functional.pad(
            labels, (0, chosen_logits.shape[1] + 1 - labels.shape[1]), value=-100
        )
        chosen_nll_loss = torch.nn.functional.cross_entropy(
            chosen_logits.flatten(0, 1), labels[:, 1:].flatten()
        )
        return (*outputs[:4], chosen_nll_loss, *outputs[5:])
