"""One declared export config per model part: inputs, outputs, dynamic axes, dummy inputs, tolerance.

Names and axes follow Hugging Face optimum's ONNX configs (``optimum/exporters/onnx/model_configs.py``),
so folders written here load in optimum's pipelines and optimum's folders run in sdlite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sdlite.family import sdxl_time_ids
from sdlite.layout import TEXT_ENCODER_2, sdxl_time_id_count, vae_factor

# Opset 17 has LayerNormalization as one op (fused by onnxruntime and OpenVINO); every runtime sdlite
# targets (onnxruntime >= 1.14, OpenVINO >= 2023.0) supports it.
OPSET = 17


@dataclass(frozen=True)
class ExportSize:
    """The batch and pixel size of the dummy inputs a part is traced or validated with."""

    batch: int
    height: int
    width: int


@dataclass(frozen=True)
class PartSpec:
    """How to export and validate one part of a Stable Diffusion pipeline."""

    name: str
    inputs: dict[str, dict[int, str]]
    outputs: dict[str, dict[int, str]]
    atol: float
    rtol: float
    wrap: Callable[[object], torch.nn.Module]
    dummy_inputs: Callable[[object, ExportSize], dict[str, torch.Tensor]]


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        # Every layer's hidden state as well, named as optimum names them when config.output_hidden_states
        # is set, so that clip skip can read layer -N; the pair optimum's pipelines read stays first.
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        return out.last_hidden_state, out.pooler_output, *out.hidden_states


class _TextEncoderWithProjection(torch.nn.Module):
    """SDXL's second text encoder (``CLIPTextModelWithProjection``): the projected pooled embedding, the output and
    every layer's hidden state, named and ordered as optimum exports it."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        return out.text_embeds, out.last_hidden_state, *out.hidden_states


class _UNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        # timestep_cond: a latent consistency U-Net's guidance-scale embedding (only its export has the input).
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class _SdxlUNet(torch.nn.Module):
    """An SDXL U-Net with its added conditioning (pooled text embedding, time ids) as plain inputs."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        # Mean and log-variance concatenated on the channel axis, as optimum's "latent_parameters".
        return self.vae.encode(sample).latent_dist.parameters


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _TinyEncoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0]


class _SafetyChecker(torch.nn.Module):
    """diffusers' ``StableDiffusionSafetyChecker.forward`` as one traceable graph.

    Inputs and outputs are those of diffusers' own ONNX export of the checker (``clip_input`` (N, 3, 224, 224)
    from the feature extractor, ``images`` (N, H, W, 3) -> ``out_images`` with flagged images zeroed,
    ``has_nsfw_concepts`` (N,) bool), so the graph also runs in diffusers' ``OnnxStableDiffusionPipeline``.
    The decision is ``forward``'s, the one diffusers' PyTorch pipelines use, rather than ``forward_onnx``'s:
    ``forward`` rounds every score to 3 decimals before testing ``> 0`` (so scores under 0.0005 do not flag),
    and adds 0.01 to the concept scores of an image that any special-care concept flags.
    """

    def __init__(self, checker: torch.nn.Module):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input, images):
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        checker = self.checker
        image_embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        special = cosine_distance(image_embeds, checker.special_care_embeds) - checker.special_care_embeds_weights
        # round(score, 3) > 0 in float32, as numpy rounds (x * 1000, round half to even, / 1000).
        special_care = torch.any(torch.round(special * 1000) > 0, dim=1)
        adjustment = special_care.to(special.dtype)[:, None] * 0.01
        concept = cosine_distance(image_embeds, checker.concept_embeds) - checker.concept_embeds_weights + adjustment
        has_nsfw_concepts = torch.any(torch.round(concept * 1000) > 0, dim=1)
        out_images = torch.where(has_nsfw_concepts[:, None, None, None], torch.zeros_like(images), images)
        return out_images, has_nsfw_concepts


def _checker_inputs(checker, size: ExportSize) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(size.height)
    side = checker.config.vision_config.image_size
    return {
        "clip_input": torch.randn(size.batch, 3, side, side, generator=gen),
        "images": torch.rand(size.batch, size.height, size.width, 3, generator=gen),
    }


def vae_scale_factor(pipe) -> int:
    """Pixels per latent cell (8 for every SD VAE)."""
    return vae_factor(pipe.vae.config.block_out_channels)


def _tokenizer(pipe):
    """The pipeline's (first) tokenizer: an SDXL refiner has only the second."""
    return getattr(pipe, "tokenizer", None) or pipe.tokenizer_2


def _ids(tokenizer, vocab_size: int, size: ExportSize) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(size.height)
    length = tokenizer.model_max_length
    ids = torch.randint(0, vocab_size - 2, (size.batch, length), generator=gen)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, length // 2] = tokenizer.eos_token_id
    return {"input_ids": ids}


