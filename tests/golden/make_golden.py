"""Make the golden numbers tests/test_golden.py holds sdlite to without torch.

Needs the convert extra (torch, diffusers, transformers). From the repository root, in the dev environment:

    python tests/golden/make_golden.py                 # every part
    python tests/golden/make_golden.py samplers rng    # only these parts

then commit the files it rewrites in tests/golden/. Regenerate a part when its reference changes on purpose
(a diffusers, transformers or torch upgrade, a sampler added to ``sdlite.schedulers.names()``, a new embedded
model, a changed case in test_golden.py), never to make a failing test pass before knowing why it fails.
The inputs (configs, prompts, seeds, cases, the fake model) are test_golden.py's own, imported from it.

- ``samplers.npz``: every A1111 sampler name run for 6 steps on SD 1.5's config by its reference, with
  test_golden.py's fake model: diffusers' scheduler (the mapping of tests/test_samplers_all.py, with its noise
  injection), or for DPM++ 2S a k-diffusion's loop on diffusers' Euler sigmas. Holds the starting unit noise
  ``x0``, the per-call noise bank ``noise`` both sides draw from, and per sampler its ``timesteps``,
  ``init_noise_sigma`` and ``final`` sample.
- ``tokenizer.json``: transformers' slow CLIPTokenizer (what diffusers uses) on the embedded model's tokenizer
  folder: per prompt the padded, truncated ``input_ids`` and the untruncated ``tokens``.
- ``rng.npz``: torch.randn on seeded CPU generators, drawn in test_golden.py's order.
- ``pipeline.npz``: the embedded default model's decoded images, made by sdlite itself (ONNX, fp32): the model
  ships without diffusers weights; tests/test_pipeline_parity.py ties sdlite's pipeline to diffusers.

The samplers, tokenizer and rng parts also run sdlite on what they wrote and fail where the test would.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent
sys.path.insert(0, str(GOLDEN.parent))  # tests/: test_golden and the torch tests' references

import test_golden as tg  # noqa: E402
import torch  # noqa: E402  (the convert extra)

from sdlite import Pipeline, schedulers  # noqa: E402
from sdlite.models import default_model_path  # noqa: E402


def _save(name: str, arrays: dict[str, np.ndarray]) -> None:
    path = GOLDEN / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


def _versions() -> np.ndarray:
    import diffusers
    import transformers

    return np.array(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    )


# --- samplers -----------------------------------------------------------------------------------------------


def _diffusers_run(name: str, schedule: str, x0_unit: np.ndarray, noise: np.ndarray):
    """Run the diffusers reference of ``name`` (an A1111 base name) the way test_samplers_all.py does."""
    import test_samplers_all as ref_tests

    with pytest.MonkeyPatch.context() as monkeypatch:
        ref = ref_tests.reference(name, tg.SD15, schedule, monkeypatch)
        ref.set_timesteps(tg.SAMPLER_STEPS)
        feed = ref_tests.NoiseFeed()
        ref_tests.patch_reference_noise(name, ref, feed, monkeypatch)
        sigma = float(ref.init_noise_sigma)
        x = torch.from_numpy(x0_unit * np.float32(sigma))
        for i, t in enumerate(ref.timesteps):
            feed.current = noise[i]
            x_in = ref.scale_model_input(x, t)
            eps = torch.from_numpy(tg.fake_model(x_in.numpy(), t.item()))
            x = ref.step(eps, t, x).prev_sample
        return ref.timesteps.numpy(), sigma, x.numpy()


def _kdiffusion_2s_ancestral(x0_unit: np.ndarray, noise: np.ndarray):
    """DPM++ 2S a: k-diffusion's loop (test_samplers_all.py's) on the sigmas diffusers' Euler scheduler picks,
    with the fake model as a k-diffusion denoiser; step i's noise is the one sdlite gets on its second call of
    that step (its only call, for the last step)."""
    import diffusers
    import test_samplers_all as ref_tests

    euler = diffusers.EulerDiscreteScheduler.from_config(tg.SD15)
    euler.set_timesteps(tg.SAMPLER_STEPS)
    log_sigmas = np.log(((1 - euler.alphas_cumprod) / euler.alphas_cumprod).numpy() ** 0.5)
    assert tg.SD15["prediction_type"] == "epsilon"

    def denoise(x, sigma):
        t = float(euler._sigma_to_t(np.array(float(sigma)), log_sigmas))
        scale = (sigma**2 + 1) ** 0.5
        return x - sigma * torch.from_numpy(tg.fake_model((x / scale).numpy(), t))

    sigma = float(euler.init_noise_sigma)
    calls = 2 * tg.SAMPLER_STEPS - 1
    step_noise = [torch.from_numpy(noise[min(2 * i + 1, calls - 1)]) for i in range(tg.SAMPLER_STEPS)]
    x0 = torch.from_numpy(x0_unit * np.float32(sigma))
    states = ref_tests.kdiffusion_dpmpp_2s_ancestral(denoise, x0, euler.sigmas, step_noise)
    assert len(states) == calls
    return euler.timesteps.numpy(), sigma, states[-1].numpy()


def make_samplers() -> None:
    """samplers.npz: every sampler's reference run (see the module docstring)."""
    gen = np.random.default_rng(0)
    x0_unit = gen.standard_normal(tg.SAMPLER_SHAPE).astype(np.float32)
    # Enough noise for the two-stage samplers' 2 * steps - 1 calls, and one more.
    noise = gen.standard_normal((2 * tg.SAMPLER_STEPS, *tg.SAMPLER_SHAPE)).astype(np.float32)
    import test_samplers_all as ref_tests

    known = {**ref_tests.REFERENCES, **ref_tests.OLD_REFERENCES}
    arrays = {"x0": x0_unit, "noise": noise, "versions": _versions()}
    for name in schedulers.names():
        if name == "DPM++ 2S a":
            timesteps, sigma, final = _kdiffusion_2s_ancestral(x0_unit, noise)
        elif name in known:
            timesteps, sigma, final = _diffusers_run(name, "automatic", x0_unit, noise)
        elif name.endswith(" Karras") and name.removesuffix(" Karras") in known:
            timesteps, sigma, final = _diffusers_run(name.removesuffix(" Karras"), "karras", x0_unit, noise)
        else:
            raise SystemExit(f"no reference for sampler {name!r}: add one to tests/test_samplers_all.py first")
        arrays |= {f"{name}.timesteps": timesteps, f"{name}.init_noise_sigma": np.array(sigma), f"{name}.final": final}
        _, ours = tg.run_sampler(name, x0_unit * np.float32(sigma), noise)
        err = float(np.max(np.abs(ours.astype(np.float64) - final))) / float(np.max(np.abs(final)))
        print(f"  {name:20s} {len(timesteps):2d} timesteps, sdlite off by {err:.1e} of max|ref|")
        assert err < tg.SAMPLER_RTOL, name
    _save("samplers", arrays)


