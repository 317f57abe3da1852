"""DPM2 ancestral sampler ("DPM2 a"): k-diffusion's ``sample_dpm_2_ancestral`` (Crowson): the DPM2 midpoint
step (see :mod:`.dpm2`) taken down to sigma_down, then fresh noise of size sigma_up added, with
sigma_down² + sigma_up² = sigma_{i+1}² (the ancestral split of Ho et al. 2020 / Song et al. 2021, eta = 1).
The midpoint is the geometric mean of sigma_i and sigma_down.

Behaves like diffusers' ``KDPM2AncestralDiscreteScheduler``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dpm2 import log_midpoint
from .ve import KDIFFUSION_DEFAULTS, TwoStageSampler

# diffusers' KDPM2AncestralDiscreteScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = dict(KDIFFUSION_DEFAULTS)


class DPM2AncestralScheduler(TwoStageSampler):
    """Stochastic DPM2 sampler: ``step`` needs ``noise``; it is used by each step's second evaluation."""

    name = "DPM2 a"
    stochastic = True
    DEFAULTS = DEFAULTS
    PREDICTION_TYPES = ("epsilon", "v_prediction")
    ROUND_KARRAS_TIMESTEPS = True

    def _split(self, i: int) -> tuple[float, float]:
        # (sigma_down, sigma_up) for step i, in float32 as the reference tabulates them.
        sigma, sigma_next = float(self._base_sigmas[i]), float(self._base_sigmas[i + 1])
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        return float(np.float32(sigma_down)), float(np.float32(sigma_up))

    def _stage_two_sigma(self, i: int) -> float:
        # The last step has no midpoint: it is a single Euler step to sigma = 0.
        if i >= len(self._base_timesteps) - 1:
            return 0.0
        return log_midpoint(float(self._base_sigmas[i]), self._split(i)[0])

    def _first_stage(
        self, i: int, denoised: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float, noise: np.ndarray | None
    ) -> np.ndarray:
        return x + (x - denoised) / sigma * (self._stage_two_sigma(i) - sigma)

    def _second_stage(
        self,
        i: int,
        denoised: np.ndarray,
        x: np.ndarray,
        start: np.ndarray,
        sigma: float,
        sigma_next: float,
        noise: np.ndarray | None,
    ) -> np.ndarray:
        sigma_down, sigma_up = self._split(i)
        x = start + (x - denoised) / self._stage_two_sigma(i) * (sigma_down - sigma)
        return x + noise * sigma_up
