"""The schedule walk every sampler shares (torch-free): explicit starts on step boundaries, noising to an
entry, and one rule for a timestep that is not in the schedule."""

from __future__ import annotations

import numpy as np
import pytest

from sdlite import schedulers
from tests.scheduler_configs import SD15

SAMPLERS = [name for name in schedulers.names() if "Karras" not in name]
STEPS = 8


def _model(x: np.ndarray, t: float) -> np.ndarray:
    # A smooth stand-in for a U-Net: deterministic, depends on the sample and the timestep.
    return np.tanh(x * 0.5 + np.float32(t) / 1000).astype(np.float32)


def _run(sampler: schedulers.Scheduler, x: np.ndarray, start: int, explicit: bool) -> np.ndarray:
    sampler.set_timesteps(STEPS)
    if explicit:
        sampler.begin(start)
    rng = np.random.default_rng(5)
    for t in sampler.timesteps[start:]:
        noise = rng.standard_normal(x.shape).astype(np.float32) if sampler.stochastic else None
        x = sampler.step(_model(sampler.scale_model_input(x, t), t), t, x, noise=noise)
    return x


@pytest.mark.parametrize("name", SAMPLERS)
def test_begin_equals_the_timestep_lookup(name):
    # Starting at a step boundary explicitly gives what diffusers' contract (the first timestep passed) gives.
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    order = schedulers.create(name, SD15).order
    for step in (0, 3, STEPS - 1):
        start = step * order
        explicit = _run(schedulers.create(name, SD15), x, start, explicit=True)
        looked_up = _run(schedulers.create(name, SD15), x, start, explicit=False)
        np.testing.assert_array_equal(explicit, looked_up)
        assert np.isfinite(explicit).all()


@pytest.mark.parametrize("name", SAMPLERS)
def test_noise_to_entry_equals_add_noise(name):
    sampler = schedulers.create(name, SD15)
    sampler.set_timesteps(STEPS)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    for step in range(STEPS):
        entry = step * sampler.order
        got = sampler.noise_to(x0, noise, entry)
        want = sampler.add_noise(x0, noise, np.full(2, sampler.timesteps[entry]))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if schedulers.create(n, SD15).order == 2])
def test_begin_refuses_the_middle_of_a_step(name):
    sampler = schedulers.create(name, SD15)
    sampler.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="does not begin a step"):
        sampler.begin(3)
    with pytest.raises(ValueError, match="does not begin a step"):
        sampler.begin(len(sampler.timesteps) + 1)


@pytest.mark.parametrize("name", SAMPLERS)
def test_unknown_timestep_is_an_error(name):
    sampler = schedulers.create(name, SD15)
    sampler.set_timesteps(STEPS)
    x = np.zeros((1, 4, 8, 8), np.float32)
    if name in ("DDIM", "DDPM", "PNDM"):
        pytest.skip("steps between training timesteps: any training timestep names a noise level")
    with pytest.raises(ValueError, match="not in the schedule"):
        sampler.step(x, 1234.5, x, noise=x)
