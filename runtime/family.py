"""Model families: what turns a request's prompts into the U-Net's conditioning inputs.

A family knows its text encoders and the graph inputs its U-Net takes beside the sample and the timestep;
nothing outside it knows CLIP's layout. Stable Diffusion 1.x and 2.x share one family: one CLIP text encoder
whose (clip-skipped, emphasis-weighted) hidden states are the U-Net's ``encoder_hidden_states``; a latent
consistency (LCM) U-Net also takes the CFG scale, embedded, as ``timestep_cond``. SDXL (Podell et al. 2023)
concatenates the penultimate hidden states of two text encoders (CLIP ViT-L, OpenCLIP ViT-bigG; its refiner has
only the second), and adds the second's pooled embedding (``text_embeds``) and the "micro-conditioning" time ids
(original size, crop top-left, target size; the refiner: original size, crop, aesthetic score).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sdlite.conditioning import TextConditioner
from sdlite.embeddings import EmbeddingLibrary
from sdlite.engines import Engine
from sdlite.errors import check_finite
from sdlite.layout import SDXL_FAMILIES, TEXT_ENCODER_2, sdxl_time_id_count, text_encoders
from sdlite.model_folder import ModelFolder
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


# The refiner's aesthetic-score conditioning (diffusers' StableDiffusionXLImg2ImgPipeline defaults; A1111 uses the
# same): the score the prompt asks for, and the one the negative conditioning gets.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def sdxl_time_ids(width: int, height: int, count: int, aesthetic_score: float = AESTHETIC_SCORE) -> np.ndarray:
    """SDXL's micro-conditioning for an image of ``width`` x ``height`` (Podell et al. 2023, sec. 2.2), (1, count):
    original size and target size (height, width) both the image's, crop top-left (0, 0), as diffusers and A1111
    set them by default; the refiner's ``count`` = 5 has the aesthetic score in place of the target size."""
    last = (height, width) if count == 6 else (aesthetic_score,)
    return np.asarray([[height, width, 0, 0, *last]], dtype=np.float32)


class SdxlFamily:
    """SDXL base (two text encoders) and refiner (the second only).

    ``encoders`` pairs each text-encoder part with its conditioner, in concatenation order; the last one's
    ``text_embeds`` is the pooled embedding. ``time_ids`` is the count of time ids the U-Net takes (6, or 5 for
    the refiner). ``zero_negative``: an empty negative prompt conditions with zeros (the model's
    ``force_zeros_for_empty_prompt``, which A1111 applies too)."""

    embeds_guidance = False

    def __init__(
        self,
        encoders: Sequence[tuple[str, TextConditioner]],
        part: Callable[[str], Engine],
        done: Callable[[str], None],
        time_ids: int,
        zero_negative: bool,
    ):
        self.encoders = list(encoders)
        self._part = part
        self._done = done
        self.time_ids = time_ids
        self.zero_negative = zero_negative

    @property
    def conditioner(self) -> TextConditioner:
        """The first encoder's conditioner (chunks, tokenizer, embeddings)."""
        return self.encoders[0][1]

    def encode_pooled(self, prompts: list[str], clip_skip: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (context (len(prompts), 77 * chunks, total width), pooled (len(prompts), pooled width))."""
        contexts, pooled = [], None
        for index, (name, conditioner) in enumerate(self.encoders):
            encoder = self._part(name)
            last = index == len(self.encoders) - 1
            try:
                context, pooled_here = conditioner.encode_pooled(
                    prompts,
                    lambda ids, e=encoder: e.run({"input_ids": ids}),
                    clip_skip,
                    "text_embeds" if last else None,
                )
            finally:
                self._done(name)
            contexts.append(context)
            pooled = pooled_here if last else pooled
        return np.concatenate(contexts, axis=-1), pooled

    def encode(self, prompts: list[str], clip_skip: int = 1) -> np.ndarray:
        """Prompts -> the U-Net's context, both encoders' hidden states concatenated."""
        return self.encode_pooled(prompts, clip_skip)[0]

    def conditioning(self, request: GenerationRequest) -> dict[str, np.ndarray]:
        """The U-Net inputs for ``request``: context, pooled text embedding and time ids, batched [negative x
        batch, prompt x batch] when guided (diffusers' StableDiffusionXLPipeline and A1111 build the same)."""
        zero_negative = request.guided and self.zero_negative and request.negative_prompt == ""
        prompts = [request.prompt] if not request.guided or zero_negative else [request.negative_prompt, request.prompt]
        context, pooled = self.encode_pooled(prompts, request.clip_skip)
        check_finite(context, "the text encoder")
        if zero_negative:
            context = np.concatenate([np.zeros_like(context), context])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        time_ids = sdxl_time_ids(request.width, request.height, self.time_ids)
        if request.guided:
            negative = sdxl_time_ids(request.width, request.height, self.time_ids, NEGATIVE_AESTHETIC_SCORE)
            time_ids = np.concatenate([negative, time_ids])
        return {
            "encoder_hidden_states": np.repeat(context, request.batch, axis=0),
            "text_embeds": np.repeat(pooled, request.batch, axis=0),
            "time_ids": np.repeat(time_ids, request.batch, axis=0),
        }

    def embeddings_used(self, request: GenerationRequest) -> dict:
        """The textual-inversion embeddings the request's prompts name (for the infotext)."""
        return self.conditioner.embeddings_used([request.prompt, request.negative_prompt])


Family = StableDiffusionFamily | SdxlFamily


# The tensor of an SDXL textual-inversion embedding that each of SDXL's text encoders reads.
_SDXL_EMBEDDING_KEYS = {"text_encoder": "clip_l", TEXT_ENCODER_2: "clip_g"}


def text_conditioners(
    folder: ModelFolder, graph: Callable[[str], object], embeddings: str | Path | None
) -> list[tuple[str, TextConditioner]]:
    """Each text encoder of the folder's family with the conditioner that feeds it, in concatenation order; the
    textual-inversion embeddings under the folder ``embeddings`` are each encoder's (``sdlite.embeddings``)."""
    sdxl = folder.family in SDXL_FAMILIES
    conditioners = []
    for name in text_encoders(folder.family):
        tokenizer = folder.tokenizer(name)
        library = None
        if embeddings is not None:
            width = folder.part_config(name).get("hidden_size") if sdxl else folder.text_width
            width = width if isinstance(width, int) else None
            key = _SDXL_EMBEDDING_KEYS[name] if sdxl else None
            library = EmbeddingLibrary.load(embeddings, tokenizer.tokenize, tokenizer.vocab_size, width, key)
        conditioners.append((name, TextConditioner(tokenizer, graph(name), library, penultimate=sdxl)))
    return conditioners


def make_family(
    folder: ModelFolder,
    conditioners: list[tuple[str, TextConditioner]],
    part: Callable[[str], Engine],
    done: Callable[[str], None],
) -> Family:
    """The family object for ``folder``'s model, running its text encoders through ``part``/``done``."""
    unet = folder.part_config("unet")
    if folder.family not in SDXL_FAMILIES:
        return StableDiffusionFamily(conditioners[0][1], part, done, unet.get("time_cond_proj_dim"))
    pooled = folder.part_config(TEXT_ENCODER_2).get("projection_dim")
    try:
        time_ids = sdxl_time_id_count(unet, pooled)
    except (KeyError, TypeError):  # a folder whose configs do not say: the base model's six
        time_ids = 6
    return SdxlFamily(conditioners, part, done, time_ids, folder.force_zeros_for_empty_prompt)
