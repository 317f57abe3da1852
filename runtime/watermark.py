"""Invisible watermark that the ``invisible-watermark`` package's ``dwtDct`` decoder reads back.

The original Stable Diffusion scripts (CompVis ``scripts/txt2img.py``) marked every image with
``WatermarkEncoder().set_watermark("bytes", b"StableDiffusionV1")`` and ``encode(bgr, "dwtDct")``; anyone
can read the mark back with ``WatermarkDecoder("bytes", 136).decode(bgr, "dwtDct")``. This module writes that
mark in numpy, so the runtime needs neither OpenCV nor PyWavelets. It follows invisible-watermark 0.1.5 to
0.2.0 (MIT licence, ``imwatermark/maxDct.py``), whose ``dwtDct`` method works like this:

1. BGR -> YUV with OpenCV's 8-bit fixed-point BT.601 conversion (``cv2.COLOR_BGR2YUV``; coefficients
   scaled by 2**14 in ``color_yuv.simd.hpp``), result kept as uint8.
2. For each channel whose scale is positive -- the defaults are (Y: 0, U: 36, V: 36), but the loop visits only
   channels 0 and 1, so only U is marked -- a one-level 2-D Haar DWT (``pywt.dwt2``) of the top-left
   multiple-of-4 crop.
3. The approximation band is cut into 4x4 blocks, row-major; block ``k`` carries bit ``k mod len(bits)``. In
   each block the coefficient of largest magnitude other than the block's first is requantised to
   ``(floor(|v| / 36) + 0.25 + 0.5 * bit) * 36`` with ``v``'s sign. (Despite the name, no DCT is taken.)
4. Inverse DWT with the horizontal and vertical detail bands passed in swapped order (the package calls
   ``idwt2((cA, (cV, cH, cD)))``), which transposes every 2x2 pixel block of U; the floats are written back
   into the uint8 plane, i.e. truncated.
5. YUV -> BGR with OpenCV's fixed-point inverse, rounded and saturated to uint8.

The decoder repeats steps 1-2, takes each block's coefficient of largest magnitude (after the first), reads
``(|v| mod 36) > 18`` and averages the reads of every block that carries a bit.

``encode_watermark(..., method="dwtDct")`` reproduces the package's encoder bit for bit (tested against it).
The default, ``method="robust"``, writes the same bits for the same decoder without the encoder's flaws
(see ``encode_watermark``); that is what ``--watermark`` uses.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdlite.errors import InputError

# What the original Stable Diffusion scripts wrote (CompVis scripts/txt2img.py).
SD_WATERMARK = b"StableDiffusionV1"
# imwatermark's encoder and decoder both refuse images of fewer pixels (``r * c < 256 * 256``).
MIN_PIXELS = 256 * 256
_BLOCK = 4
_U_SCALE = 36.0  # EmbedMaxDct's default scale of the U channel
# OpenCV's BT.601 YUV coefficients, fixed point with 14 fractional bits (color_yuv.simd.hpp).
_SHIFT = 14
_R2Y, _G2Y, _B2Y = 4899, 9617, 1868
_B2U, _R2V = 8061, 14369
_U2B, _U2G, _V2G, _V2R = 33292, -6472, -9519, 18678
_HALF = 128
# pywt's Haar filter taps (1/sqrt(2) as a double); the same products and sums in the same order as pywt's
# C convolution give the same float64 results bit for bit, which matters because step 4 truncates.
_HAAR = np.float64(0.7071067811865476)


def check_watermark_size(width: int, height: int) -> None:
    """Raise a one-line InputError when a ``width`` x ``height`` image is too small to carry a readable mark."""
    if width * height < MIN_PIXELS:
        raise InputError(
            f"--watermark: a {width}x{height} image is too small; the invisible-watermark decoder reads images of "
            f"at least {MIN_PIXELS} pixels (e.g. 256x256); generate a larger image or leave --watermark off"
        )


def payload_bits(payload: bytes) -> np.ndarray:
    """``payload`` as bits, most significant first (``np.unpackbits``, as the package's ``set_by_bytes``)."""
    return np.unpackbits(np.frombuffer(payload, dtype=np.uint8))


def _descale(x: np.ndarray) -> np.ndarray:
    # OpenCV's CV_DESCALE: round to nearest by adding half, then an arithmetic (flooring) shift.
    return (x + (1 << (_SHIFT - 1))) >> _SHIFT


def _rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    y = _descale(r * _R2Y + g * _G2Y + b * _B2Y)
    u = _descale((b - y) * _B2U + (_HALF << _SHIFT))
    v = _descale((r - y) * _R2V + (_HALF << _SHIFT))
    return np.clip(np.stack([y, u, v], axis=-1), 0, 255).astype(np.uint8)


def _yuv_to_rgb(yuv: np.ndarray) -> np.ndarray:
    y, u, v = (yuv[..., i].astype(np.int64) - (0 if i == 0 else _HALF) for i in range(3))
    b = y + _descale(u * _U2B)
    g = y + _descale(u * _U2G + v * _V2G)
    r = y + _descale(v * _V2R)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def _dwt_axis(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One Haar analysis step along ``axis``: (approximation, detail), as pywt computes them."""
    even = np.take(x, np.arange(0, x.shape[axis], 2), axis=axis)
    odd = np.take(x, np.arange(1, x.shape[axis], 2), axis=axis)
    return _HAAR * odd + _HAAR * even, -_HAAR * odd + _HAAR * even


def _idwt_axis(approx: np.ndarray, detail: np.ndarray, axis: int) -> np.ndarray:
    """One Haar synthesis step along ``axis`` (pywt's upsampling convolution: approximation, then detail)."""
    even = _HAAR * approx + _HAAR * detail
    odd = _HAAR * approx + -_HAAR * detail
    shape = list(approx.shape)
    shape[axis] *= 2
    return np.stack([even, odd], axis=axis + 1).reshape(shape)


def _blocks(approx: np.ndarray) -> np.ndarray:
    """The approximation band's whole 4x4 blocks, row-major, as rows of 16 (a copy)."""
    rows, cols = approx.shape[0] // _BLOCK, approx.shape[1] // _BLOCK
    view = approx[: rows * _BLOCK, : cols * _BLOCK]
    return view.reshape(rows, _BLOCK, cols, _BLOCK).transpose(0, 2, 1, 3).reshape(rows * cols, _BLOCK * _BLOCK)


def _unblock(blocks: np.ndarray, approx: np.ndarray) -> None:
    """Write ``_blocks``' rows back into ``approx`` in place."""
    rows, cols = approx.shape[0] // _BLOCK, approx.shape[1] // _BLOCK
    shaped = blocks.reshape(rows, cols, _BLOCK, _BLOCK).transpose(0, 2, 1, 3)
    approx[: rows * _BLOCK, : cols * _BLOCK] = shaped.reshape(rows * _BLOCK, cols * _BLOCK)


def _u_approx(rgb: np.ndarray) -> np.ndarray:
    """The Haar approximation band of the U plane, exactly as the package's decoder computes it."""
    height, width = rgb.shape[:2]
    plane = _rgb_to_yuv(rgb)[: height // _BLOCK * _BLOCK, : width // _BLOCK * _BLOCK, 1].astype(np.float64)
    return _dwt_axis(_dwt_axis(plane, 0)[0], 1)[0]


def _marked_position(blocks: np.ndarray) -> np.ndarray:
    # The coefficient of largest magnitude after the block's first; np.argmax takes the first of equal
    # magnitudes, as the package's per-block np.argmax does.
    return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


def _level(value: np.ndarray, bit: np.ndarray) -> np.ndarray:
    """The package's requantisation of a magnitude: ``(floor(|v| / 36) + 0.25 + 0.5 * bit) * 36``."""
    return (np.abs(value) // _U_SCALE + 0.25 + 0.5 * bit) * _U_SCALE


def _read_blocks(rgb: np.ndarray) -> np.ndarray:
    """The bit the package's decoder reads from each block: ``(|v| mod 36) > 18`` at the marked position."""
    blocks = _blocks(_u_approx(rgb))
    value = blocks[np.arange(len(blocks)), _marked_position(blocks)]
    return np.abs(value) % _U_SCALE > 0.5 * _U_SCALE


def _check_image(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f"watermark: expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
    check_watermark_size(rgb.shape[1], rgb.shape[0])
    return rgb


def _bits(payload: bytes, count: int) -> np.ndarray:
    bits = payload_bits(payload)
    if len(bits) == 0:
        raise InputError("watermark: the payload is empty")
    return bits[np.arange(count) % len(bits)].astype(np.float64)


def _encode_dwtdct(rgb: np.ndarray, payload: bytes) -> np.ndarray:
    """The package's encoder, step for step (see the module docstring)."""
    height, width = rgb.shape[:2]
    yuv = _rgb_to_yuv(rgb)
    crop_h, crop_w = height // _BLOCK * _BLOCK, width // _BLOCK * _BLOCK
    plane = yuv[:crop_h, :crop_w, 1].astype(np.float64)
    # pywt.dwt2 transforms axis 0 and then axis 1; bands named by (axis 0, axis 1): aa, da (cH), ad (cV), dd.
    low, high = _dwt_axis(plane, 0)
    aa, ad = _dwt_axis(low, 1)
    da, dd = _dwt_axis(high, 1)
    blocks = _blocks(aa)
    index = np.arange(len(blocks))
    position = _marked_position(blocks)
    value = blocks[index, position]
    level = _level(value, _bits(payload, len(blocks)))
    blocks[index, position] = np.where(value >= 0.0, level, -level)
    _unblock(blocks, aa)
    # pywt.idwt2 undoes axis 1 first, then axis 0; the package passes cV where cH belongs and vice versa.
    restored = _idwt_axis(_idwt_axis(aa, da, 1), _idwt_axis(ad, dd, 1), 0)
    # numpy's float -> uint8 assignment truncates; the values stay inside 0..255 (8-bit U spans 17..239 and a
    # mark moves a pixel by at most 13.5), the clip only guards the cast.
    yuv[:crop_h, :crop_w, 1] = np.clip(restored, 0, 255).astype(np.uint8)
    return _yuv_to_rgb(yuv)


def _apply_u_change(rgb: np.ndarray, approx_change: np.ndarray) -> np.ndarray:
    """Add a change of the U approximation band to an RGB image, leaving Y and V as they are.

    A change ``d`` of one approximation coefficient is ``d / 2`` on each pixel of its 2x2 group (Haar);
    a change of U is made in RGB through OpenCV's own inverse coefficients (B += 2.032 dU, G -= 0.395 dU),
    which keeps Y and V to within rounding, so pixels whose coefficient is unchanged stay exactly as they were.
    """
    height, width = rgb.shape[:2]
    per_pixel = np.repeat(np.repeat(approx_change / 2.0, 2, axis=0), 2, axis=1)
    change = np.zeros((height, width))
    change[: per_pixel.shape[0], : per_pixel.shape[1]] = per_pixel
    out = rgb.astype(np.float64)
    out[..., 2] += change * (_U2B / (1 << _SHIFT))
    out[..., 1] += change * (_U2G / (1 << _SHIFT))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# The marked coefficient is kept at least this far above every other one in its block, so that rounding
# to 8 bits and the decoder's own YUV conversion (each well under 2 approximation units) cannot move the
# decoder's choice of coefficient.
_MARGIN = 4.0


def _encode_robust(rgb: np.ndarray, payload: bytes) -> np.ndarray:
    """Write the same mark so that the package's decoder reads every block back (see ``encode_watermark``)."""
    approx = _u_approx(rgb)
    blocks = _blocks(approx)
    count = len(blocks)
    index = np.arange(count)
    wanted = _bits(payload, count)
    position = _marked_position(blocks)
    value = blocks[index, position]  # U is never negative, so neither is its approximation band
    others = np.ones_like(blocks, dtype=bool)
    others[:, 0] = False  # the decoder never looks at a block's first coefficient
    others[index, position] = False
    base = _level(value, wanted)
    candidates, costs, reads = [], [], []
    # Three levels that carry the bit: the package's own (within v's step of 36) and one step below and
    # above. Any other coefficient that would come within the margin of the new level is lowered below it.
    for target in (base - _U_SCALE, base, base + _U_SCALE):
        ceiling = (target - _MARGIN)[:, None]
        new = np.where(others & (blocks > ceiling), ceiling, blocks)
        new[index, position] = target
        change = new - blocks
        marked = _apply_u_change(rgb, _unblock_copy(change, approx))
        candidates.append(change)
        # Squared pixel error: a change d of a coefficient is d / 2 on four pixels.
        costs.append(np.where(target >= 0, np.sum(change**2, axis=1), np.inf))
        # Simulate the decoder on the result: clipping in saturated colours can defeat a choice.
        reads.append(_read_blocks(marked) == wanted.astype(bool))
    costs, reads = np.stack(costs), np.stack(reads)
    # The cheapest choice the decoder reads correctly; where none is (e.g. pure white, whose chroma cannot
    # move without clipping), the cheapest one, left to the decoder's vote over the blocks of each bit.
    choice = np.where(reads.any(axis=0), np.argmin(np.where(reads, costs, np.inf), axis=0), np.argmin(costs, axis=0))
    chosen = np.stack(candidates)[choice, index]
    return _apply_u_change(rgb, _unblock_copy(chosen, approx))


def _unblock_copy(blocks: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """A zero band of ``approx``'s shape with ``blocks`` written into its whole blocks."""
    band = np.zeros_like(approx)
    _unblock(blocks, band)
    return band


METHODS = ("robust", "dwtDct")


def encode_watermark(rgb: np.ndarray, payload: bytes = SD_WATERMARK, method: str = "robust") -> np.ndarray:
    """Mark an RGB uint8 image (H, W, 3) with ``payload`` so that invisible-watermark's ``dwtDct`` decoder
    reads it back; returns a new uint8 image.

    ``method="dwtDct"`` is the package's own encoder bit for bit (``WatermarkEncoder().set_watermark("bytes",
    payload)`` then ``encode(bgr, "dwtDct")`` on the image in BGR order). That encoder often lowers the
    coefficient it marks below another one of its block, which the decoder then reads instead; on smooth
    images a quarter of the blocks read wrong and the vote fails. ``method="robust"`` (the default) writes the
    same bits into the same coefficients for the same decoder, but picks, per block, the cheapest of three
    levels that keeps the marked coefficient the block's largest, checks what the decoder will read, and changes
    U through RGB directly, so that unmarked pixels stay untouched. Raises InputError below ``MIN_PIXELS``
    pixels, where the package's encoder and decoder refuse too."""
    rgb = _check_image(rgb)
    if method == "robust":
        return _encode_robust(rgb, payload)
    if method == "dwtDct":
        return _encode_dwtdct(rgb, payload)
    raise InputError(f"watermark method {method!r}: unknown; known: {', '.join(METHODS)}")


def read_watermark(rgb: np.ndarray, length: int = len(SD_WATERMARK)) -> bytes:
    """The ``length``-byte mark the package's decoder reads from an RGB uint8 image: each bit is the mean
    of the bits read from the blocks that carry it, thresholded as ``WatermarkDecoder("bytes", 8 * length)
    .decode(bgr, "dwtDct")`` does (``mean * 255 > 127``)."""
    rgb = _check_image(rgb)
    reads = _read_blocks(rgb).astype(np.float64)
    bits = 8 * length
    if len(reads) < bits:
        raise InputError(f"watermark: the image has {len(reads)} blocks, fewer than the {bits} bits to read")
    means = np.array([reads[i::bits].mean() for i in range(bits)])
    return np.packbits(means * 255 > 127).tobytes()


def watermark_image(image: Image.Image, payload: bytes = SD_WATERMARK, method: str = "robust") -> Image.Image:
    """``encode_watermark`` on a PIL image; the result keeps the image's ``info`` (its infotext)."""
    marked = Image.fromarray(encode_watermark(np.asarray(image.convert("RGB")), payload, method))
    marked.info.update(image.info)
    return marked
