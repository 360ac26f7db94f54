"""The pretraining stage's input: a tokenizer (the base model's or one trained here) and documents tokenized,
joined with EOS and packed into blocks of exactly `block_size` tokens, as the data stage writes them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from trellis.core.run_record import read_record
from trellis.data.arguments import DataArguments
from trellis.data.sources import DataError
from trellis.data.tokenizer import train_bpe_tokenizer

PACKED_DIR = "packed"
TOKENIZER_DIR = "tokenizer"


def load_packed(output_dir: str):
    """The packed `DatasetDict` (train, validation; column input_ids) and tokenizer of a data stage."""
    import datasets
    from transformers import AutoTokenizer

    record = read_record(output_dir) or {}
    if record.get("stage") != "data" or record.get("status") != "complete":
        raise DataError(
            f"{output_dir}: not a complete data-stage output (run record status: "
            f"{record.get('status', 'missing')}); run scripts/prepare_data.py with its recipe first"
        )
    packed = datasets.load_from_disk(os.path.join(output_dir, PACKED_DIR))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(output_dir, TOKENIZER_DIR))
    if tokenizer.pad_token is None:  # e.g. Llama 3: tokenize_and_pack filled the last block with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return packed, tokenizer


def build_tokenizer(args: DataArguments, train):
    """The base model's tokenizer, or a byte-level BPE tokenizer trained on the cleaned corpus."""
    if args.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
        if tokenizer.eos_token_id is None:
            raise DataError(
                f"tokenizer {args.tokenizer_name_or_path!r} has no EOS token, which separates packed "
                f"documents; choose a tokenizer with one, or unset tokenizer_name_or_path to train one"
            )
        return tokenizer
    count = min(len(train), args.tokenizer_train_documents or len(train))

    def texts():
        for batch in train.select(range(count)).iter(batch_size=1000):
            yield from batch["text"]

    return train_bpe_tokenizer(texts(), args.tokenizer_vocab_size, args.tokenizer_special_tokens)


def compression(tokenizer, texts: list[str]) -> dict[str, float]:
    """Characters and UTF-8 bytes per token on held-out documents (higher compresses better)."""
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    characters = sum(len(t) for t in texts)
    utf8_bytes = sum(len(t.encode()) for t in texts)
    return {
        "heldout_documents": len(texts),
        "heldout_tokens": tokens,
        "characters_per_token": round(characters / max(tokens, 1), 4),
        "bytes_per_token": round(utf8_bytes / max(tokens, 1), 4),
    }


def tokenize_batch(batch: dict, tokenizer) -> dict:
    eos = tokenizer.eos_token_id
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [[*row, eos] for row in ids]}


def pack_blocks(token_chunks, block_size: int, pad_id: int) -> tuple[np.ndarray, int]:
    """Cut a stream of token arrays into rows of block_size; the last row is filled with pad_id.

    Every token appears exactly once, in order; returns the blocks and the number of pad tokens.
    """
    rows, carry = [], np.zeros(0, dtype=np.int64)
    for chunk in token_chunks:
        flat = np.concatenate([carry, np.asarray(chunk, dtype=np.int64)])
        full = len(flat) // block_size * block_size
        rows.append(flat[:full].reshape(-1, block_size))
        carry = flat[full:]
    padding = 0
    if carry.size:
        padding = block_size - carry.size
        rows.append(np.concatenate([carry, np.full(padding, pad_id, dtype=np.int64)]).reshape(1, block_size))
    blocks = np.concatenate(rows) if rows else np.zeros((0, block_size), dtype=np.int64)
    return blocks, padding


def _flat_tokens(tokenized) -> Iterator[np.ndarray]:
    import pyarrow.compute as pc

    for chunk in tokenized.flatten_indices().data.column("input_ids").chunks:
        yield pc.list_flatten(chunk).to_numpy()


def tokenize_and_pack(documents, tokenizer, block_size: int, map_kwargs: dict):
    """Tokenize every document (EOS after each) and pack each split into blocks of block_size."""
    import datasets
    import pyarrow as pa

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    splits, stats = {}, {"block_size": block_size}
    for name, split in documents.items():
        tokenized = split.map(
            tokenize_batch,
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=split.column_names,
            desc=f"Tokenizing {name}",
            **map_kwargs,
        )
        blocks, padding = pack_blocks(_flat_tokens(tokenized), block_size, pad_id)
        dtype = pa.int32() if len(tokenizer) < 2**31 else pa.int64()
        values = pa.array(blocks.ravel(), type=dtype)
        offsets = pa.array(np.arange(0, len(values) + 1, block_size, dtype=np.int32))
        table = pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, values)], names=["input_ids"])
        splits[name] = datasets.Dataset(table)
        stats[name] = {
            "documents": len(split),
            "tokens": int(blocks.size - padding),
            "blocks": int(len(blocks)),
            "padding_tokens": int(padding),
        }
    return datasets.DatasetDict(splits), stats
