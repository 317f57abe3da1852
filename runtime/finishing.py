"""The finishing step every mode ends with: decoded images in, what the caller gets out.

In order, as the original Stable Diffusion scripts and diffusers do it: the checkpoint's safety checker (flagged
images come back black), the invisible watermark when asked (on the 8-bit image, after the check), then PIL
images carrying their generation parameters as AUTOMATIC1111 infotext, or the float array.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdlite import __version__, schedulers
from sdlite.engines import Engine
from sdlite.hashing import short_hash
from sdlite.images import to_pil
from sdlite.infotext import format_infotext
from sdlite.request import GenerationRequest
from sdlite.results import ImageArray, Images
from sdlite.rng import A1111_RNG
from sdlite.safety import ClipPreprocessing, check_images
from sdlite.watermark import check_watermark_size, encode_watermark


@dataclass(frozen=True)
class ModelFacts:
    """What the infotext says about the model and how it ran, the same for every image."""

    name: str
    model_hash: str | None
    lora_hashes: str | None
    token_merging: float
    engine: str
    compute: str
    vae: str | None = None  # the autoencoder's name when it is not the model's own (A1111's "VAE")


@dataclass
class SafetyChecker:
    """The checkpoint's safety checker: ``get()`` loads (or returns) its engine, ``done()`` says it ran."""

    get: Callable[[], Engine]
    done: Callable[[], None]
    preprocessing: ClipPreprocessing


@dataclass
class Finisher:
    """Safety check, watermark and infotext for one model (``safety`` None: no checker runs)."""

    facts: ModelFacts
    safety: SafetyChecker | None = None

    @staticmethod
    def check_request(request: GenerationRequest, size: tuple[int, int]) -> None:
        """Fail before any work when finished images of ``size`` (W, H) could not take what was asked."""
        if request.watermark:
            check_watermark_size(*size)

    def finish(
        self,
        images: np.ndarray,
        request: GenerationRequest,
        extra: Mapping[str, object],
        output_type: str,
        embeddings: str | None = None,
        size: str | None = None,
        loras: str | None = None,
    ) -> list[Image.Image] | np.ndarray:
        """Decoded images (N, H, W, 3) in 0..1 -> PIL images with their infotext or, for ``output_type="np"``,
        the float array; both carry the safety checker's flags as ``nsfw_content_detected``. ``extra`` are the
        mode's infotext fields, ``embeddings`` the "TI hashes" value, ``size`` the Size field when it is not the
        request's, ``loras`` the "Lora hashes" of the LoRAs applied at run time."""
        flags = None
        if self.safety is not None:
            images, flags = check_images(images, self.safety.get, self.safety.preprocessing)
            self.safety.done()
        if request.watermark:
            pixels = [encode_watermark(np.asarray(image)) for image in to_pil(images)]
            images = np.stack(pixels).astype(np.float32) / 255.0
        if output_type == "np":
            return ImageArray.of(images, flags)
        return Images(self._with_infotext(images, request, extra, embeddings, size, loras), flags)

    def _with_infotext(
        self,
        images: np.ndarray,
        request: GenerationRequest,
        extra: Mapping[str, object],
        embeddings: str | None,
        size: str | None,
        loras: str | None,
    ) -> list[Image.Image]:
        facts = self.facts
        # Everything but the seed is the same for every image of the batch: built once.
        fields = {
            "Steps": request.steps,
            # Both forms: "Sampler: DPM++ 2M Karras" (old readers) and "Schedule type" (A1111 1.9+).
            **schedulers.infotext_fields(request.sampler, request.schedule),
            "CFG scale": request.cfg_scale,
            "Seed": request.seed,
            "Size": size or f"{request.width}x{request.height}",
            "Model hash": short_hash(facts.model_hash) if facts.model_hash else None,
            "Model": facts.name,
            "VAE": facts.vae,
            # A1111 writes the hashes of the LoRAs it applied: fused at conversion, then those of the prompt.
            "Lora hashes": ", ".join(h for h in (facts.lora_hashes, loras) if h) or None,
            # The embeddings the prompt or negative prompt named, as A1111 records them.
            "TI hashes": embeddings,
            **extra,
            "Token merging ratio": facts.token_merging or None,
            # A1111 writes the key only when the setting is off its default.
            "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
            # The key A1111's CFG rescale extension writes.
            "CFG Rescale phi": request.cfg_rescale or None,
            # A1111 writes no RNG key for its GPU default; sdlite's numpy source has no A1111 name.
            "RNG": A1111_RNG.get(request.seed_source, request.seed_source),
            "Engine": facts.engine,
            "Compute": facts.compute,
            "Version": f"sdlite {__version__}",
        }
        result = to_pil(images)
        for i, image in enumerate(result):
            # Replacing an existing key keeps its place in the infotext.
            image.info["parameters"] = format_infotext(
                request.prompt, request.negative_prompt, {**fields, "Seed": request.seed + i}
            )
        return result
