"""img2img, inpainting (inpainting U-Net and regular U-Net) and outpainting against diffusers."""

from __future__ import annotations

import numpy as np
import pytest
from noise_routing import route_randn
from test_masks import PROMPT, SIZE, _image, _mask

from sdlite import Pipeline
from sdlite.rng import NoiseGenerator

# Every test here needs torch: diffusers' pipelines are the reference.
pytestmark = pytest.mark.torch

# fp32 ONNX vs fp32 PyTorch on the same noise: kernel-order differences only.
DECODED_ATOL = 2e-3
NEGATIVE = "blurry"
SEED = 77


@pytest.fixture
def shared_noise(monkeypatch):
    """Make diffusers draw every random tensor from sdlite's noise stream for SEED, in call order."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_module

    route_randn(monkeypatch, SEED, (vae_module, img2img_module, inpaint_module, euler_module))


@pytest.fixture(scope="module")
def tiny_inpaint_onnx(tmp_path_factory):
    from sdlite.convert.converter import convert
    from sdlite.models.recipes import build

    root = tmp_path_factory.mktemp("inpaint")
    build("tiny-inpaint", root / "src")
    convert(str(root / "src"), root / "onnx", quiet=True)
    return root


def _reference(pipeline_class, folder, sampler_class=None):
    pipe = pipeline_class.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if sampler_class is not None:
        pipe.scheduler = sampler_class.from_config(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(tiny_diffusers, tiny_onnx, shared_noise, sampler, strength):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline

    sampler_class = {"DDIM": DDIMScheduler, "Euler a": EulerAncestralDiscreteScheduler}[sampler]
    reference = _reference(StableDiffusionImg2ImgPipeline, tiny_diffusers, sampler_class)
    expected = reference(
        PROMPT,
        image=_image(),
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=5,
        guidance_scale=7.5,
        output_type="np",
    ).images
    got = Pipeline.load(tiny_onnx).img2img(
        PROMPT,
        _image(),
        strength=strength,
        negative_prompt=NEGATIVE,
        steps=5,
        cfg_scale=7.5,
        sampler=sampler,
        seed=SEED,
        output_type="np",
        progress=False,
    )
    assert got.shape == expected.shape
    diff = float(np.max(np.abs(got - expected)))
    assert diff < DECODED_ATOL, f"max |diff| {diff:.2e}"


def _inpaint_case(diffusers_folder, onnx_folder, strength):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    reference = _reference(StableDiffusionInpaintPipeline, diffusers_folder, DDIMScheduler)
    raw = reference(
        PROMPT,
        image=_image(),
        mask_image=_mask(),
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=5,
        guidance_scale=7.5,
        output_type="np",
        height=SIZE,
        width=SIZE,
    ).images
    # sdlite pastes the result back over the original through the mask (here unblurred, so binary).
    mask = (np.asarray(_mask(), np.float32) / 255)[None, ..., None]
    original = np.asarray(_image(), np.float32)[None] / 255
    expected = original * (1 - mask) + raw * mask
    got = Pipeline.load(onnx_folder).inpaint(
        PROMPT,
        _image(),
        _mask(),
        strength=strength,
        mask_blur=0,
        negative_prompt=NEGATIVE,
        steps=5,
        cfg_scale=7.5,
        sampler="DDIM",
        seed=SEED,
        output_type="np",
        progress=False,
    )
    return got, expected


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_regular_unet_matches_diffusers(tiny_diffusers, tiny_onnx, shared_noise, strength):
    got, expected = _inpaint_case(tiny_diffusers, tiny_onnx, strength)
    diff = float(np.max(np.abs(got - expected)))
    assert diff < DECODED_ATOL, f"max |diff| {diff:.2e}"


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_unet_matches_diffusers(tiny_inpaint_onnx, shared_noise, strength):
    got, expected = _inpaint_case(tiny_inpaint_onnx / "src", tiny_inpaint_onnx / "onnx", strength)
    diff = float(np.max(np.abs(got - expected)))
    assert diff < DECODED_ATOL, f"max |diff| {diff:.2e}"


def test_tiled_decode_close_to_untiled(tiny_onnx):
    """Tiles of 8 latent cells with 4 of overlap on a 256x256 image (32x32 latents)."""
    from sdlite.vae import Vae

    pipe = Pipeline.load(tiny_onnx)
    latents = NoiseGenerator(5).randn((1, 4, 32, 32))
    whole = Vae(pipe.parts.get, 0.18215, tiling="off").decode(latents)
    tiled = Vae(pipe.parts.get, 0.18215, tiling="on", tile_latent=16, overlap_latent=4).decode(latents)
    assert tiled.shape == whole.shape == (1, 256, 256, 3)
    mse = float(np.mean((tiled - whole) ** 2))
    psnr = 10 * np.log10(1.0 / mse)
    # The decoder's mid-block attention sees one tile at a time, so tiles differ slightly.
    assert psnr > 30, psnr
