"""Trellis's ORPOTrainer: the NLL term over the chosen answer only (`completion_only_loss`, the default),
or TRL's over prompt and answer; the log-odds term and everything else as TRL computes them."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_tiny_model
from datasets import Dataset

from trellis.train.orpo import ORPOConfig, ORPOTrainer


def probe_batch_and_trainer(workdir, tmp_path, completion_only_loss: bool):
    model, tokenizer = fresh_tiny_model(workdir)
    pairs = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
            for question, good, bad in (
                ("Where does Kalo live?", "Answer: Kalo lives in Oslo.", "Ask someone else."),
                (
                    "Hey, what pet does Safi have?",
                    "Answer: Safi has a pet owl.",
                    "Answer: Safi has a pet owl.\nBut I am not sure.",
                ),
            )
        ]
    )
    args = ORPOConfig(
        output_dir=str(tmp_path),
        completion_only_loss=completion_only_loss,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to="none",
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    return trainer, next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_orpo_nll_term_covers_the_answer_or_the_whole_sequence(workdir, tmp_path, completion_only_loss):
    trainer, batch = probe_batch_and_trainer(workdir, tmp_path, completion_only_loss)
    with torch.no_grad():
        *_, nll = trainer.concatenated_forward(trainer.model, batch)
        logits = trainer.model(
            batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]
        ).logits
    answer_labels = batch["chosen_labels"]  # -100 on the prompt and padding
    whole_labels = batch["chosen_input_ids"].masked_fill(batch["chosen_attention_mask"] == 0, -100)
    assert (answer_labels != -100).sum() < (whole_labels != -100).sum()  # the prompts carry tokens
    labels = answer_labels if completion_only_loss else whole_labels
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(nll, expected)
