"""File hashes as AUTOMATIC1111 reports them ("Model hash" is the first 10 hex digits of sha256)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks so big checkpoints stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(sha256_hex: str) -> str:
    """The 10-digit form A1111 writes in the infotext."""
    return sha256_hex[:10]
