"""Heun sampler ("Heun"): Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 2 without churn: an Euler step to sigma_{i+1}, then the trapezoidal (Heun, 2nd order)
correction with the slope re-evaluated there (lines 7-8); the last step, to sigma = 0, stays Euler.

Behaves like diffusers' ``HeunDiscreteScheduler`` (k-diffusion's ``sample_heun``): two model evaluations
per step, so ``timesteps`` lists t_{i+1} twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ve import KDIFFUSION_DEFAULTS, TwoStageSampler

# diffusers' HeunDiscreteScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {**KDIFFUSION_DEFAULTS, "clip_sample": False, "clip_sample_range": 1.0}


class HeunScheduler(TwoStageSampler):
    """Deterministic Heun sampler (2nd order, two model evaluations per step)."""

    name = "Heun"
    DEFAULTS = DEFAULTS

    def _reset_state(self) -> None:
        super()._reset_state()
        self._slope: np.ndarray | None = None  # dx/dsigma at the start of the step in progress

    def denoised(self, model_output: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
        """Clean-sample estimate, clipped to [-clip_sample_range, clip_sample_range] when clip_sample is set."""
        denoised = super().denoised(model_output, x, sigma)
        if self.config["clip_sample"]:
            limit = float(self.config["clip_sample_range"])
            denoised = np.clip(denoised, -limit, limit)
        return denoised

    def _stage_two_sigma(self, i: int) -> float:
        return float(self._base_sigmas[i + 1])

    def _stage_two_timestep(self, i: int) -> float:
        return float(self._base_timesteps[i + 1])

    def _first_stage(
        self, i: int, denoised: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float, noise: np.ndarray | None
    ) -> np.ndarray:
        self._slope = (x - denoised) / sigma  # d_i (Alg. 2, line 5)
        return x + self._slope * (sigma_next - sigma)  # Euler step (line 6)

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
        slope_next = (x - denoised) / sigma_next  # d'_i (line 7)
        return start + (sigma_next - sigma) * (0.5 * self._slope + 0.5 * slope_next)  # line 8
