"""``.safetensors`` files read with numpy alone, after checking their header against the file.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor's name to its
dtype, shape and ``data_offsets`` (begin, end) within the data section, then the raw little-endian data.
The header is checked before anything is read, so a header that lies about sizes or a truncated download
ends in one clear ``InputError`` instead of a crash deep inside a loader. ``sdlite.convert`` uses the same
check before handing a file to torch.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from sdlite.errors import InputError

__all__ = ["PICKLE_SUFFIXES", "read_safetensors", "read_safetensors_header"]

# Suffixes of PyTorch pickle files (checkpoints, embeddings), which can run code when loaded: never read here.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})

# Bytes per element of each safetensors dtype (the format's own list).
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# The dtypes numpy reads directly (the file is little-endian whatever the machine).
_NUMPY_DTYPES = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "I64": "<i8",
    "U64": "<u8",
    "F64": "<f8",
}
# The safetensors format caps its JSON header at 100 MB; a bigger length field is a corrupt file.
_MAX_HEADER = 100_000_000


def read_safetensors_header(path: str | Path) -> dict:
    """Return the JSON header of a ``.safetensors`` file after checking it against the file's size.

    Checks: the 8-byte little-endian header length fits in the file; the header is a JSON object; every
    tensor has a known dtype, a shape, and ``data_offsets`` that lie inside the data section and span
    exactly ``prod(shape) * dtype size`` bytes. Raises ``InputError`` naming the first problem found.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise InputError(f"{path}: not a safetensors file ({size} bytes; truncated?)")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            raise InputError(
                f"{path}: corrupt safetensors file: header length {header_len} exceeds the file's "
                f"{size} bytes (truncated or not a safetensors file)"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise InputError(f"{path}: corrupt safetensors file: header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors file: header is not a JSON object")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_tensor_entry(path, name, info, data_size)
    return header


def _check_tensor_entry(path: Path, name: str, info: object, data_size: int) -> None:
    """One header entry: dtype, shape and offsets consistent with each other and with the file."""
    bad = f"{path}: corrupt safetensors file: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise InputError(f"{bad} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise InputError(f"{bad} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InputError(f"{bad} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise InputError(f"{bad} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise InputError(f"{bad} has invalid data_offsets {offsets!r}")
    if end > data_size:
        raise InputError(
            f"{bad} ends at byte {end} of the data section, but the file holds only {data_size} data bytes "
            "(truncated download?)"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise InputError(f"{bad} spans {end - begin} bytes, but {dtype} {shape} needs {expected}")


def _to_numpy(raw: bytes, dtype: str, shape: list[int], path: Path, name: str) -> np.ndarray:
    if dtype == "BF16":
        # bfloat16 is the upper half of a float32: widen exactly by shifting the bits into place.
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype not in _NUMPY_DTYPES:
        raise InputError(f"{path}: tensor {name!r} has dtype {dtype}, which sdlite does not read")
    return np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype]).reshape(shape).copy()


def read_safetensors(path: str | Path, max_bytes: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a ``.safetensors`` file as numpy arrays (bfloat16 widened to float32) and its
    ``__metadata__``. ``max_bytes`` refuses files whose data section is larger (a guard for callers that
    expect small files, such as embeddings, against loading a whole checkpoint by mistake)."""
    path = Path(path)
    header = read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    entries = {name: info for name, info in header.items() if name != "__metadata__"}
    data_bytes = max((info["data_offsets"][1] for info in entries.values()), default=0)
    if max_bytes is not None and data_bytes > max_bytes:
        raise InputError(f"{path}: {data_bytes} bytes of tensors; expected at most {max_bytes}")
    tensors: dict[str, np.ndarray] = {}
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        start = 8 + header_len
        for name, info in entries.items():
            begin, end = info["data_offsets"]
            fh.seek(start + begin)
            tensors[name] = _to_numpy(fh.read(end - begin), info["dtype"], info["shape"], path, name)
    if not isinstance(metadata, dict):
        metadata = {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}
