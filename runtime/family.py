"""Model families: what turns a request's prompts into the U-Net's conditioning inputs.

A family knows its text encoders and the graph inputs its U-Net takes beside the sample and the timestep;
nothing outside it knows CLIP's layout. Stable Diffusion 1.x and 2.x share one family: one CLIP text encoder
whose (clip-skipped, emphasis-weighted) hidden states are the U-Net's ``encoder_hidden_states``; a latent
consistency (LCM) U-Net also takes the CFG scale, embedded, as ``timestep_cond``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdlite.conditioning import TextConditioner
from sdlite.engines import Engine
from sdlite.errors import check_finite
from sdlite.request import GenerationRequest


def guidance_embedding(w: float, width: int) -> np.ndarray:
    """The guidance-scale embedding of a latent consistency U-Net (Luo et al. 2023, sec. 4.2), (1, width): the
    sinusoidal embedding of VDM (Kingma et al. 2021, appendix) of 1000 w, sines then cosines, in float32 as
    diffusers computes it."""
    half = width // 2
    step = np.float32(np.log(np.float32(10000.0)) / (half - 1))
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -step)
    angles = np.float32(w * 1000.0) * frequencies
    embedding = np.concatenate([np.sin(angles), np.cos(angles)])
    return np.pad(embedding, (0, width % 2))[None].astype(np.float32)


class StableDiffusionFamily:
    """SD 1.x / 2.x: one CLIP text encoder, conditioning by cross-attention on its hidden states.

    ``guidance_width`` is a latent consistency U-Net's guidance-embedding width (None for other U-Nets)."""

    def __init__(
        self,
        conditioner: TextConditioner,
        part: Callable[[str], Engine],
        done: Callable[[str], None],
        guidance_width: int | None = None,
    ):
        self.conditioner = conditioner
        self._part = part
        self._done = done
        self.guidance_width = guidance_width

    @property
    def embeds_guidance(self) -> bool:
        """Whether the U-Net takes the CFG scale as an input rather than running an unconditional pass."""
        return self.guidance_width is not None

    def encode(self, prompts: list[str], clip_skip: int = 1) -> np.ndarray:
        """Prompts -> the U-Net's context (len(prompts), 77 * chunks, width), prompts padded to the same chunks."""
        encoder = self._part("text_encoder")
        try:
            return self.conditioner.encode(prompts, lambda ids: encoder.run({"input_ids": ids}), clip_skip)
        finally:
            self._done("text_encoder")

    def conditioning(self, request: GenerationRequest) -> dict[str, np.ndarray]:
        """The U-Net inputs for ``request``, batched [negative x batch, prompt x batch] when guided, else
        [prompt x batch] (diffusers skips the unconditional pass at CFG <= 1). An LCM U-Net gets the scale as
        diffusers' LatentConsistencyModelPipeline gives it: the embedding of w = CFG - 1."""
        prompts = [request.negative_prompt, request.prompt] if request.guided else [request.prompt]
        context = self.encode(prompts, request.clip_skip)
        check_finite(context, "the text encoder")
        inputs = {"encoder_hidden_states": np.repeat(context, request.batch, axis=0)}
        if self.guidance_width is not None:
            embedding = guidance_embedding(request.cfg_scale - 1.0, self.guidance_width)
            inputs["timestep_cond"] = np.repeat(embedding, request.batch, axis=0)
        return inputs

    def embeddings_used(self, request: GenerationRequest) -> dict:
        """The textual-inversion embeddings the request's prompts name (for the infotext)."""
        return self.conditioner.embeddings_used([request.prompt, request.negative_prompt])
