"""img2img and inpainting with every sampler: the strength cut lands on a step boundary, the number of model
evaluations is diffusers' (StableDiffusionImg2ImgPipeline's ``timesteps[t_start * order:]``), and two-stage
samplers give diffusers' image."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_image_modes import DECODED_ATOL, NEGATIVE, PROMPT, SEED, _image, _mask, _reference, shared_noise  # noqa: E402, F401
from test_samplers_all import OLD_REFERENCES, REFERENCES  # noqa: E402

from sdlite import Pipeline, schedulers  # noqa: E402
from sdlite.denoiser import steps_to_run  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]

STEPS = 20


class Counter:
    """A step callback that counts model evaluations."""

    def __init__(self) -> None:
        self.calls = 0
        self.totals: set[int] = set()

    def __call__(self, step, total, latents, denoised) -> None:
        assert step == self.calls
        assert np.isfinite(latents).all() and np.isfinite(denoised).all()
        self.calls += 1
        self.totals.add(total)


def diffusers_evaluations(name: str, config: dict, steps: int, strength: float) -> int:
    """Model evaluations diffusers' img2img pipeline runs for this sampler, steps and strength."""
    sampler, schedule = schedulers.parse_infotext(schedulers.infotext_fields(name))
    if sampler not in {**REFERENCES, **OLD_REFERENCES}:
        # DPM++ 2S a has no diffusers class; it is two-stage like Heun (2 evaluations a step, 1 for the last).
        return 2 * steps_to_run(steps, strength) - 1
    class_name, overrides, _ = {**REFERENCES, **OLD_REFERENCES}[sampler]
    ref = getattr(diffusers, class_name).from_config({**config, **overrides})
    ref.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    return len(ref.timesteps[t_start * ref.order :])


@pytest.fixture(scope="module")
def ours(tiny_onnx):
    return Pipeline.load(tiny_onnx)


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("name", schedulers.names())
def test_every_sampler_runs_diffusers_count(ours, name, strength):
    counter = Counter()
    images = ours.img2img(
        PROMPT,
        _image(),
        strength=strength,
        steps=STEPS,
        sampler=name,
        seed=SEED,
        output_type="np",
        progress=False,
        callback=counter,
    )
    assert np.isfinite(images).all()
    config = dict(ours.folder.scheduler_config)
    if name.startswith("DPM++ SDE"):
        # diffusers' DPMSolverSDEScheduler needs torchsde; its count is Heun's (both two-stage, k-diffusion style).
        expected = 2 * steps_to_run(STEPS, strength) - 1
    else:
        expected = diffusers_evaluations(name, config, STEPS, strength)
    assert counter.calls == expected
    assert counter.totals == {expected}


@pytest.mark.parametrize("name", ["Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ 2S a"])
def test_inpaint_two_stage_samplers_mid_schedule(ours, name):
    counter = Counter()
    images = ours.inpaint(
        PROMPT,
        _image(),
        _mask(),
        strength=0.75,
        steps=STEPS,
        sampler=name,
        seed=SEED,
        output_type="np",
        progress=False,
        callback=counter,
    )
    assert np.isfinite(images).all()
    assert counter.calls == 2 * steps_to_run(STEPS, 0.75) - 1


@pytest.mark.parametrize("sampler", ["Heun", "DPM2"])
@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_two_stage_img2img_matches_diffusers(tiny_diffusers, tiny_onnx, shared_noise, sampler, strength):  # noqa: F811
    from diffusers import HeunDiscreteScheduler, KDPM2DiscreteScheduler, StableDiffusionImg2ImgPipeline

    sampler_class = {"Heun": HeunDiscreteScheduler, "DPM2": KDPM2DiscreteScheduler}[sampler]
    reference = _reference(StableDiffusionImg2ImgPipeline, tiny_diffusers, sampler_class)
    calls = []
    forward = reference.unet.forward
    reference.unet.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    expected = reference(
        PROMPT,
        image=_image(),
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        output_type="np",
    ).images
    counter = Counter()
    got = Pipeline.load(tiny_onnx).img2img(
        PROMPT,
        _image(),
        strength=strength,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=7.5,
        sampler=sampler,
        seed=SEED,
        output_type="np",
        progress=False,
        callback=counter,
    )
    assert counter.calls == len(calls)
    diff = float(np.max(np.abs(got - expected)))
    assert diff < DECODED_ATOL, f"max |diff| {diff:.2e}"
