"""Euler sampler ("Euler"): Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 2 without churn (S_churn = 0), i.e. Euler's method on the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma (eq. 4 with sigma(t) = t).

Behaves like diffusers' ``EulerDiscreteScheduler`` (k-diffusion's ``sample_euler``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .sigmas import TRAINING_DEFAULTS
from .ve import VESampler

# diffusers' EulerDiscreteScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}


def euler_step(x: np.ndarray, denoised: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
    """One Euler step of the probability-flow ODE from ``sigma`` to ``sigma_next`` (Karras et al., Alg. 2)."""
    d = (x - denoised) / sigma  # dx/dsigma
    return x + d * (sigma_next - sigma)


class EulerScheduler(VESampler):
    """Deterministic Euler sampler, one model evaluation per step."""

    name = "Euler"
    DEFAULTS = DEFAULTS

    def __init__(self, config=None) -> None:
        super().__init__(config)
        for key, supported in (("interpolation_type", "linear"), ("timestep_type", "discrete")):
            # log_linear sigmas and continuous (EDM) timesteps are for models SD checkpoints are not.
            if self.config[key] != supported:
                raise NotImplementedError(f"Euler: {key}={self.config[key]!r} is not supported")

    def _step(self, j: int, model_output: np.ndarray, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        sigma, sigma_next = float(self.sigmas[j]), float(self.sigmas[j + 1])
        return euler_step(x, self.denoised(model_output, x, sigma), sigma, sigma_next)
