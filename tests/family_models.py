"""Tiny local stand-ins for the real model families: the same architecture (a scaled-down copy of the
family's Hub config from tests/families.py), the family's special tokens, and its official chat template.

Official templates: Llama 3.2, Qwen2.5 and Gemma 2 are read from TRL's package (trl/chat_templates/:
exact copies of what the model repos ship, which TRL compares tokenizers against to recognise them).
SmolLM2 and Mistral, which TRL does not carry, are copied below from their model repos.
"""

from __future__ import annotations

from pathlib import Path

import trl
from families import Family

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"

# HuggingFaceTB/SmolLM2-1.7B-Instruct, tokenizer_config.json "chat_template".
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.2, tokenizer_config.json "chat_template" (the base v0.3 ships none).
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""


def official_template(family: str) -> str:
    """The chat template the family's Hub tokenizer ships (the instruct model's, for Llama and Mistral)."""
    trl_files = {"llama3": "llama3_2.jinja", "qwen2.5": "qwen2_5.jinja", "gemma2": "gemma.jinja"}
    if family in trl_files:
        return (TRL_TEMPLATES / trl_files[family]).read_text()
    return {"smollm2": SMOLLM2_TEMPLATE, "mistral": MISTRAL_TEMPLATE}[family]


def reference_template(family: str) -> str:
    """What the recipe's training template must render identically (without its generation markers).

    Llama 3.1/3.2 Instruct add a dated system header; the recipes train the Llama 3 Instruct turns."""
    if family == "llama3":
        return (TRL_TEMPLATES / "llama3.jinja").read_text()
    return official_template(family)


# The base model's special tokens, as in each base repo's tokenizer_config.json. `end_of_turn` is what
# the chat template closes an assistant reply with: the EOS SFT must train.
TOKENS = {
    "llama3": dict(
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"],
        end_of_turn="<|eot_id|>",
    ),
    "qwen2.5": dict(
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra=["<|im_start|>", "<|im_end|>"],
        end_of_turn="<|im_end|>",
    ),
    "smollm2": dict(
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra=["<|im_start|>", "<|im_end|>"],
        end_of_turn="<|im_end|>",
    ),
    "mistral": dict(
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", extra=["[INST]", "[/INST]"], end_of_turn="</s>"
    ),
    "gemma2": dict(
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra=["<start_of_turn>", "<end_of_turn>"],
        end_of_turn="<end_of_turn>",
    ),
}


# Families whose Hub tokenizer prepends BOS to every encoded text (Llama 3's post-processor, Gemma's and
# Mistral's add_bos_token); SmolLM2's and Qwen2.5's add nothing.
ADDS_BOS = ("llama3", "gemma2", "mistral")


def build_tokenizer(family: str, texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `texts`, carrying the family's special tokens and template, and
    prepending BOS to encoded text where the family's tokenizer does."""
    from trellis.data.tokenizer import train_bpe_tokenizer

    # A family without a pad token keeps none (pad_token=None), as its real tokenizer does.
    tokens = {"pad_token": None, **{k: v for k, v in TOKENS[family].items() if k.endswith("_token")}}
    tokenizer = train_bpe_tokenizer(texts, vocab_size, TOKENS[family]["extra"], **tokens)
    tokenizer.chat_template = official_template(family)
    if family in ADDS_BOS:
        from tokenizers import processors

        bos = tokenizer.bos_token
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
        )
    return tokenizer


def tiny_config(fam: Family, tokenizer):
    """The family's config scaled down to 2 layers of width 128 (MLP 256); everything else (GQA ratio, tied
    embeddings, RoPE base and scaling, Gemma 2's soft-capping and sliding window) kept. Widths are
    multiples of 128 so that the quantize recipes' GPTQ group sizes (64 or 128) fit as shipped."""
    from transformers import AutoConfig

    values = dict(fam.config)
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    values.update(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4 if kv_heads == heads else 2,
        head_dim=32,
        vocab_size=len(tokenizer),
        max_position_embeddings=min(values["max_position_embeddings"], 8192),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if "query_pre_attn_scalar" in values:
        values["query_pre_attn_scalar"] = 32
    if "sliding_window" in values and values["sliding_window"]:
        values["sliding_window"] = 32  # shorter than the tiny conversations, so the window is exercised
    return AutoConfig.for_model(values.pop("model_type"), **values)


def write_tiny_family_model(fam: Family, out: Path, texts: list[str]) -> Path:
    """Save a randomly initialised tiny model of the family's architecture and its tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(fam.family, texts)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(fam, tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
