"""Training a byte-level BPE tokenizer (HF `tokenizers`), saved as a transformers tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    extra_special_tokens: Iterable[str] = (),
    eos_token: str = EOS_TOKEN,
    pad_token: str | None = PAD_TOKEN,
    **special_tokens: str,
):
    """A byte-level BPE tokenizer trained on `texts`, with EOS/pad and any extra special tokens.

    Byte-level means every string is encodable (no unknown token), whatever the training corpus.
    `special_tokens` names further roles (bos_token="<s>", unk_token=...) as transformers does; a
    role set to None is left out (pad_token=None: a tokenizer without a pad token, as Llama 3's).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra_special_tokens = list(extra_special_tokens)
    roles = {"eos_token": eos_token, "pad_token": pad_token, **special_tokens}
    roles = {role: token for role, token in roles.items() if token is not None}
    special = list(dict.fromkeys([*roles.values(), *extra_special_tokens]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, additional_special_tokens=extra_special_tokens, **roles
    )
