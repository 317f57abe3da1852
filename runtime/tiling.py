"""Overlapping tiles with linear blending, so that the VAE works on images larger than memory allows.

The VAE decoder's activations grow with the image (at 1024x1024 one 128-channel fp32 feature map is
512 MB); decoding in fixed-size tiles bounds them. Tiles overlap and are blended with linear ramps so
seams do not show; the VAE's mid-block attention then sees one tile at a time, which is why tiled output
differs slightly from untiled output (diffusers' ``AutoencoderKL.enable_tiling`` makes the same trade).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared cells."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends flush with the border
    return starts


def _ramp(size: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """Weights along one axis: rising over ``overlap`` cells at an inner start, falling at an inner end."""
    weights = np.ones(size, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if not at_start:
            weights[:overlap] = np.minimum(weights[:overlap], ramp)
        if not at_end:
            weights[-overlap:] = np.minimum(weights[-overlap:], ramp[::-1])
    return weights


def run_tiled(
    x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], tile: int, overlap: int, scale: float
) -> np.ndarray:
    """Apply ``fn`` (which maps (N, C, h, w) to (N, C', h*scale, w*scale)) tile by tile over ``x``'s last two
    axes and blend the results; ``tile`` and ``overlap`` are in ``x``'s cells."""
    height, width = x.shape[-2:]
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = weight_sum = None
    for top in rows:
        for left in cols:
            piece = fn(x[..., top : top + tile, left : left + tile])
            if out is None:
                out_shape = (*piece.shape[:-2], round(height * scale), round(width * scale))
                out = np.zeros(out_shape, dtype=np.float32)
                weight_sum = np.zeros(out_shape[-2:], dtype=np.float32)
            ph, pw = piece.shape[-2:]
            o_top, o_left, o_lap = round(top * scale), round(left * scale), round(overlap * scale)
            weight = np.outer(
                _ramp(ph, o_lap, top == 0, top + tile >= height),
                _ramp(pw, o_lap, left == 0, left + tile >= width),
            )
            out[..., o_top : o_top + ph, o_left : o_left + pw] += piece * weight
            weight_sum[o_top : o_top + ph, o_left : o_left + pw] += weight
    return out / weight_sum
