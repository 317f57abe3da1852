"""DPM-Solver++(2S) ancestral sampler ("DPM++ 2S a"): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", Algorithm 1 (singlestep, second order, r = 1/2) with the
ancestral noise split of k-diffusion's ``sample_dpmpp_2s_ancestral`` (Crowson), eta = 1.

Each step splits sigma_i -> sigma_{i+1} into sigma_down and sigma_up (sigma_down² + sigma_up² =
sigma_{i+1}²), takes DPM-Solver++(2S) from sigma_i to sigma_down in log-sigma time t = -log(sigma)
(h = t_down - t_i, midpoint s = t_i + h/2):
    u = (sigma_s / sigma_i) x - expm1(-h/2) D(x; sigma_i)
    x = (sigma_down / sigma_i) x - expm1(-h) D(u; sigma_s)
then adds sigma_up times fresh noise. The last step, to sigma = 0, is Euler.

diffusers has no ancestral DPM-Solver++(2S) (its ``DPMSolverSinglestepScheduler`` is deterministic and
schedules its orders differently), so this matches k-diffusion's function. Its noise levels are built the
way :mod:`.euler` builds them (diffusers' ``EulerDiscreteScheduler`` config and defaults), so the same
config and schedule give the same sigmas as "Euler". Two model evaluations per step, listed in
``timesteps`` like diffusers' two-stage samplers.
"""

from __future__ import annotations

import math

import numpy as np

from .euler import DEFAULTS as EULER_DEFAULTS
from .ve import TwoStageSampler, ancestral_split

# Euler's config keys, less those this sampler has no use for; it always ends on sigma = 0.
DEFAULTS = {
    key: value
    for key, value in EULER_DEFAULTS.items()
    if key not in ("interpolation_type", "timestep_type", "final_sigmas_type")
}


class DPMPP2SAncestralScheduler(TwoStageSampler):
    """Stochastic DPM-Solver++(2S) ancestral sampler: ``step`` needs ``noise``; each step's second
    evaluation uses it."""

    name = "DPM++ 2S a"
    stochastic = True
    DEFAULTS = DEFAULTS

    def _stage_two_sigma(self, i: int) -> float:
        sigma = float(self._base_sigmas[i])
        sigma_down, _ = ancestral_split(sigma, float(self._base_sigmas[i + 1]))
        if sigma_down == 0:
            return 0.0
        # sigma at the midpoint s = t + h/2 in t = -log(sigma): the geometric mean of sigma and sigma_down.
        t, t_down = -math.log(sigma), -math.log(sigma_down)
        return math.exp(-(t + 0.5 * (t_down - t)))

    def _first_stage(
        self, i: int, denoised: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float, noise: np.ndarray | None
    ) -> np.ndarray:
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
        if sigma_down == 0:
            # Euler to the clean sample (the last step); nothing to add when sigma_next is 0.
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
            return x + noise * sigma_up if sigma_next > 0 else x
        h = math.log(sigma) - math.log(sigma_down)
        return (self._stage_two_sigma(i) / sigma) * x - math.expm1(-h / 2) * denoised

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
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
        h = math.log(sigma) - math.log(sigma_down)
        x = (sigma_down / sigma) * start - math.expm1(-h) * denoised
        return x + noise * sigma_up
