"""DPM2 sampler ("DPM2"): k-diffusion's ``sample_dpm_2`` (Crowson), a second-order DPM-Solver-2-style
midpoint method (Lu et al. 2022, "DPM-Solver", Algorithm 1 with r = 1/2) written in sigma: an Euler step to
the geometric midpoint sigma_mid = sqrt(sigma_i sigma_{i+1}), then the full step with the slope there
(Karras et al. 2022, Algorithm 2 structure). The last step, to sigma = 0, stays Euler.

Behaves like diffusers' ``KDPM2DiscreteScheduler``: ``timesteps`` interleaves t_i with the midpoints' t.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ve import KDIFFUSION_DEFAULTS, TwoStageSampler

# diffusers' KDPM2DiscreteScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = dict(KDIFFUSION_DEFAULTS)


def log_midpoint(a: float, b: float) -> float:
    """Geometric mean of two sigmas (the midpoint in log sigma); 0 when either is 0."""
    return float(np.float32((a * b) ** 0.5))


class DPM2Scheduler(TwoStageSampler):
    """Deterministic DPM2 sampler (two model evaluations per step)."""

    name = "DPM2"
    DEFAULTS = DEFAULTS
    PREDICTION_TYPES = ("epsilon", "v_prediction")
    ROUND_KARRAS_TIMESTEPS = True

    def _sigma_down(self, i: int) -> float:
        # Where step i's deterministic part lands: sigma_{i+1} (the ancestral variant lands lower).
        return float(self._base_sigmas[i + 1])

    def _stage_two_sigma(self, i: int) -> float:
        return log_midpoint(float(self._base_sigmas[i]), self._sigma_down(i))

    def _first_stage(
        self, i: int, denoised: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float, noise: np.ndarray | None
    ) -> np.ndarray:
        # Euler to the midpoint (to sigma = 0 on the last step, where the midpoint is 0).
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
        # The full step from the start point with the slope at the midpoint.
        return start + (x - denoised) / self._stage_two_sigma(i) * (self._sigma_down(i) - sigma)
