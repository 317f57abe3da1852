"""DPM2 ancestral sampler ("DPM2 a"): k-diffusion's ``sample_dpm_2_ancestral`` (Crowson): the DPM2 midpoint
step (see :mod:`.dpm2`) taken down to sigma_down, then fresh noise of size sigma_up added, with
sigma_down² + sigma_up² = sigma_{i+1}² (the ancestral split of Ho et al. 2020 / Song et al. 2021, eta = 1).
The midpoint is the geometric mean of sigma_i and sigma_down.

Behaves like diffusers' ``KDPM2AncestralDiscreteScheduler``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dpm2 import DPM2Scheduler
from .ve import KDIFFUSION_DEFAULTS, ancestral_split

# diffusers' KDPM2AncestralDiscreteScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = dict(KDIFFUSION_DEFAULTS)


class DPM2AncestralScheduler(DPM2Scheduler):
    """Stochastic DPM2 sampler: ``step`` needs ``noise``; it is used by each step's second evaluation."""

    name = "DPM2 a"
    stochastic = True
    DEFAULTS = DEFAULTS

    def _split(self, i: int) -> tuple[float, float]:
        # (sigma_down, sigma_up) for step i, in float32 as the reference tabulates them.
        sigma_down, sigma_up = ancestral_split(float(self._base_sigmas[i]), float(self._base_sigmas[i + 1]))
        return float(np.float32(sigma_down)), float(np.float32(sigma_up))

    def _sigma_down(self, i: int) -> float:
        # The last step (to sigma = 0) has sigma_down = 0, so no midpoint: a single Euler step.
        return self._split(i)[0]

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
        x = super()._second_stage(i, denoised, x, start, sigma, sigma_next, noise)
        return x + noise * self._split(i)[1]
