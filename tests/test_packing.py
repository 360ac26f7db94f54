"""Packing without cross-document attention: a packed batch gives the loss of the same documents unpacked."""

from __future__ import annotations

import pytest
import torch
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trellis.train.arguments import ModelArguments
from trellis.train.models import load_model


def _documents() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    lengths = (7, 19, 4, 12)
    return [{"input_ids": torch.randint(3, 200, (n,), generator=generator).tolist()} for n in lengths]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss_for_a_model_loaded_for_training(workdir, attn_implementation):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "data" / "tiny" / "tokenizer")
    model_args = ModelArguments(
        model_config={
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
        },
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    training_args = SFTConfig(
        output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=False, packing=True
    )
    model = load_model(model_args, tokenizer, training_args)
    documents = _documents()
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(documents)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        documents
    )  # as packing collates
    assert packed["input_ids"].shape == (1, sum(len(d["input_ids"]) for d in documents))
    assert "attention_mask" not in packed  # the document boundaries come from position_ids alone

    with torch.no_grad():
        padded_loss = model(**padded).loss.item()
        packed_loss = model(**packed).loss.item()
        # With a KV cache (transformers' default), the boundaries are ignored: the documents attend
        # to each other and the loss changes. Trellis loads training models without one.
        leaked_loss = model(**packed, use_cache=True).loss.item()
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert abs(leaked_loss - padded_loss) > 1e-3