# --- tokenizer ----------------------------------------------------------------------------------------------


def make_tokenizer() -> None:
    """tokenizer.json: transformers' slow CLIPTokenizer on the embedded model's tokenizer folder."""
    import transformers

    from sdlite.tokenizer import CLIPTokenizer

    folder = default_model_path() / "tokenizer"
    slow = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = CLIPTokenizer.from_folder(folder)
    prompts = {}
    for prompt in tg.TOKENIZER_PROMPTS:
        ids = slow(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        tokens = slow.convert_tokens_to_ids(slow.tokenize(prompt))
        prompts[prompt] = {"input_ids": ids, "tokens": tokens}
        assert ours(prompt)[0].tolist() == ids and ours.tokenize(prompt) == tokens, prompt
    data = {"reference": f"transformers {transformers.__version__} CLIPTokenizer", "prompts": prompts}
    path = GOLDEN / "tokenizer.json"
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB); sdlite agrees on {len(prompts)} prompts")


# --- rng ----------------------------------------------------------------------------------------------------


def make_rng() -> None:
    """rng.npz: torch.randn on seeded CPU generators."""
    from sdlite import rng

    arrays = {"versions": _versions()}
    for seed in tg.RNG_SEEDS:
        generator = torch.Generator("cpu").manual_seed(seed)
        draws = [
            torch.randn(shape, generator=generator, dtype=torch.float32).numpy().ravel() for shape in tg.RNG_SHAPES
        ]
        arrays[f"seed {seed}"] = np.concatenate(draws)
    generator = torch.Generator("cpu").manual_seed(tg.RNG_LONG_SEED)
    long = torch.randn(tg.RNG_LONG_COUNT, generator=generator, dtype=torch.float32).numpy()
    arrays["long"] = long[:: tg.RNG_LONG_STRIDE].copy()
    assert np.array_equal(rng.randn(tg.RNG_LONG_COUNT, tg.RNG_LONG_SEED, "cpu"), long)
    _save("rng", arrays)


# --- pipeline -----------------------------------------------------------------------------------------------


def make_pipeline() -> None:
    """pipeline.npz: the embedded default model's images, made by sdlite itself (see the module docstring)."""
    pipe = Pipeline.load(default_model_path())
    arrays = {}
    for case, args in tg.PIPELINE_CASES.items():
        arrays[f"{case}.args"] = np.array(json.dumps(args))
        arrays[f"{case}.image"] = pipe.txt2img(**args, output_type="np", progress=False)
    _save("pipeline", arrays)


PARTS = {"samplers": make_samplers, "tokenizer": make_tokenizer, "rng": make_rng, "pipeline": make_pipeline}


def main(argv: list[str] | None = None) -> int:
    """Write the golden files of the parts named (all by default)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"{', '.join(PARTS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    for part in args.parts or PARTS:
        print(f"{part}:")
        PARTS[part]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
