"""Perplexity and bits per byte on held-out text, with a sliding window for texts longer than the context.

Each text is prefixed with the tokenizer's BOS token (its EOS if it has none, as lm-eval does), so
every token of the text is scored. A text longer than `max_length` is read in windows that advance
by `stride` tokens: every token is scored exactly once, with at least `max_length - stride` tokens of
context (except near the start), instead of losing its context at each window boundary.
Perplexity is per token, so it depends on the tokenizer; bits per byte does not, and compares
models with different tokenizers.
"""

from __future__ import annotations

import logging
import math

from trellis.evaluate.arguments import PerplexitySet

logger = logging.getLogger(__name__)

# A long-context model's full window would need a lot of memory for little change in the number.
DEFAULT_MAX_LENGTH = 2048


def sliding_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """(window, scored): windows over `ids` whose last `scored` targets are new, so each token after the
    first is scored once. The first token is never a target (it is the prefix)."""
    windows, scored_until = [], 1
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        if end > scored_until:
            windows.append((ids[begin:end], end - scored_until))
            scored_until = end
        if end == len(ids):
            break
    return windows


def evaluate_perplexity(
    model, tokenizer, texts: list[str], max_length: int, stride: int, batch_size: int
) -> dict:
    """Sum the negative log-likelihood of every token of `texts`; return perplexity and bits per byte."""
    import torch

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = []
    for text in texts:
        ids = [prefix, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        windows += sliding_windows(ids, max_length, stride)
    windows.sort(key=lambda window: len(window[0]))
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (ids, scored) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            targets[row, len(ids) - scored : len(ids)] = torch.tensor(ids[len(ids) - scored :])
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        # The logits at position i predict token i + 1.
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        labels = targets[:, 1:].to(device)
        mask = labels != -100
        picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total_nll -= picked[mask].double().sum().item()
        total_tokens += int(mask.sum())
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / total_bytes,
        "tokens": total_tokens,
        "bytes": total_bytes,
    }


def perplexity_metrics(model, tokenizer, item: PerplexitySet, batch_size: int) -> dict:
    """Load a held-out text set and measure it; metric names are prefixed with the set's label."""
    from trellis.data.sources import DataError, load_source

    dataset = load_source(item)
    if item.text_field not in dataset.column_names:
        raise DataError(
            f"perplexity set {item.label!r} ({item.path}): no column {item.text_field!r}; it has "
            f"{dataset.column_names}. Set 'text_field' to the column holding the text."
        )
    texts = [text for text in dataset[item.text_field] if text]
    if item.limit is not None:
        texts = texts[: item.limit]
    max_length = item.max_length or min(model.config.max_position_embeddings, DEFAULT_MAX_LENGTH)
    stride = item.stride or max(max_length // 2, 1)
    logger.info(
        "Perplexity on %s: %d texts, window %d, stride %d", item.label, len(texts), max_length, stride
    )
    result = evaluate_perplexity(model, tokenizer, texts, max_length, stride, batch_size)
    logger.info("%s: %d tokens, %d bytes scored", item.label, result["tokens"], result["bytes"])
    return {f"{item.label}.{name}": result[name] for name in ("perplexity", "bits_per_byte")}
