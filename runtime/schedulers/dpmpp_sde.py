"""DPM-Solver++ SDE sampler ("DPM++ SDE"): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling
of Diffusion Probabilistic Models", the second-order singlestep solver (DPM-Solver++(2S), Algorithm 1) made
stochastic the ancestral way, as k-diffusion's ``sample_dpmpp_sde`` (Crowson) does with r = 1/2, eta = 1.

In log-sigma time t = -log(sigma), with h = t_{i+1} - t_i and the midpoint s = t_i + h/2:
each stage is a first-order DPM-Solver++ step (eq. 8, x_to = (sigma_down / sigma_i) x_i
- (sigma_down / sigma_i - 1) D) to the ancestral sigma_down of its target, plus sigma_up times fresh
noise; stage one goes to s with D(x_i; sigma_i), stage two goes from x_i to t_{i+1} with D at the
midpoint (k-diffusion's fac = 1 / (2r) = 1 leaves only the midpoint estimate). The last step, to
sigma = 0, is Euler.

Behaves like diffusers' ``DPMSolverSDEScheduler`` given the same noise. Noise: the reference draws it from a
Brownian tree (torchsde), which correlates the two stages' noise within a step; sdlite takes the fresh
standard-normal ``noise`` passed to each ``step`` call instead (plain per-step noise), so a seed gives
different images than A1111/diffusers, with the same sampler equations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .sigmas import sigma_to_t
from .ve import KDIFFUSION_DEFAULTS, TwoStageSampler, ancestral_split

# diffusers' DPMSolverSDEScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = dict(KDIFFUSION_DEFAULTS)


def dpmpp_ancestral_step(
    x: np.ndarray, denoised: np.ndarray, sigma: float, sigma_to: float, noise: np.ndarray
) -> np.ndarray:
    """First-order DPM-Solver++ step from ``sigma`` toward ``sigma_to`` with an ancestral noise split (eta = 1)."""
    sigma_down, sigma_up = ancestral_split(sigma, sigma_to)
    ratio = sigma_down / sigma  # = exp(-(t_down - t)), so the DPM-Solver++ weight is ratio - 1
    return ratio * x - (ratio - 1.0) * denoised + noise * sigma_up


class DPMPPSDEScheduler(TwoStageSampler):
    """Stochastic DPM-Solver++ (SDE) sampler: ``step`` needs ``noise`` (both evaluations of a step use it)."""

    name = "DPM++ SDE"
    stochastic = True
    DEFAULTS = DEFAULTS
    PREDICTION_TYPES = ("epsilon", "v_prediction")
    TIMESTEP_DTYPE = np.float64

    def _stage_two_sigma(self, i: int) -> float:
        # exp(-(t_i + h/2)): the midpoint of the step in log sigma.
        t, t_next = -math.log(float(self._base_sigmas[i])), -math.log(float(self._base_sigmas[i + 1]))
        return math.exp(-(t + 0.5 * (t_next - t)))

    def _stage_two_timestep(self, i: int) -> float:
        # The reference places the midpoint timestep using the float64 sigmas, before rounding to float32.
        sigmas = np.concatenate([self._sigmas64, [0.0]])
        t, t_next = -np.log(sigmas[i]), -np.log(sigmas[i + 1])
        return float(sigma_to_t(np.array([np.exp(-(t + 0.5 * (t_next - t)))]), self._train_sigmas)[0])

    def _first_stage(
        self, i: int, denoised: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float, noise: np.ndarray | None
    ) -> np.ndarray:
        if sigma_next == 0:
            return x + (x - denoised) / sigma * (sigma_next - sigma)  # Euler to the clean sample
        return dpmpp_ancestral_step(x, denoised, sigma, self._stage_two_sigma(i), noise)

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
        return dpmpp_ancestral_step(start, denoised, sigma, sigma_next, noise)
