"""Models and tokenizers: built from a config (file or inline), sized to the tokenizer; local paths checked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from trellis.train.models import ModelError, load_model, load_tokenizer

TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def model_args(**overrides):
    values = dict(
        model_name_or_path=None,
        model_revision="main",
        model_config=None,
        tokenizer_name_or_path=None,
        dtype="float32",
        attn_implementation=None,
        load_in_4bit=False,
        load_in_8bit=False,
    )
    return SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize("as_file", [False, True])
def test_model_from_config_matches_the_tokenizer(workdir, tmp_path, as_file):
    tokenizer = AutoTokenizer.from_pretrained(workdir / "data/tiny/tokenizer")
    config = TINY_CONFIG
    if as_file:
        config = str(tmp_path / "config.json")
        (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    model = load_model(
        model_args(model_config=config), tokenizer, SimpleNamespace(activation_checkpointing=False)
    )
    assert model.config.vocab_size == len(tokenizer)
    assert (
        model.config.eos_token_id == tokenizer.eos_token_id
        and model.config.pad_token_id == tokenizer.pad_token_id
    )


def test_config_without_model_type(workdir):
    tokenizer = AutoTokenizer.from_pretrained(workdir / "data/tiny/tokenizer")
    with pytest.raises(ModelError, match="needs a 'model_type'"):
        load_model(
            model_args(model_config={"hidden_size": 128}),
            tokenizer,
            SimpleNamespace(activation_checkpointing=False),
        )


def test_missing_local_tokenizer_is_reported_not_fetched():
    with pytest.raises(ModelError, match="no such local tokenizer directory: './no/such/tokenizer'"):
        load_tokenizer(model_args(tokenizer_name_or_path="./no/such/tokenizer"))
