"""Chat templates, and the preflight that the end-of-turn token is trained.

A base model without a chat template gets ChatML (`<|im_start|>role\\n...<|im_end|>`), the format
TRL and most open models use, with `{% generation %}` markers so that assistant-only loss works.
The preflight renders one real training example exactly as the trainer will see it and stops the
run if the end-of-turn token of the assistant reply is outside the loss mask: such a model never
learns to stop, which is the most common fine-tuning failure.
"""

from __future__ import annotations

import logging
import os

from trellis.core.errors import TrellisError

logger = logging.getLogger(__name__)

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class PreflightError(TrellisError):
    """The run would train something other than what the user meant."""


def resolve_template(chat_template: str | None, tokenizer) -> str | None:
    """The template a recipe asks for: 'chatml', a .jinja file, literal text; None keeps the tokenizer's."""
    if chat_template is None:
        return None if tokenizer.chat_template else CHATML_TEMPLATE
    if chat_template.lower() == "chatml":
        return CHATML_TEMPLATE
    if chat_template.endswith((".jinja", ".j2")) and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as handle:
            return handle.read()
    return chat_template


def apply_chat_template(model, tokenizer, chat_template: str | None) -> None:
    """Give the tokenizer the recipe's template (ChatML by default), adding its tokens if missing."""
    template = resolve_template(chat_template, tokenizer)
    if template is None:
        return
    if template == CHATML_TEMPLATE:
        missing = [token for token in CHATML_TOKENS if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
            model.resize_token_embeddings(len(tokenizer))
            logger.info("Added ChatML tokens %s to the tokenizer and resized the embeddings", missing)
        # The assistant's turn ends with <|im_end|>: generation must stop there.
        tokenizer.eos_token = "<|im_end|>"
        model.config.eos_token_id = tokenizer.eos_token_id
        if getattr(model, "generation_config", None) is not None:  # reward models have none
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        logger.info("Using the ChatML chat template (end of turn: <|im_end|>)")
    tokenizer.chat_template = template


def check_eos_in_loss_mask(trainer) -> None:
    """Stop before training if the first training example does not train the end-of-turn token.

    It uses the trainer's own processed dataset and data collator, so it checks exactly what the
    loss will see (chat template, assistant-only masking, truncation and packing included).
    """
    tokenizer = trainer.processing_class
    eos_id = tokenizer.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[0]])
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = input_ids[labels != -100].tolist()
    if eos_id in trained:
        return
    raise PreflightError(
        f"the end-of-turn token {tokenizer.eos_token!r} (id {eos_id}) is not in the loss mask of the first "
        "training example, so the model would never learn to stop.\n"
        f"  rendered example: {tokenizer.decode(input_ids)!r}\n"
        f"  tokens in the loss: {tokenizer.decode(trained)!r}\n"
        "  fix: use a chat template whose {% generation %} block ends with the end-of-turn token, or set "
        "'eos_token' to the token your template closes assistant turns with, or raise 'max_length' if "
        "truncation cut it off"
    )
