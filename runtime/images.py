"""Conversions between decoded arrays and PIL images, and PNG writing with the infotext chunk."""

from __future__ import annotations

import base64
import io
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


def _png_text(image: Image.Image) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if INFOTEXT_KEY in image.info:
        info.add_text(INFOTEXT_KEY, image.info[INFOTEXT_KEY])
    return info


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG, with its ``info["parameters"]`` infotext in a text chunk."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_text(image))
    return buffer.getvalue()


def png_base64(image: Image.Image) -> str:
    """:func:`png_bytes` as base64 text, as HTTP APIs carry images (no ``data:`` prefix)."""
    return base64.b64encode(png_bytes(image)).decode()


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG, with its ``info["parameters"]`` infotext in a text chunk.

    Written to a temporary file in the same folder and renamed, so no half-written PNG is ever left."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=_png_text(image))
        # mkstemp creates the file private (0600); give it the permissions a normal open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


RESIZE_MODES = ("fit", "crop", "pad")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with a one-line error for a missing or unreadable file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


def resize_to(image: Image.Image, size: tuple[int, int], mode: str = "fit") -> Image.Image:
    """Bring ``image`` to ``size`` (W, H): ``fit`` stretches, ``crop`` scales to cover then centre-crops,
    ``pad`` scales to fit inside then extends the edge pixels."""
    if mode not in RESIZE_MODES:
        raise InputError(f"--resize {mode}: unknown; known: {', '.join(RESIZE_MODES)}")
    if image.size == size:
        return image
    width, height = size
    if mode == "fit":
        return image.resize(size, Image.LANCZOS)
    scale = (max if mode == "crop" else min)(width / image.width, height / image.height)
    scaled = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    if mode == "crop":
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    pixels = np.asarray(scaled)
    pad_x, pad_y = width - scaled.width, height - scaled.height
    padding = ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0))
    return Image.fromarray(np.pad(pixels, padding, mode="edge"))


def working_size(image: Image.Image, mode: str) -> tuple[int, int]:
    """The multiple-of-8 size an input image is brought to when no size is given: rounded down for
    ``crop``, up for ``pad``, to the nearest for ``fit``."""
    rounding = {"crop": lambda v: v // 8 * 8, "pad": lambda v: -(-v // 8) * 8, "fit": lambda v: round(v / 8) * 8}
    if mode not in rounding:
        raise InputError(f"--resize {mode}: unknown; known: {', '.join(RESIZE_MODES)}")
    return max(8, rounding[mode](image.width)), max(8, rounding[mode](image.height))


def to_pixels(image: Image.Image) -> np.ndarray:
    """An RGB image -> (1, 3, H, W) floats in -1..1, as the VAE encoder takes them."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (array * 2.0 - 1.0).transpose(2, 0, 1)[None]


def to_unit(image: Image.Image) -> np.ndarray:
    """An RGB image -> (H, W, 3) floats in 0..1."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
