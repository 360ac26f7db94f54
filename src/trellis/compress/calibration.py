"""Calibration text for the compression stages (GPTQ's Hessians, pruning's importance scores): records
drawn from the recipe's datasets and tokenized as the model will see them."""

from __future__ import annotations

import logging

from trellis.compress.arguments import PruneArguments, QuantizeArguments

logger = logging.getLogger(__name__)


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)


def calibration_data(args: QuantizeArguments | PruneArguments, tokenizer) -> list[dict]:
    """`calibration_samples` records drawn with the seed, as token ids of at most `calibration_max_length`.
    Conversations are rendered with the model's chat template, as the model will see them."""
    import torch

    from trellis.data.sources import DataError, load_mixture

    dataset = load_mixture(args.calibration_datasets, args.seed, task="messages")
    dataset = dataset.shuffle(seed=args.seed).select(range(min(args.calibration_samples, len(dataset))))
    if "messages" in dataset.column_names and not tokenizer.chat_template:
        raise DataError(
            "calibration_datasets hold conversations but the model's tokenizer has no chat template"
        )
    samples = []
    for record in dataset:
        # A rendered conversation holds its special tokens: the template writes BOS (Llama 3, Gemma,
        # Mistral), so encoding it must not add a second one, as the model never sees two.
        rendered = "messages" in record
        if rendered:
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        else:
            text = record.get("text") or record["prompt"] + record["completion"]
        ids = tokenizer(
            text, truncation=True, max_length=args.calibration_max_length, add_special_tokens=not rendered
        )["input_ids"]
        if ids:
            samples.append(
                {
                    "input_ids": torch.tensor([ids]),
                    "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                }
            )
    logger.info(
        "Calibration: %d records, %d tokens", len(samples), sum(s["input_ids"].shape[1] for s in samples)
    )
    return samples
