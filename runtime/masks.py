"""Masks for inpainting and outpainting: loading, blurring, the "only masked" crop, pasting back.

Conventions follow AUTOMATIC1111: white (>= 0.5) marks what to repaint; the mask is blurred by
``mask_blur`` pixels, the U-Net is conditioned on the blurred mask binarized at 0.5 (as diffusers does),
and the result is pasted back over the original through the blurred mask, so pixels where the blurred
mask is 0 stay exactly the original's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from sdlite.errors import InputError


def prepare_mask(mask: Image.Image, size: tuple[int, int], blur: int) -> np.ndarray:
    """Grayscale mask at ``size`` (W, H), Gaussian-blurred by ``blur`` pixels, as floats in 0..1 (H, W)."""
    if blur < 0:
        raise InputError(f"--mask-blur {blur}: must be 0 or more")
    gray = mask.convert("L")
    if gray.size != size:
        raise InputError(
            f"mask is {gray.size[0]}x{gray.size[1]} but the image is {size[0]}x{size[1]}; they must be the same size"
        )
    if blur:
        gray = gray.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(gray, dtype=np.float32) / 255.0


def check_not_empty(mask: np.ndarray) -> None:
    """An all-black mask would repaint nothing: say so rather than return the input unchanged."""
    if not (mask >= 0.5).any():
        raise InputError("the mask is empty (no white pixels): nothing to inpaint")


def paste_back(original: np.ndarray, generated: np.ndarray, soft_mask: np.ndarray) -> np.ndarray:
    """original * (1 - m) + generated * m, on (H, W, 3) floats; exact where m is 0."""
    m = soft_mask[..., None]
    out = original * (1.0 - m) + generated * m
    return np.where(m == 0.0, original, out)


@dataclass(frozen=True)
class Region:
    """A pixel box (left, top, right, bottom), right/bottom exclusive."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.right - self.left, self.bottom - self.top


def masked_region(mask: np.ndarray, padding: int, aspect: float) -> Region:
    """The bounding box of the mask grown by ``padding`` and then to the working size's aspect ratio
    (width / height), clipped to the image, for "inpaint only masked"."""
    if padding < 0:
        raise InputError(f"--padding {padding}: must be 0 or more")
    height, width = mask.shape
    ys, xs = np.nonzero(mask > 0)
    left, right = max(int(xs.min()) - padding, 0), min(int(xs.max()) + 1 + padding, width)
    top, bottom = max(int(ys.min()) - padding, 0), min(int(ys.max()) + 1 + padding, height)
    box_w, box_h = right - left, bottom - top
    # Grow the short side around the centre so the crop resizes to the working size without distortion.
    if box_w / box_h < aspect:
        box_w = min(round(box_h * aspect), width)
    else:
        box_h = min(round(box_w / aspect), height)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(round(cx - box_w / 2), 0), width - box_w))
    top = int(min(max(round(cy - box_h / 2), 0), height - box_h))
    return Region(left, top, left + box_w, top + box_h)


def check_extend(extend: tuple[int, int, int, int]) -> None:
    """(left, top, right, bottom): four non-negative whole multiples of 8, not all 0."""
    if len(extend) != 4 or any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0 for e in extend):
        raise InputError(f"--extend {extend}: expected four non-negative numbers LEFT,TOP,RIGHT,BOTTOM")
    if not any(extend):
        raise InputError("--extend 0,0,0,0: nothing to outpaint; grow at least one side")
    if any(e % 8 for e in extend):
        raise InputError(f"--extend {','.join(map(str, extend))}: each extension must be a multiple of 8")


def outpaint_canvas(
    image: Image.Image, extend: tuple[int, int, int, int], seam: int
) -> tuple[Image.Image, Image.Image]:
    """Grow ``image`` by (left, top, right, bottom) pixels, filling the new area by repeating the edge
    pixels, and return it with the mask of what to paint: the new area plus a ``seam``-pixel band of the
    original along each grown side, so the border is repainted and blends."""
    check_extend(extend)
    left, top, right, bottom = extend
    pixels = np.asarray(image.convert("RGB"))
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.ones(canvas.shape[:2], dtype=np.uint8) * 255
    height, width = pixels.shape[:2]
    keep_top, keep_left = top + (seam if top else 0), left + (seam if left else 0)
    keep_bottom, keep_right = top + height - (seam if bottom else 0), left + width - (seam if right else 0)
    mask[keep_top:keep_bottom, keep_left:keep_right] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)
