"""sdlite.schedulers against diffusers (the reference), and sdlite.rng.

Every loop runs our sampler and the diffusers class side by side on the same sample, with the same
fake model and (for Euler a) the same per-step noise, and compares timesteps, model inputs and the
sample after every step. Tolerance: max|ours - ref| / max|ref| < 1e-5 (float32 math on both sides,
in a different order).
"""

from __future__ import annotations

import numpy as np
import pytest
from scheduler_configs import SD15

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_euler_ancestral_discrete  # noqa: E402

from sdlite import rng, schedulers  # noqa: E402

# Every test here needs torch: diffusers' schedulers are the reference (torch-free: tests/test_golden.py).
pytestmark = pytest.mark.torch

RTOL = 1e-5
SHAPE = (2, 4, 8, 8)


CONFIGS = {
    "sd15": SD15,
    "trailing": {**SD15, "timestep_spacing": "trailing"},
    "linspace": {**SD15, "timestep_spacing": "linspace"},
}


def reference(name: str, config: dict):
    """The diffusers scheduler an A1111 sampler name stands for."""
    if name == "PNDM":
        return diffusers.PNDMScheduler.from_config(config)
    if name == "DDIM":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "Euler a":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    if name == "DPM++ 2M Karras":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2
        )
    raise AssertionError(name)


def fake_model(x: np.ndarray, t) -> np.ndarray:
    """A deterministic stand-in for the U-Net (diffusers' x * t / (t + 1), made less trivial)."""
    t = float(t)
    x = x.astype(np.float32)
    return (x * (t / (t + 1)) * 0.9 + np.float32(0.1) * np.sin(x + np.float32(t / 100))).astype(np.float32)


def rel_err(ours: np.ndarray, ref) -> float:
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert np.shape(ours) == ref.shape
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - ref))) / (scale if scale > 0 else 1.0)


def run_side_by_side(name: str, config: dict, steps: int, monkeypatch) -> float:
    """Run both samplers for `steps` steps; assert they agree after every step; return the max error seen."""
    ours = schedulers.create(name, config)
    ref = reference(name, config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)

    ref_t = ref.timesteps.numpy()
    np.testing.assert_array_equal(ours.timesteps, ref_t)
    assert ours.timesteps.dtype.kind == ref_t.dtype.kind  # int for PNDM/DDIM/DPM, float for Euler a
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    gen = np.random.default_rng(0)
    x0 = gen.standard_normal(SHAPE).astype(np.float32) * np.float32(ours.init_noise_sigma)
    noises = [gen.standard_normal(SHAPE).astype(np.float32) for _ in ours.timesteps]
    calls = iter(noises)
    # Euler a draws its noise inside step(); hand it the same array ours gets.
    monkeypatch.setattr(
        scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: torch.from_numpy(next(calls).copy())
    )

    x, x_ref = x0.copy(), torch.from_numpy(x0.copy())
    worst = 0.0
    for i, (t, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps, strict=True)):
        x_in = ours.scale_model_input(x, t)
        x_in_ref = ref.scale_model_input(x_ref, t_ref)
        worst = max(worst, rel_err(x_in, x_in_ref))
        eps = fake_model(x_in, t)
        eps_ref = torch.from_numpy(fake_model(x_in_ref.numpy(), t_ref.item()))
        x = ours.step(eps, t, x, noise=noises[i] if ours.stochastic else None)
        x_ref = ref.step(eps_ref, t_ref, x_ref).prev_sample
        assert x.dtype == np.float32
        err = rel_err(x, x_ref)
        assert err < RTOL, f"{name} step {i} (t={t}): relative error {err:.2e}"
        worst = max(worst, err)
    return worst


