"""How far float32 rounding alone can move a reference sampler's trajectory: the tolerance floor of the
sampler parity tests.

sdlite's samplers and diffusers' compute the same float32 tables (betas, alpha-bars, sigmas, log-SNRs) and
steps with the same formulas, but through different kernels: numpy's and torch's vectorised ``exp``, ``log``
and ``sqrt`` may differ by an ulp or two, and which code path they take depends on the CPU (AVX2, AVX-512,
AMX). On one machine both sides can agree bit for bit and on another differ by 2e-5 relative, because some
samplers amplify 1-ulp differences: third-order DEIS and UniPC take differences of nearby log-SNRs, and a
zero-terminal-SNR schedule starts at sigma = 4096, where an ulp of sigma is larger than the final sample.

So each parity loop also runs a *shadow* of the reference whose float32 tables and model outputs are moved
by a few ulps at random (a fixed pattern). How far the shadow strays from the reference is the trajectory's
sensitivity to rounding on this very configuration; a reimplementation that is right differs from the
reference by about that much on any CPU, while a wrong coefficient, step index or formula differs by orders
of magnitude more (a 0.1% change in one coefficient moves the sample by about 1e-3 relative).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# Ulps of jitter: kernels of different instruction sets differ by up to about 2 ulps (SLEEF's and numpy's
# float32 exp/log are documented within 1 ulp each, so two of them within 2).
JITTER_ULPS = 2
# The tolerance is this many times the shadow's distance: one fixed jitter pattern is not the other CPU's
# rounding pattern. Measured: the largest ratio of a real cross-CPU error to the shadow's distance was 4.8
# (DPM2 a, 4 steps, on an AMD EPYC: 2.25e-5 against 4.7e-6), so 8 leaves room; a 0.1% error in one DEIS
# coefficient or a wrong history index still exceeds the bound.
SENSITIVITY_MARGIN = 8.0
# The tables a diffusers scheduler steps with (attribute names across its scheduler classes). Timesteps are
# left alone: two-stage samplers find their step by exact equality of repeated timesteps.
TABLES = ("sigmas", "sigmas_interpol", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "betas", "alphas")


class Jitter:
    """Random +-JITTER_ULPS relative perturbations of float32 arrays, from a fixed seed."""

    def __init__(self, seed: int = 1234) -> None:
        self.gen = np.random.default_rng(seed)

    def array(self, x: np.ndarray) -> np.ndarray:
        """``x`` with every element moved by a random whole number of ulps in [-JITTER_ULPS, JITTER_ULPS]."""
        x = np.asarray(x)
        ulps = self.gen.integers(-JITTER_ULPS, JITTER_ULPS + 1, x.shape).astype(x.dtype)
        return (x * (1 + ulps * np.finfo(x.dtype).eps)).astype(x.dtype)

    def tensor(self, x):
        """A torch tensor jittered like :meth:`array`."""
        return torch.from_numpy(self.array(x.numpy()))

    def tables(self, scheduler) -> None:
        """Jitter the float tables of a diffusers scheduler in place (call after ``set_timesteps``)."""
        for name in TABLES:
            value = getattr(scheduler, name, None)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                setattr(scheduler, name, self.tensor(value))


def tolerance(floor: float, rtol: float) -> float:
    """The bound for one comparison: ``rtol``, or the trajectory's measured rounding sensitivity ``floor``
    times SENSITIVITY_MARGIN where that is larger (see the module docstring)."""
    return max(rtol, SENSITIVITY_MARGIN * floor)
