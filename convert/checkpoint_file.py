"""Read one weights file (a checkpoint or a LoRA) into a state dict, safely.

``.safetensors`` headers are checked before any loader sees the file, so a header that lies about sizes
or a truncated download ends in one clear error instead of a crash deep inside a loader. Pickles
(``.ckpt``, ``.pt``, ...) can run code when unpickled: they are refused unless the user allows them, and
even then read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from pathlib import Path

from sdlite.errors import InputError, summarize

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}

# Bytes per element of each safetensors dtype (the format's own list).
_DTYPE_SIZES = {
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
        raise InputError(f"{path}: corrupt safetensors file: header is not valid JSON ({exc.msg})") from None
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
    if dtype not in _DTYPE_SIZES:
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
    expected = math.prod(shape) * _DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise InputError(f"{bad} spans {end - begin} bytes, but {dtype} {shape} needs {expected}")


def refuse_pickle(path: Path) -> InputError:
    """The error for a pickle given without ``--allow-pickle``."""
    return InputError(
        f"{path}: pickle files ({path.suffix}) can run code when loaded; use a .safetensors file, "
        "or pass --allow-pickle if you trust this file (sdlite then reads tensors only)"
    )


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's long weights_only message that names what was refused."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if match:
        return f"it calls {match.group(1)}"
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
    return match.group(1).strip()[:120] if match else "not a plain tensor file"


def _load_pickle(path: Path) -> dict:
    import pickle

    import torch

    try:
        # weights_only: torch's restricted unpickler rebuilds tensors and containers and rejects any
        # other global (os.system, ...), so nothing in the file gets to run.
        with warnings.catch_warnings():
            # torch warns about pickle protocols it was not written for; the error (if any) says enough.
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path}: refused: this pickle holds more than tensors and could run code when loaded "
            f"({_unpickler_reason(exc)}); re-save it as .safetensors from a trusted environment"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable torch checkpoint ({summarize(exc)})") from None
    # Lightning/LDM checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}.
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict:
    """Load the tensors of ``path`` (``.safetensors``, or a pickle when ``allow_pickle``) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise refuse_pickle(path)
        return _load_pickle(path)
    if suffix != ".safetensors":
        raise InputError(f"{path}: expected a .safetensors file (or a pickle with --allow-pickle)")
    read_safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable safetensors file ({summarize(exc)})") from None


def tensor_data_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's tensor bytes (the header left out), as kohya's and A1111's LoRA hash.

    For other files: the whole file's sha256.
    """
    import hashlib

    from sdlite.hashing import sha256_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + header_len)
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
