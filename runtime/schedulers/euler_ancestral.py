"""Euler ancestral sampler ("Euler a"): Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 2 (Euler steps, no churn), with the ancestral step of
k-diffusion (Crowson): each step goes down to sigma_down with Euler's method on the probability-flow
ODE, then adds fresh noise of size sigma_up, so that sigma_down² + sigma_up² = sigma_next².

Works in the variance-exploding parametrisation x = x0 + sigma * eps; the model, trained on
variance-preserving inputs, is fed x / sqrt(sigma² + 1). Behaves like diffusers'
``EulerAncestralDiscreteScheduler``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .euler import euler_step
from .sigmas import TRAINING_DEFAULTS
from .ve import VESampler, ancestral_split

# diffusers' EulerAncestralDiscreteScheduler defaults; a config key, when present, overrides them. diffusers'
# class has no use_*_sigmas options; sdlite's takes them as its Euler does, so "Euler a" runs on the Karras,
# exponential and beta schedules as A1111's does (k-diffusion's sample_euler_ancestral over those sigmas).
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


class EulerAncestralScheduler(VESampler):
    """Stochastic Euler ancestral sampler: ``step`` needs ``noise`` (standard normal, model_output's shape).

    State: a step index. It is found from the first timestep passed to ``scale_model_input`` or ``step``
    after ``set_timesteps`` (so a loop may start mid-schedule, as img2img does) and advances by one per
    ``step``. ``set_timesteps`` resets it.
    """

    name = "Euler a"
    stochastic = True
    DEFAULTS = DEFAULTS
    PREDICTION_TYPES = ("epsilon", "v_prediction")

    def _step(self, j: int, model_output: np.ndarray, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        sigma, sigma_next = float(self.sigmas[j]), float(self.sigmas[j + 1])
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
        # Euler down to sigma_down (Karras et al. Alg. 2), then the fresh noise of the ancestral step.
        return euler_step(x, self.denoised(model_output, x, sigma), sigma, sigma_down) + noise * sigma_up
