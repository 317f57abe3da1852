"""sdlite against golden numbers that tests/golden/make_golden.py made once with torch: no torch needed here.

The torch tier compares sdlite with diffusers, transformers and torch live (tests/test_samplers_all.py,
test_schedulers.py, test_tokenizer.py, test_rng_sources.py, test_pipeline_parity.py). This file holds sdlite to
those references' stored outputs, so that an install without torch (``pip install -e ".[test]"``, then
``python -m pytest -m "not torch"``) still checks every sampler, the tokenizer, the "cpu" noise source and a
whole generation with the embedded default model. The inputs are defined here; make_golden.py imports them,
runs the references and writes tests/golden/ (its docstring says when and how to regenerate).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from scheduler_configs import SD15

from sdlite import Pipeline, rng, schedulers
from sdlite.models import default_model_path
from sdlite.tokenizer import CLIPTokenizer

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = "regenerate with: python tests/golden/make_golden.py (needs the convert extra)"


@cache
def golden_npz(name: str) -> dict[str, np.ndarray]:
    """The arrays of ``tests/golden/<name>.npz``, read once."""
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


# --- samplers -----------------------------------------------------------------------------------------------

SAMPLER_STEPS = 6
SAMPLER_SHAPE = (1, 4, 8, 8)
# DPM++ 2S a has no diffusers class: its reference is k-diffusion's loop on the sigmas of diffusers' Euler
# scheduler, whose timesteps are every other entry of sdlite's (a midpoint call between each pair).
TIMESTEP_STRIDE = {"DPM++ 2S a": 2}
# max|ours - ref| / max|ref| on the final sample. Looser than the torch tests' per-step 1e-5: float32 rounding
# differs between CPUs (numpy's SIMD kernels) and between numpy and torch, and here six steps of it accumulate
# against numbers made on another machine. tests/test_samplers_all.py checks every step live at the tighter bound.
SAMPLER_RTOL = 1e-4


def fake_model(x: np.ndarray, t) -> np.ndarray:
    """tests/test_schedulers.py's deterministic stand-in for the U-Net (diffusers' x * t / (t + 1), made less
    trivial), in numpy; make_golden.py runs the references with this very function."""
    t = float(t)
    x = x.astype(np.float32)
    return (x * (t / (t + 1)) * 0.9 + np.float32(0.1) * np.sin(x + np.float32(t / 100))).astype(np.float32)


def run_sampler(name: str, x0: np.ndarray, noise: np.ndarray) -> tuple[schedulers.Scheduler, np.ndarray]:
    """sdlite's sampler ``name`` for SAMPLER_STEPS steps from ``x0``: call i of ``step`` gets ``noise[i]``
    when the sampler is stochastic. Returns the sampler and the final sample."""
    sched = schedulers.create(name, SD15)
    sched.set_timesteps(SAMPLER_STEPS)
    assert len(sched.timesteps) <= len(noise), f"{name}: more step calls than stored noise; {REGENERATE}"
    x = x0
    for i, t in enumerate(sched.timesteps):
        eps = fake_model(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, noise=noise[i] if sched.stochastic else None)
    return sched, x


@pytest.mark.parametrize("name", schedulers.names())
def test_sampler_matches_golden(name):
    golden = golden_npz("samplers")
    assert f"{name}.final" in golden, f"no golden numbers for sampler {name!r}; {REGENERATE}"
    want_t = golden[f"{name}.timesteps"]
    want_sigma = float(golden[f"{name}.init_noise_sigma"])
    # Both sides start from the same array: the stored unit noise times the reference's init_noise_sigma.
    x0 = golden["x0"] * np.float32(want_sigma)
    sched, got = run_sampler(name, x0, golden["noise"])

    got_t = sched.timesteps[:: TIMESTEP_STRIDE.get(name, 1)]
    assert got_t.shape == want_t.shape
    np.testing.assert_allclose(got_t, want_t, rtol=1e-6, atol=1e-4)
    assert got_t.dtype.kind == want_t.dtype.kind  # int for DDIM/PNDM/DPM++ 2M..., float for the k-samplers
    assert sched.init_noise_sigma == pytest.approx(want_sigma, rel=1e-6)

    want = golden[f"{name}.final"]
    assert got.dtype == np.float32 and got.shape == want.shape
    err = float(np.max(np.abs(got.astype(np.float64) - want))) / float(np.max(np.abs(want)))
    assert err < SAMPLER_RTOL, f"{name}: final sample off by {err:.2e} of max|ref|"


def test_golden_samplers_are_sdlites():
    """A golden sampler that sdlite no longer names is stale data."""
    stored = {key.removesuffix(".final") for key in golden_npz("samplers") if key.endswith(".final")}
    assert stored == set(schedulers.names()), REGENERATE


# --- tokenizer ----------------------------------------------------------------------------------------------

# A dozen and more prompts from tests/test_tokenizer.py: plain, A1111 syntax, contractions, numbers, accents,
# CJK, emoji, whitespace, the special tokens written out, the empty prompt and one past 75 tokens (truncated).
TOKENIZER_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Cat Sitting On A Mat",
    "oil painting of a lighthouse at dusk, highly detailed, trending on artstation",
    "lowres, bad anatomy, bad hands, text, error, missing fingers",
    "(masterpiece:1.2), [blurry], {best quality}",
    "it's raining, we're here, they've gone, I'm fine, you'll see, he'd go",
    "3.14 and 2,000,000 and 42nd street",
    "café crème brûlée",
    "東京タワー 夜景",
    "a cat 🐱 with a hat 🎩",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\nhere",
    "a<|endoftext|>b",
    "straße and ſ and İstanbul",
    "",
    ", ".join(["highly detailed"] * 60),
]


@pytest.fixture(scope="module")
def tokenizer_golden() -> dict[str, dict[str, list[int]]]:
    return json.loads((GOLDEN / "tokenizer.json").read_text(encoding="utf-8"))["prompts"]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(default_model_path() / "tokenizer")


@pytest.mark.parametrize("index", range(len(TOKENIZER_PROMPTS)))
def test_tokenizer_matches_golden(tokenizer, tokenizer_golden, index):
    """Exact ids: transformers' slow CLIPTokenizer's padded, truncated row and its untruncated token ids."""
    prompt = TOKENIZER_PROMPTS[index]
    assert prompt in tokenizer_golden, f"no golden ids for {prompt!r}; {REGENERATE}"
    want = tokenizer_golden[prompt]
    row = tokenizer(prompt)
    assert row.shape == (1, 77) and row.dtype == np.int64
    assert row[0].tolist() == want["input_ids"]
    assert tokenizer.tokenize(prompt) == want["tokens"]


# --- rng ----------------------------------------------------------------------------------------------------

RNG_SEEDS = [0, 1, 42, 2**32 - 1, 2**63 - 1, 2**64 - 1]
# Drawn in this order from one generator, as diffusers draws latents then step noise: below 16 values torch
# takes its scalar path (and caches the second Box-Muller value), from 16 on its vectorised blocks of 16.
RNG_SHAPES = [(1, 4, 8, 8), (3,), (17,), (1,), (2, 3, 5), (1, 4, 8, 8)]
# A long draw meets the rare roundings the kernel emulation fixes up; every RNG_LONG_STRIDE-th value is stored.
RNG_LONG_SEED, RNG_LONG_COUNT, RNG_LONG_STRIDE = 3, 300_001, 97


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_cpu_noise_matches_torch_randn(seed):
    """Exact: the "cpu" source is IEEE float32/float64 arithmetic emulating torch's AVX2 kernel (correctly
    rounded on every CPU), so it gives the stored torch.randn values bit for bit anywhere."""
    golden = golden_npz("rng")
    want = np.split(golden[f"seed {seed}"], np.cumsum([int(np.prod(s)) for s in RNG_SHAPES])[:-1])
    gen = rng.NoiseGenerator(seed, "cpu")
    for shape, values in zip(RNG_SHAPES, want, strict=True):
        got = gen.randn(shape)
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_array_equal(got.ravel(), values, err_msg=f"seed {seed}, shape {shape}")


def test_cpu_noise_long_draw_and_default_source():
    golden = golden_npz("rng")
    got = rng.randn(RNG_LONG_COUNT, RNG_LONG_SEED, "cpu")
    np.testing.assert_array_equal(got[::RNG_LONG_STRIDE], golden["long"])
    # "cpu" is the default source.
    np.testing.assert_array_equal(
        rng.randn(RNG_SHAPES[0], RNG_SEEDS[2]).ravel(), golden[f"seed {RNG_SEEDS[2]}"][: int(np.prod(RNG_SHAPES[0]))]
    )


# --- pipeline -----------------------------------------------------------------------------------------------

# txt2img with the embedded default model at its default size (64x64): the default sampler (DDIM, from its
# scheduler config) and a stochastic one with a negative prompt and the "cpu" seed source's step noise.
PIPELINE_CASES = {
    "ddim": {"prompt": "a red circle on a blue background", "steps": 3, "seed": 1},
    "euler-a": {
        "prompt": "a small green triangle on a yellow background, top left",
        "negative_prompt": "blurry",
        "sampler": "Euler a",
        "cfg_scale": 5.0,
        "steps": 4,
        "seed": 7,
    },
}
# Decoded images in 0..1: float32 kernels differ between CPUs (onnxruntime picks AVX2, AVX-512 or NEON code),
# which moves pixels by up to ~1e-4 after a few steps; 2e-3 (half a level of 8-bit colour) leaves room.
PIPELINE_ATOL = 2e-3


@pytest.fixture(scope="module")
def default_pipe() -> Pipeline:
    return Pipeline.load(default_model_path())


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_default_model_matches_golden(default_pipe, case):
    """The embedded default model's decoded image against golden numbers.

    The default model ships converted (ONNX) only, without its diffusers weights, so its golden image is
    sdlite's own fp32 ONNX output, recorded once by make_golden.py: this catches any change in what sdlite
    makes of a given model, seed and sampler. That sdlite's pipeline makes what diffusers'
    StableDiffusionPipeline makes is tested live, with torch, by tests/test_pipeline_parity.py."""
    golden = golden_npz("pipeline")
    assert json.loads(str(golden[f"{case}.args"])) == PIPELINE_CASES[case], f"stale golden case; {REGENERATE}"
    got = default_pipe.txt2img(**PIPELINE_CASES[case], output_type="np", progress=False)
    want = golden[f"{case}.image"]
    assert got.shape == want.shape == (1, 64, 64, 3)
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert diff < PIPELINE_ATOL, f"{case}: max |diff| {diff:.2e}"


def test_default_model_png_carries_infotext(default_pipe):
    """AUTOMATIC1111's infotext in the PNG, torch-free: the prompt, the negative prompt, then the parameters."""
    args = PIPELINE_CASES["euler-a"]
    (image,) = default_pipe.txt2img(**args, progress=False)
    prompt, negative, parameters = image.info["parameters"].split("\n")
    assert (prompt, negative) == (args["prompt"], f"Negative prompt: {args['negative_prompt']}")
    fields = dict(item.split(": ", 1) for item in parameters.split(", "))
    want = {"Steps": "4", "Sampler": "Euler a", "CFG scale": "5", "Seed": "7", "Size": "64x64", "RNG": "CPU"}
    assert {key: fields.get(key) for key in want} == want
    assert fields["Model"] == "shapes"
