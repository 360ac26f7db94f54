"""The one way Trellis fingerprints what a result was made from: values as canonical JSON, files by content."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import xxhash


def content_hash(value: Any) -> str:
    """A short, stable hash of a JSON-able value (dict key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_stamps(path: str, hash_up_to_bytes: int | None = None) -> dict[str, str]:
    """Each file of `path` (a file, or every file under a directory) with the hash of its content, so
    rewriting the same bytes changes nothing. Files over `hash_up_to_bytes` are known by size and
    modification time instead (a multi-GB input is not read again on every check)."""
    if os.path.isdir(path):
        stamps = {}
        for root, _, files in os.walk(path):
            for name in sorted(files):
                stamps.update(file_stamps(os.path.join(root, name), hash_up_to_bytes))
        return stamps
    stat = os.stat(path)
    if hash_up_to_bytes is not None and stat.st_size > hash_up_to_bytes:
        return {path: f"{stat.st_size}:{stat.st_mtime_ns}"}
    digest = xxhash.xxh3_128()  # files can be GBs: xxh3 reads at memory speed
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return {path: digest.hexdigest()}