SAMPLERS = ["DDIM", "DPM++ 2M Karras", "Euler a", "PNDM"]


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_matches_diffusers(name, prediction_type, config_name, steps, monkeypatch):
    config = {**CONFIGS[config_name], "prediction_type": prediction_type}
    run_side_by_side(name, config, steps, monkeypatch)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("DDIM", {"prediction_type": "sample"}),
        ("DPM++ 2M Karras", {"prediction_type": "sample"}),
        # Class defaults: linear betas, clip_sample and set_alpha_to_one on for DDIM, PRK warm-up for PNDM.
        ("DDIM", None),
        ("PNDM", None),
        ("Euler a", None),
        ("DPM++ 2M Karras", None),
        ("PNDM", {"skip_prk_steps": False}),
        ("PNDM", {"skip_prk_steps": False, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
        ("DDIM", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
        ("Euler a", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
        ("Euler a", {"beta_schedule": "linear", "steps_offset": 0}),
        ("DPM++ 2M Karras", {"solver_type": "heun"}),
        ("DPM++ 2M Karras", {"final_sigmas_type": "sigma_min"}),
        ("DPM++ 2M Karras", {"euler_at_final": True, "lower_order_final": False}),
        ("DDIM", {"beta_schedule": "squaredcos_cap_v2"}),
        ("DPM++ 2M Karras", {"sigma_min": 0.1, "sigma_max": 10.0}),
        ("PNDM", {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}),
    ],
)
@pytest.mark.parametrize("steps", [4, 20])
def test_matches_diffusers_other_configs(name, overrides, steps, monkeypatch):
    config = {} if overrides is None else {**SD15, **overrides}
    run_side_by_side(name, config, steps, monkeypatch)


def test_dpm_cosine_schedule_with_repeated_first_timestep():
    # Karras sigmas on the cosine schedule repeat the first timestep ([998, 998, 983, 0]); the reference's
    # step-index lookup then jumps to the repeat and runs off the end, so compare the schedule only and check
    # that our full run takes every step.
    config = {**SD15, "beta_schedule": "squaredcos_cap_v2"}
    ours, ref = schedulers.create("DPM++ 2M Karras", config), reference("DPM++ 2M Karras", config)
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert rel_err(ours.sigmas, ref.sigmas) < RTOL
    assert ours.timesteps[0] == ours.timesteps[1]
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for t in ours.timesteps:
        x = ours.step(fake_model(x, t), t, x)
    assert np.isfinite(x).all()


def test_pndm_runge_kutta_needs_four_steps():
    sched = schedulers.create("PNDM", {**SD15, "skip_prk_steps": False})
    with pytest.raises(ValueError, match="at least 4 steps"):
        sched.set_timesteps(3)


@pytest.mark.parametrize("name", SAMPLERS)
def test_add_noise_matches_diffusers(name):
    ours, ref = schedulers.create(name, SD15), reference(name, SD15)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    gen = np.random.default_rng(1)
    original = gen.standard_normal(SHAPE).astype(np.float32)
    noise = gen.standard_normal(SHAPE).astype(np.float32)
    for pair in ([0, 0], [3, 7], [9, 1]):
        t = ours.timesteps[pair]
        got = ours.add_noise(original, noise, t)
        want = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), torch.from_numpy(t))
        assert got.dtype == np.float32
        assert rel_err(got, want) < RTOL
    # One timestep for the whole batch broadcasts.
    t = ours.timesteps[2:3]
    got = ours.add_noise(original, noise, t)
    want = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), torch.from_numpy(t))
    assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_index_follows_a_mid_schedule_start(name, monkeypatch):
    # img2img runs only the tail of the schedule; the first timestep passed picks the step index.
    ours, ref = schedulers.create(name, SD15), reference(name, SD15)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    start = 4
    gen = np.random.default_rng(2)
    x = gen.standard_normal(SHAPE).astype(np.float32)
    noises = [gen.standard_normal(SHAPE).astype(np.float32) for _ in ours.timesteps]
    calls = iter(noises[start:])
    monkeypatch.setattr(
        scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: torch.from_numpy(next(calls).copy())
    )
    x_ref = torch.from_numpy(x.copy())
    for i in range(start, len(ours.timesteps)):
        t, t_ref = ours.timesteps[i], ref.timesteps[i]
        eps = fake_model(ours.scale_model_input(x, t), t)
        eps_ref = torch.from_numpy(fake_model(ref.scale_model_input(x_ref, t_ref).numpy(), t_ref.item()))
        x = ours.step(eps, t, x, noise=noises[i])
        x_ref = ref.step(eps_ref, t_ref, x_ref).prev_sample
        assert rel_err(x, x_ref) < RTOL


