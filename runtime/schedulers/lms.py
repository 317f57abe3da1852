"""Linear multistep sampler ("LMS"), as in k-diffusion's ``sample_lms`` (Crowson): the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma integrated with the Adams-Bashforth idea on a non-uniform grid: the
last (up to) 4 slopes are interpolated by a Lagrange polynomial in sigma, which is integrated exactly over
[sigma_i, sigma_{i+1}] (Karras et al. 2022 for the ODE; the multistep method is classical).

Behaves like diffusers' ``LMSDiscreteScheduler`` (which integrates the same polynomial numerically).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.polynomial import polynomial as P

from .ve import KDIFFUSION_DEFAULTS, VESampler

# diffusers' LMSDiscreteScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {**KDIFFUSION_DEFAULTS, "beta_start": 0.0001, "beta_end": 0.02}

MAX_ORDER = 4  # slopes kept, as in k-diffusion and diffusers


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Weights of the slopes at sigma_i, sigma_{i-1}, ... (newest first) for the step sigma_i -> sigma_{i+1}.

    Weight k is the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial that is 1 at
    sigma_{i-k} and 0 at the other ``order - 1`` nodes.
    """
    nodes = [float(sigmas[i - k]) for k in range(order)]
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])
    weights = []
    for k in range(order):
        basis = np.array([1.0])
        for m in range(order):
            if m != k:
                basis = P.polymul(basis, np.array([-nodes[m], 1.0]) / (nodes[k] - nodes[m]))
        antiderivative = P.polyint(basis)
        weights.append(float(P.polyval(hi, antiderivative) - P.polyval(lo, antiderivative)))
    return weights


class LMSScheduler(VESampler):
    """Deterministic linear multistep sampler; keeps the last 4 slopes, so steps must run in order."""

    name = "LMS"
    DEFAULTS = DEFAULTS

    def _reset_state(self) -> None:
        self._slopes: list[np.ndarray] = []  # dx/dsigma of the previous steps, oldest first

    def _step(self, j: int, model_output: np.ndarray, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        sigma = float(self.sigmas[j])
        self._slopes = [*self._slopes, (x - self.denoised(model_output, x, sigma)) / sigma][-MAX_ORDER:]
        order = min(j + 1, MAX_ORDER)
        weights = lms_coefficients(self.sigmas, j, order)
        return x + sum(w * slope for w, slope in zip(weights, reversed(self._slopes), strict=False))
