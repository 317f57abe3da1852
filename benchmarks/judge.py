"""An independent judge of shapes images: what colour is the background, what colour is the shape and
which shape is it. It shares nothing with the model (numpy only, no torch):

* background colour: the median of the image's 3-pixel border, snapped to the nearest palette colour;
* shape colour: the median of the pixels that differ clearly from the background, snapped likewise;
* shape: three geometric features of that foreground mask (fill ratio of its bounding box, width of its
  top rows against its bottom rows, fill of the box's corners), classified by a nearest-centroid
  classifier fitted on ground-truth images drawn by :mod:`sdlite.models.shapes_data`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from sdlite.models.shapes_data import COLOURS, PALETTE, SHAPES, Attributes, random_attributes, render

_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
# A pixel belongs to the shape when it is this far (RGB Euclidean) from the background colour; palette
# colours are >= ~150 apart, VAE/sampling noise is well below this.
_FOREGROUND_DISTANCE = 60.0
_BORDER = 3


@dataclass(frozen=True)
class Verdict:
    """What the judge sees in one image ("none" when there is no shape at all)."""

    shape: str
    colour: str
    background: str


def _nearest_colour(rgb: np.ndarray) -> str:
    return COLOURS[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _foreground(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    border = np.concatenate(
        [
            arr[:_BORDER].reshape(-1, 3),
            arr[-_BORDER:].reshape(-1, 3),
            arr[:, :_BORDER].reshape(-1, 3),
            arr[:, -_BORDER:].reshape(-1, 3),
        ]
    )
    bg = np.median(border, axis=0)
    mask = np.sqrt(((arr - bg) ** 2).sum(axis=2)) > _FOREGROUND_DISTANCE
    return bg, mask


def shape_features(mask: np.ndarray) -> np.ndarray | None:
    """Geometric features of a foreground mask, or None when it is (nearly) empty."""
    if mask.sum() < 12:
        return None
    ys, xs = np.nonzero(mask)
    # Percentiles rather than min/max so that a few stray pixels do not stretch the box.
    y0, y1 = np.percentile(ys, [1, 99]).round().astype(int)
    x0, x1 = np.percentile(xs, [1, 99]).round().astype(int)
    box = mask[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    h, w = box.shape
    if h < 3 or w < 3:
        return None
    fill = box.mean()
    q = max(1, h // 4)
    top_bottom = box[:q].mean() / max(box[-q:].mean(), 1e-3)
    cy, cx = max(1, h // 5), max(1, w // 5)
    corners = np.mean([box[:cy, :cx].mean(), box[:cy, -cx:].mean(), box[-cy:, :cx].mean(), box[-cy:, -cx:].mean()])
    return np.array([fill, min(top_bottom, 2.0), corners], dtype=np.float32)


@lru_cache(maxsize=1)
def _classifier(n_per_shape: int = 60, seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit the nearest-centroid shape classifier on ground-truth images (centroids, mean, std)."""
    rng = random.Random(seed)
    feats: dict[str, list[np.ndarray]] = {s: [] for s in SHAPES}
    while min(len(v) for v in feats.values()) < n_per_shape:
        a = random_attributes(rng, held_out=None)
        img = render(a, (rng.randint(-3, 3), rng.randint(-3, 3)))
        f = shape_features(_foreground(np.asarray(img, dtype=np.float32))[1])
        if f is not None and len(feats[a.shape]) < n_per_shape:
            feats[a.shape].append(f)
    allf = np.concatenate([np.stack(v) for v in feats.values()])
    mean, std = allf.mean(axis=0), allf.std(axis=0) + 1e-6
    centroids = np.stack([((np.stack(feats[s]) - mean) / std).mean(axis=0) for s in SHAPES])
    return centroids, mean, std


def position(image: Image.Image | np.ndarray) -> str:
    """Where the shape sits: "center", "top left", ... ("none" without a shape), read from the centre of
    the foreground's bounding box (not its centroid, which sits low in a triangle). Ground-truth boxes are
    centred at 32, 24/40 (large) or 16/48 (small), each +-3 px of jitter, so 28.5..35.5 reads as central."""
    mask = _foreground(np.asarray(image, dtype=np.float32)[..., :3])[1]
    if mask.sum() < 12:
        return "none"
    ys, xs = np.nonzero(mask)
    cy, cx = ((v.min() + v.max() + 1) / 2 * 64 / mask.shape[i] for i, v in enumerate((ys, xs)))
    vertical = "top" if cy < 28.5 else "bottom" if cy > 35.5 else ""
    horizontal = "left" if cx < 28.5 else "right" if cx > 35.5 else ""
    return f"{vertical} {horizontal}" if vertical and horizontal else "center"


def judge(image: Image.Image | np.ndarray) -> Verdict:
    """Judge one RGB image (any size; shapes images are 64x64)."""
    arr = np.asarray(image, dtype=np.float32)[..., :3]
    bg, mask = _foreground(arr)
    background = _nearest_colour(bg)
    feats = shape_features(mask)
    if feats is None:
        return Verdict("none", "none", background)
    colour = _nearest_colour(np.median(arr[mask], axis=0))
    centroids, mean, std = _classifier()
    shape = SHAPES[int(np.argmin((((feats - mean) / std - centroids) ** 2).sum(axis=1)))]
    return Verdict(shape, colour, background)


def score(verdicts: list[Verdict], targets: list[Attributes]) -> dict[str, float]:
    """Fractions correct: shape colour, background colour, shape, and all three together."""
    n = max(len(targets), 1)
    pairs = list(zip(verdicts, targets, strict=True))
    return {
        "colour": sum(v.colour == t.colour for v, t in pairs) / n,
        "background": sum(v.background == t.background for v, t in pairs) / n,
        "shape": sum(v.shape == t.shape for v, t in pairs) / n,
        "all": sum(v.colour == t.colour and v.background == t.background and v.shape == t.shape for v, t in pairs) / n,
    }
