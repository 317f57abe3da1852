"""Write an output folder atomically: build it in a hidden temporary sibling, rename at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it becomes ``out``, on any error
    (KeyboardInterrupt included) it is removed, so no half-written folder is ever left at ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: output folder already exists; choose a new path or remove it")
    if not out.parent.exists():
        raise FileNotFoundError(f"{out.parent}: parent folder of the output does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        # mkdtemp makes the folder private (0700); give it the permissions a normal mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
