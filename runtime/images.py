"""Conversions between decoded arrays and PIL images, and PNG writing with the infotext chunk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from sdlite.errors import InputError

INFOTEXT_KEY = "parameters"


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(batch, H, W, 3) floats in 0..1 -> 8-bit RGB images, rounded as diffusers rounds."""
    pixels = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(image) for image in pixels]


def check_output_path(path: str | Path) -> Path:
    """Fail before any work when an output file could not be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist; create it or choose another output path")
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: output must be a .png file")
    return path


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG, with its ``info["parameters"]`` infotext in a text chunk.

    Written to a temporary file in the same folder and renamed, so no half-written PNG is ever left."""
    path = check_output_path(path)
    info = PngImagePlugin.PngInfo()
    if INFOTEXT_KEY in image.info:
        info.add_text(INFOTEXT_KEY, image.info[INFOTEXT_KEY])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=info)
        # mkstemp creates the file private (0600); give it the permissions a normal open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
