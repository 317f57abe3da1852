"""The checkpoint's safety checker: flags images, which are then replaced by black ones.

The graph is diffusers' ``StableDiffusionSafetyChecker`` (a CLIP vision tower whose image embedding is compared
with concept embeddings and their thresholds) as ``sdlite convert`` exports it, with the inputs and outputs of
diffusers' own ONNX export (``clip_input``, ``images`` -> ``out_images``, ``has_nsfw_concepts``), so folders
from diffusers' ONNX conversion script run too. Its input is prepared here in numpy and PIL exactly as
``transformers.CLIPImageProcessor`` prepares it from the 8-bit images diffusers hands it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdlite.engines import Engine
from sdlite.errors import InputError

# CLIPImageProcessor's defaults (transformers ``image_processing_clip.py``, OpenAI CLIP's mean and std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DEFAULTS = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": int(Image.Resampling.BICUBIC),
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}


@dataclass(frozen=True)
class ClipPreprocessing:
    """What ``CLIPImageProcessor`` does to an image, read from its ``preprocessor_config.json``."""

    resize: bool
    shortest_edge: int | None  # resize the shorter side to this, keeping the aspect ratio ...
    resize_to: tuple[int, int] | None  # ... or to this (height, width)
    resample: int
    center_crop: bool
    crop: tuple[int, int]  # height, width
    rescale: bool
    rescale_factor: float
    normalize: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: dict) -> ClipPreprocessing:
        """Parse a ``preprocessor_config.json`` (old ``CLIPFeatureExtractor`` form with int sizes too)."""
        c = {**_DEFAULTS, **config}
        size = c["size"]
        # transformers' get_size_dict: an int size is the shortest edge here, an int crop size a square.
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = c["crop_size"]
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if "shortest_edge" not in size and not {"height", "width"} <= set(size):
            raise InputError(f"feature extractor size {size}: expected shortest_edge or height and width")
        return cls(
            resize=bool(c["do_resize"]),
            shortest_edge=size.get("shortest_edge"),
            resize_to=None if "shortest_edge" in size else (int(size["height"]), int(size["width"])),
            resample=int(c["resample"]),
            center_crop=bool(c["do_center_crop"]),
            crop=(int(crop["height"]), int(crop["width"])),
            rescale=bool(c["do_rescale"]),
            rescale_factor=float(c["rescale_factor"]),
            normalize=bool(c["do_normalize"]),
            mean=tuple(float(v) for v in c["image_mean"]),
            std=tuple(float(v) for v in c["image_std"]),
        )

    def _resized(self, image: Image.Image) -> Image.Image:
        if self.resize_to is not None:
            height, width = self.resize_to
        else:
            # transformers' get_resize_output_image_size (default_to_square=False): the long side is truncated.
            short, long = sorted((image.width, image.height))
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            width, height = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
        # transformers resizes with PIL on the 8-bit image (transformers image_transforms.resize).
        return image.resize((width, height), resample=Image.Resampling(self.resample))

    def _cropped(self, pixels: np.ndarray) -> np.ndarray:
        """transformers' center_crop: top-left at (size - crop) // 2, zero padding where the image is smaller."""
        height, width = pixels.shape[:2]
        crop_h, crop_w = self.crop
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:
            top, left = -(-pad_h // 2), -(-pad_w // 2)  # ceil, as transformers pads
            padded = np.zeros((height + pad_h, width + pad_w, pixels.shape[2]), pixels.dtype)
            padded[top : top + height, left : left + width] = pixels
            pixels, (height, width) = padded, padded.shape[:2]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return pixels[top : top + crop_h, left : left + crop_w]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """8-bit RGB images (N, H, W, 3) -> ``clip_input`` (N, 3, crop_h, crop_w) float32."""
        batch = []
        for image in images:
            pil = Image.fromarray(image)
            pixels = np.asarray(self._resized(pil) if self.resize else pil)
            if self.center_crop:
                pixels = self._cropped(pixels)
            # transformers' rescale multiplies in float64 and casts to float32; normalize stays in float32.
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.rescale else pixels
            values = values.astype(np.float32)
            if self.normalize:
                values = (values - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            batch.append(values.transpose(2, 0, 1))
        return np.stack(batch).astype(np.float32)


def load_preprocessing(folder: Path) -> ClipPreprocessing:
    """The model folder's ``feature_extractor/preprocessor_config.json``, or CLIP's defaults without one."""
    path = folder / "feature_extractor" / "preprocessor_config.json"
    if not path.is_file():
        return ClipPreprocessing.from_config({})
    try:
        return ClipPreprocessing.from_config(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable CLIP preprocessor config ({exc})") from None


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Decoded images in 0..1 -> 8-bit, rounded as diffusers' ``numpy_to_pil`` (and sdlite's ``to_pil``) round."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def check_images(
    images: np.ndarray, engine: Callable[[], Engine], preprocessing: ClipPreprocessing
) -> tuple[np.ndarray, list[bool]]:
    """Run the safety checker on decoded images (N, H, W, 3) in 0..1.

    Returns the images with every flagged one replaced by black (zeros) and the per-image flags, as diffusers'
    pipelines return ``(images, has_nsfw_concept)``. ``engine()`` gives the loaded checker graph. Images go in
    one at a time, as diffusers' ONNX pipeline sends them (its exported checkers do not all take batches)."""
    clip_input = preprocessing(to_uint8(images))
    checker = engine()
    flags = []
    for i in range(len(images)):
        outputs = checker.run({"clip_input": clip_input[i : i + 1], "images": images[i : i + 1].astype(np.float32)})
        flags.append(bool(np.asarray(outputs["has_nsfw_concepts"]).reshape(-1)[0]))
    checked = images.copy()
    checked[np.asarray(flags, dtype=bool)] = 0.0
    return checked, flags
