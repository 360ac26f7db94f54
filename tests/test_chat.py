"""The chat template and the EOS preflight: a run whose end-of-turn token is not trained must not start."""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from trellis.data.chat import CHATML_TEMPLATE, PreflightError, apply_chat_template, check_eos_in_loss_mask

CONVERSATIONS = [
    {
        "messages": [
            {"role": "user", "content": "Where does Kalo live?"},
            {"role": "assistant", "content": "Kalo lives in Oslo."},
        ]
    },
] * 4

# ChatML whose {% generation %} block stops before <|im_end|>: the stop token falls outside the mask.
EOS_OUTSIDE_MASK = CHATML_TEMPLATE.replace(
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
    "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
)
# A template that never writes an end-of-turn token at all.
NO_EOS = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"


@pytest.fixture
def tokenizer(workdir):
    return AutoTokenizer.from_pretrained(workdir / "data" / "tiny" / "tokenizer")


def make_trainer(tokenizer, tmp_path, assistant_only_loss: bool, packing: bool = False):
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_length=64,
        assistant_only_loss=assistant_only_loss,
        activation_checkpointing=False,
    )
    return model, lambda: SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(CONVERSATIONS),
    )


@pytest.mark.parametrize(("assistant_only_loss", "packing"), [(True, False), (False, False), (True, True)])
def test_default_chatml_trains_the_end_of_turn_token(tokenizer, tmp_path, assistant_only_loss, packing):
    model, trainer = make_trainer(tokenizer, tmp_path, assistant_only_loss, packing)
    assert tokenizer.chat_template is None  # a base tokenizer: ChatML is applied by default
    apply_chat_template(model, tokenizer, None)
    assert (
        tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    )
    check_eos_in_loss_mask(trainer())


def test_template_that_drops_eos_from_the_mask_is_stopped(tokenizer, tmp_path):
    model, trainer = make_trainer(tokenizer, tmp_path, assistant_only_loss=True)
    apply_chat_template(model, tokenizer, EOS_OUTSIDE_MASK)
    tokenizer.eos_token = "<|im_end|>"
    with pytest.raises(PreflightError, match=r"'<\|im_end\|>'.*not in the loss mask") as error:
        check_eos_in_loss_mask(trainer())
    assert "tokens in the loss: 'Kalo lives in Oslo.'" in str(error.value)


def test_template_without_eos_is_stopped(tokenizer, tmp_path):
    model, trainer = make_trainer(tokenizer, tmp_path, assistant_only_loss=False)
    apply_chat_template(model, tokenizer, NO_EOS)
    tokenizer.eos_token = "<|im_end|>"
    with pytest.raises(PreflightError, match="never learn to stop"):
        check_eos_in_loss_mask(trainer())


def test_eos_that_the_template_does_not_use_is_stopped(tokenizer, tmp_path):
    # ChatML closes turns with <|im_end|>, but the tokenizer's EOS is still the base model's <|endoftext|>.
    model, trainer = make_trainer(tokenizer, tmp_path, assistant_only_loss=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    with pytest.raises(PreflightError, match=r"'<\|endoftext\|>'"):
        check_eos_in_loss_mask(trainer())
