"""What a generation returns: the images as before, plus the safety checker's per-image flags.

diffusers' pipelines return ``StableDiffusionPipelineOutput(images, nsfw_content_detected)``; sdlite keeps
returning a plain list of PIL images (or a float array for ``output_type="np"``) and hangs the same
``nsfw_content_detected`` on it, so existing callers see no difference.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image


class Images(list):
    """A list of PIL images with ``nsfw_content_detected``: one flag per image from the model's safety checker
    (a flagged image is black), or None when no checker ran (the folder has none, or it was turned off)."""

    def __init__(self, images: Iterable[Image.Image] = (), nsfw_content_detected: list[bool] | None = None):
        super().__init__(images)
        self.nsfw_content_detected = nsfw_content_detected


class ImageArray(np.ndarray):
    """The float images (N, H, W, 3) in 0..1 of ``output_type="np"``, with ``nsfw_content_detected`` as ``Images``."""

    nsfw_content_detected: list[bool] | None = None

    @classmethod
    def of(cls, images: np.ndarray, nsfw_content_detected: list[bool] | None) -> ImageArray:
        """View ``images`` as a result carrying the flags (no copy)."""
        result = np.asarray(images).view(cls)
        result.nsfw_content_detected = nsfw_content_detected
        return result

    def __array_finalize__(self, obj) -> None:
        # Arrays derived from a result (a slice, a difference) are not results of a generation: no flags.
        self.nsfw_content_detected = None
