"""Model families: what turns a request's prompts into the U-Net's conditioning inputs.

A family knows its text encoders and the graph inputs its U-Net takes beside the sample and the timestep;
nothing outside it knows CLIP's layout. Stable Diffusion 1.x and 2.x share one family: one CLIP text encoder
whose (clip-skipped, emphasis-weighted) hidden states are the U-Net's ``encoder_hidden_states``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdlite.conditioning import TextConditioner
from sdlite.engines import Engine
from sdlite.errors import check_finite
from sdlite.request import GenerationRequest


class StableDiffusionFamily:
    """SD 1.x / 2.x: one CLIP text encoder, conditioning by cross-attention on its hidden states."""

    def __init__(self, conditioner: TextConditioner, part: Callable[[str], Engine], done: Callable[[str], None]):
        self.conditioner = conditioner
        self._part = part
        self._done = done

    def encode(self, prompts: list[str], clip_skip: int = 1) -> np.ndarray:
        """Prompts -> the U-Net's context (len(prompts), 77 * chunks, width), prompts padded to the same chunks."""
        encoder = self._part("text_encoder")
        try:
            return self.conditioner.encode(prompts, lambda ids: encoder.run({"input_ids": ids}), clip_skip)
        finally:
            self._done("text_encoder")

    def conditioning(self, request: GenerationRequest) -> dict[str, np.ndarray]:
        """The U-Net inputs for ``request``, batched [negative x batch, prompt x batch] when guided, else
        [prompt x batch] (diffusers skips the unconditional pass at CFG <= 1)."""
        prompts = [request.negative_prompt, request.prompt] if request.guided else [request.prompt]
        context = self.encode(prompts, request.clip_skip)
        check_finite(context, "the text encoder")
        context = np.repeat(context, request.batch, axis=0)
        return {"encoder_hidden_states": context}

    def embeddings_used(self, request: GenerationRequest) -> dict:
        """The textual-inversion embeddings the request's prompts name (for the infotext)."""
        return self.conditioner.embeddings_used([request.prompt, request.negative_prompt])