def _token_ids(pipe, size: ExportSize) -> dict[str, torch.Tensor]:
    return _ids(pipe.tokenizer, pipe.text_encoder.config.vocab_size, size)


def _token_ids_2(pipe, size: ExportSize) -> dict[str, torch.Tensor]:
    return _ids(pipe.tokenizer_2, pipe.text_encoder_2.config.vocab_size, size)


def _unet_inputs(pipe, size: ExportSize) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(size.height)
    factor = vae_scale_factor(pipe)
    channels = pipe.unet.config.in_channels
    hidden = pipe.unet.config.cross_attention_dim
    length = _tokenizer(pipe).model_max_length
    return {
        "sample": torch.randn(size.batch, channels, size.height // factor, size.width // factor, generator=gen),
        "timestep": torch.tensor(981.0),
        "encoder_hidden_states": torch.randn(size.batch, length, hidden, generator=gen),
    }


def _sdxl_unet_inputs(pipe, size: ExportSize) -> dict[str, torch.Tensor]:
    inputs = _unet_inputs(pipe, size)
    gen = torch.Generator().manual_seed(size.height + 2)
    pooled = pipe.text_encoder_2.config.projection_dim
    # The time ids the runtime gives an image of this size: realistic magnitudes, not noise.
    time_ids = sdxl_time_ids(size.width, size.height, sdxl_time_id_count(pipe.unet.config, pooled))
    return {
        **inputs,
        "text_embeds": torch.randn(size.batch, pooled, generator=gen),
        "time_ids": torch.from_numpy(time_ids).repeat(size.batch, 1),
    }


def guidance_embedding_width(unet) -> int | None:
    """Width of a latent consistency U-Net's guidance-scale embedding input (None for other U-Nets)."""
    return getattr(unet.config, "time_cond_proj_dim", None)


def _lcm_unet_inputs(pipe, size: ExportSize) -> dict[str, torch.Tensor]:
    inputs = _unet_inputs(pipe, size)
    gen = torch.Generator().manual_seed(size.height + 1)
    width = guidance_embedding_width(pipe.unet)
    return {**inputs, "timestep_cond": torch.randn(size.batch, width, generator=gen)}


def _image(pipe, size: ExportSize) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(size.height)
    return {"sample": torch.rand(size.batch, 3, size.height, size.width, generator=gen) * 2 - 1}


def _latents(pipe, size: ExportSize) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(size.height)
    factor = vae_scale_factor(pipe)
    channels = pipe.vae.config.latent_channels
    return {
        "latent_sample": torch.randn(size.batch, channels, size.height // factor, size.width // factor, generator=gen)
    }


def _tiny_latents(vae, size: ExportSize) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(size.height)
    factor = vae_factor(vae.config.encoder_block_out_channels)
    shape = (size.batch, vae.config.latent_channels, size.height // factor, size.width // factor)
    return {"latent_sample": torch.randn(*shape, generator=gen)}


_BATCH_HW = {0: "batch_size", 2: "height", 3: "width"}

PARTS: dict[str, PartSpec] = {
    "text_encoder": PartSpec(
        name="text_encoder",
        inputs={"input_ids": {0: "batch_size", 1: "sequence_length"}},
        outputs={"last_hidden_state": {0: "batch_size", 1: "sequence_length"}, "pooler_output": {0: "batch_size"}},
        atol=1e-4,
        rtol=1e-3,
        wrap=lambda pipe: _TextEncoder(pipe.text_encoder),
        dummy_inputs=_token_ids,
    ),
    TEXT_ENCODER_2: PartSpec(
        name=TEXT_ENCODER_2,
        inputs={"input_ids": {0: "batch_size", 1: "sequence_length"}},
        outputs={"text_embeds": {0: "batch_size"}, "last_hidden_state": {0: "batch_size", 1: "sequence_length"}},
        atol=1e-4,
        rtol=1e-3,
        wrap=lambda pipe: _TextEncoderWithProjection(pipe.text_encoder_2),
        dummy_inputs=_token_ids_2,
    ),
    "unet": PartSpec(
        name="unet",
        # optimum exports the timestep as a float32 scalar.
        inputs={"sample": _BATCH_HW, "timestep": {}, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"}},
        outputs={"out_sample": _BATCH_HW},
        atol=1e-4,
        rtol=1e-3,
        wrap=lambda pipe: _UNet(pipe.unet),
        dummy_inputs=_unet_inputs,
    ),
    "vae_encoder": PartSpec(
        name="vae_encoder",
        inputs={"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}},
        outputs={"latent_parameters": {0: "batch_size", 2: "latent_height", 3: "latent_width"}},
        atol=3e-4,
        rtol=1e-3,
        wrap=lambda pipe: _VaeEncoder(pipe.vae),
        dummy_inputs=_image,
    ),
    "vae_decoder": PartSpec(
        name="vae_decoder",
        inputs={"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}},
        outputs={"sample": {0: "batch_size", 2: "height", 3: "width"}},
        atol=3e-4,
        rtol=1e-3,
        wrap=lambda pipe: _VaeDecoder(pipe.vae),
        dummy_inputs=_latents,
    ),
    # Exported from the checkpoint's safety checker (not from ``pipe``): its wrap and dummy inputs take the
    # ``StableDiffusionSafetyChecker`` itself.
    "safety_checker": PartSpec(
        name="safety_checker",
        inputs={"clip_input": {0: "batch"}, "images": {0: "batch", 1: "height", 2: "width"}},
        outputs={"out_images": {0: "batch", 1: "height", 2: "width"}, "has_nsfw_concepts": {0: "batch"}},
        atol=1e-4,
        rtol=1e-3,
        wrap=_SafetyChecker,
        dummy_inputs=_checker_inputs,
    ),
}


# Exported from a tiny autoencoder (diffusers' AutoencoderTiny): wrap and dummy inputs take it, not ``pipe``; the
# VAE's axes and tolerances (fp32 conv stacks of the same depth). Its encoder gives the latents themselves.
PARTS["taesd_encoder"] = dataclasses.replace(
    PARTS["vae_encoder"],
    name="taesd_encoder",
    outputs={"latent_sample": PARTS["vae_encoder"].outputs["latent_parameters"]},
    wrap=_TinyEncoder,
)
# AutoencoderTiny.decode takes and gives what AutoencoderKL.decode does.
PARTS["taesd_decoder"] = dataclasses.replace(
    PARTS["vae_decoder"], name="taesd_decoder", wrap=_VaeDecoder, dummy_inputs=_tiny_latents
)


def part_spec(name: str, pipe) -> PartSpec:
    """``PARTS[name]`` completed for ``pipe``: a text encoder's outputs gain ``hidden_states.0`` (the embeddings)
    to ``hidden_states.N`` (the last layer, before the final layer norm), N = its layer count; a latent
    consistency U-Net gains its ``timestep_cond`` input (the guidance-scale embedding), an SDXL U-Net its
    ``text_embeds`` and ``time_ids``."""
    spec = PARTS[name]
    if name == "unet" and getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        added = {"text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"}}
        return dataclasses.replace(
            spec,
            inputs={**spec.inputs, **added},
            wrap=lambda pipe: _SdxlUNet(pipe.unet),
            dummy_inputs=_sdxl_unet_inputs,
        )
    if name == "unet" and guidance_embedding_width(pipe.unet):
        return dataclasses.replace(
            spec, inputs={**spec.inputs, "timestep_cond": {0: "batch_size"}}, dummy_inputs=_lcm_unet_inputs
        )
    if name not in ("text_encoder", TEXT_ENCODER_2):
        return spec
    layers = getattr(pipe, name).config.num_hidden_layers
    hidden = {f"hidden_states.{i}": {0: "batch_size", 1: "sequence_length"} for i in range(layers + 1)}
    return dataclasses.replace(spec, outputs={**spec.outputs, **hidden})


def final_layer_norm(text_encoder) -> dict[str, np.ndarray]:
    """A text encoder's final LayerNorm (weight, bias, eps), which clip skip applies to an earlier layer's
    hidden state; the runtime reads it from ``sdlite.layout.FINAL_NORM_FILE`` next to the text encoder's graph."""
    norm = text_encoder.text_model.final_layer_norm
    # Copies: a view would keep the whole memory-mapped checkpoint file resident for the rest of the conversion.
    return {
        "weight": norm.weight.detach().float().numpy().copy(),
        "bias": norm.bias.detach().float().numpy().copy(),
        "eps": np.asarray(norm.eps, dtype=np.float64),
    }


def trace_size(factor: int) -> ExportSize:
    """The size parts are traced at (``factor``: pixels per latent cell).

    The latent width is deliberately odd, so *not* a multiple of the U-Net's total downsampling (2 per level
    below the first): diffusers' U-Net then passes each skip connection's size to its upsamplers, and the trace
    records that as a dynamic size, so the exported graph accepts every multiple of 8 pixels, not only multiples
    of the downsampling.
    """
    return ExportSize(batch=1, height=12 * factor, width=9 * factor)


def validation_size(factor: int) -> ExportSize:
    """A different batch and size than the trace, so that validation also proves the dynamic axes (``factor``:
    pixels per latent cell)."""
    return ExportSize(batch=2, height=16 * factor, width=8 * factor)