def test_karras_sigmas_follow_eq_5():
    sched = schedulers.create("DPM++ 2M Karras", SD15)
    sched.set_timesteps(5)
    sigmas = sched.sigmas[:-1].astype(np.float64)
    # Uniform steps in sigma^(1/7), from sigma_max to sigma_min, then a final 0.
    steps = np.diff(sigmas ** (1 / 7))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-5)
    assert sched.sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(14.6146, rel=1e-4)  # SD 1.5's largest training sigma


# --- the factory -------------------------------------------------------------------------------------


def test_names():
    # The full list (issue 7) is checked in test_samplers_all.py; these four must stay.
    assert {"DDIM", "DPM++ 2M Karras", "Euler a", "PNDM"} <= set(schedulers.names())


@pytest.mark.parametrize(
    "spelling, cls",
    [
        ("euler a", schedulers.EulerAncestralScheduler),
        ("EULER_A", schedulers.EulerAncestralScheduler),
        ("Eulera", schedulers.EulerAncestralScheduler),
        ("dpm++2mkarras", schedulers.DPMPP2MScheduler),
        ("  DPM++ 2M  KARRAS ", schedulers.DPMPP2MScheduler),
        ("ddim", schedulers.DDIMScheduler),
        ("Pndm", schedulers.PNDMScheduler),
    ],
)
def test_create_ignores_case_and_spacing(spelling, cls):
    assert isinstance(schedulers.create(spelling, SD15), cls)


def test_unknown_sampler():
    with pytest.raises(schedulers.UnknownSamplerError) as info:
        schedulers.create("foo", SD15)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == f"unknown sampler 'foo'; known samplers: {', '.join(schedulers.names())}"


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [0, -3])
def test_steps_must_be_positive(name, steps):
    sched = schedulers.create(name, SD15)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sched.set_timesteps(steps)


def test_euler_a_needs_noise():
    sched = schedulers.create("Euler a", SD15)
    sched.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="needs noise"):
        sched.step(fake_model(x, t), t, x)


@pytest.mark.parametrize("name", ["PNDM", "Euler a"])
def test_unsupported_prediction_type(name):
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        schedulers.create(name, {**SD15, "prediction_type": "sample"})


def test_config_keys_fall_back_to_class_defaults():
    # The same (empty) config means different things per class, as with diffusers' from_config.
    assert schedulers.create("DDIM", {}).clip_sample_range == 1.0
    assert schedulers.create("DDIM", SD15).clip_sample_range is None
    euler = schedulers.create("Euler a", {})
    euler.set_timesteps(3)
    np.testing.assert_array_equal(euler.timesteps, np.array([999.0, 499.5, 0.0], np.float32))


# --- rng -----------------------------------------------------------------------------------------------


def test_rng_same_seed_same_noise():
    a = rng.randn((2, 4, 8, 8), seed=42, source="numpy")
    b = rng.NoiseGenerator(42, "numpy").randn((2, 4, 8, 8))
    assert a.dtype == np.float32 and a.shape == (2, 4, 8, 8)
    np.testing.assert_array_equal(a, b)
    want = np.random.Generator(np.random.PCG64(42)).standard_normal((2, 4, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(a, want)


def test_rng_different_seeds_differ():
    assert not np.array_equal(rng.randn(64, seed=1), rng.randn(64, seed=2))


def test_rng_stream_advances():
    gen = rng.NoiseGenerator(7, "numpy")
    first, second = gen.randn(64), gen.randn(64)
    assert not np.array_equal(first, second)
    # The stream is one sequence: two draws of 64 equal one draw of 128.
    np.testing.assert_array_equal(np.concatenate([first, second]), rng.randn(128, seed=7, source="numpy"))


def test_rng_large_seed():
    assert rng.randn(4, seed=2**64 - 1).shape == (4,)
    with pytest.raises(ValueError, match="seed"):
        rng.randn(4, seed=2**64)
    with pytest.raises(ValueError, match="seed"):
        rng.randn(4, seed=-1)


def test_rng_unknown_source():
    assert "numpy" in rng.SOURCES  # the other sources: tests/test_rng_sources.py
    with pytest.raises(ValueError, match="unknown noise source 'cuda'; known sources: "):
        rng.NoiseGenerator(0, source="cuda")
