"""File hashes as AUTOMATIC1111 reports them ("Model hash" is the first 10 hex digits of sha256)."""

from __future__ import annotations

import hashlib
import struct
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


def tensor_data_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's tensor bytes (the header left out): kohya's and A1111's LoRA hash, which
    survives edits of the file's metadata. For other files: the whole file's sha256."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + header_len)
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
