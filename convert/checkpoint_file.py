"""Read one weights file (a checkpoint or a LoRA) into a state dict, safely.

``.safetensors`` headers are checked before any loader sees the file, so a header that lies about sizes
or a truncated download ends in one clear error instead of a crash deep inside a loader. Pickles
(``.ckpt``, ``.pt``, ...) can run code when unpickled: they are refused unless the user allows them, and
even then read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from sdlite.errors import InputError, summarize

# The header check and the pickle suffixes live in the torch-free runtime, which reads embeddings with them;
# re-exported here.
from sdlite.safetensors_file import PICKLE_SUFFIXES, read_safetensors_header

__all__ = ["PICKLE_SUFFIXES", "open_state_dict", "read_safetensors_header", "read_state_dict", "refuse_pickle"]


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


class _LazyTensors(Mapping):
    """A ``.safetensors`` file's tensors by name, each read from the file when it is asked for."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: unreadable safetensors file ({summarize(exc)})") from None
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str):
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _check_path(path: Path, allow_pickle: bool) -> str:
    """The file's lower-case suffix, once it is known to exist and be of a readable kind."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise refuse_pickle(path)
    elif suffix != ".safetensors":
        raise InputError(f"{path}: expected a .safetensors file (or a pickle with --allow-pickle)")
    return suffix


def open_state_dict(path: str | Path, allow_pickle: bool = False) -> Mapping:
    """The tensors of ``path`` as a mapping; a ``.safetensors`` file's are read one at a time when asked for
    (a multi-GB checkpoint is never held whole), a pickle's all at once (the format allows nothing else)."""
    path = Path(path)
    if _check_path(path, allow_pickle) in PICKLE_SUFFIXES:
        return _load_pickle(path)
    read_safetensors_header(path)
    return _LazyTensors(path)


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict:
    """Load the tensors of ``path`` (``.safetensors``, or a pickle when ``allow_pickle``) on the CPU."""
    path = Path(path)
    if _check_path(path, allow_pickle) in PICKLE_SUFFIXES:
        return _load_pickle(path)
    read_safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable safetensors file ({summarize(exc)})") from None
