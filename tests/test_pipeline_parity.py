"""The numpy pipeline reproduces diffusers.StableDiffusionPipeline on the same weights and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlite import Pipeline
from sdlite.rng import NoiseGenerator

# Every test here needs torch: diffusers' StableDiffusionPipeline is the reference.
pytestmark = pytest.mark.torch

# fp32 ONNX vs fp32 PyTorch: differences come only from kernel order (~1e-6 per op).
DECODED_ATOL = 2e-3

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
SEED = 1234
STEPS = 6
SIZE = 64


def _diffusers_scheduler(name: str, config):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        PNDMScheduler,
    )

    return {
        "PNDM": lambda: PNDMScheduler.from_config(config),
        "DDIM": lambda: DDIMScheduler.from_config(config),
        "Euler a": lambda: EulerAncestralDiscreteScheduler.from_config(config),
        "DPM++ 2M Karras": lambda: DPMSolverMultistepScheduler.from_config(
            config, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2
        ),
    }[name]()


@pytest.fixture(scope="module")
def reference_pipe(tiny_diffusers):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_onnx):
    return Pipeline.load(tiny_onnx)


@pytest.mark.parametrize("sampler", ["PNDM", "DDIM", "Euler a", "DPM++ 2M Karras"])
@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_txt2img_matches_diffusers(sampler, cfg, reference_pipe, ours, monkeypatch):
    shape = (1, 4, SIZE // 8, SIZE // 8)
    stream = NoiseGenerator(SEED)
    latents = stream.randn(shape)
    # The pipeline draws per-step noise from the same stream, right after the initial latents.
    step_noise = [torch.from_numpy(stream.randn(shape)) for _ in range(STEPS)]
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a

    monkeypatch.setattr(euler_a, "randn_tensor", lambda *args, **kwargs: step_noise.pop(0))

    reference_pipe.scheduler = _diffusers_scheduler(sampler, reference_pipe.scheduler.config)
    expected = reference_pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        height=SIZE,
        width=SIZE,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    got = ours.txt2img(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=cfg,
        sampler=sampler,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        output_type="np",
        progress=False,
    )
    assert got.shape == expected.shape == (1, SIZE, SIZE, 3)
    diff = float(np.max(np.abs(got - expected)))
    assert diff < DECODED_ATOL, f"{sampler}: max |diff| {diff:.2e}"


def test_batch_images_follow_consecutive_seeds(ours):
    """Image i of a batch equals a batch-of-one run with seed + i (A1111's convention)."""
    batch = ours.txt2img(PROMPT, steps=3, seed=7, batch=2, output_type="np", progress=False)
    second = ours.txt2img(PROMPT, steps=3, seed=8, batch=1, output_type="np", progress=False)
    assert np.max(np.abs(batch[1] - second[0])) < 1e-5
    assert np.max(np.abs(batch[0] - batch[1])) > 1e-3


def test_non_square_size_not_multiple_of_64(ours):
    """Any multiple of 8 works, not only multiples of the U-Net's total downsampling."""
    image = ours.txt2img(PROMPT, steps=2, seed=1, width=72, height=40, progress=False)[0]
    assert image.size == (72, 40)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_cpu_seed_source_reproduces_a_diffusers_cpu_run(sampler, reference_pipe, ours):
    """With the `cpu` noise source, a seed means what it means to diffusers on a torch CPU generator: the
    same initial latents and, for ancestral samplers, the same per-step noise, so whole runs match."""
    reference_pipe.scheduler = _diffusers_scheduler(sampler, reference_pipe.scheduler.config)
    expected = reference_pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images
    got = ours.txt2img(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=7.5,
        sampler=sampler,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        seed_source="cpu",
        output_type="np",
        progress=False,
    )
    assert np.max(np.abs(got - expected)) < DECODED_ATOL
