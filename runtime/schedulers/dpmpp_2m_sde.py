"""SDE-DPM-Solver++(2M) sampler ("DPM++ 2M SDE", "DPM++ 2M SDE Karras"): Lu et al. 2022, "DPM-Solver++:
Fast Solver for Guided Sampling of Diffusion Probabilistic Models", the multistep second-order solver of
the diffusion SDE in data-prediction form (sec. 5 / Appendix: SDE-DPM-Solver++(2M)).

Per step, in log-SNR time with h = lambda_t - lambda_s (x0 = the model's data prediction):
    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) x0 + sigma_t sqrt(1 - e^{-2h}) z
plus, from the second step on, a correction with the finite difference D1 of x0 over the last two steps
(weight alpha_t (1 - e^{-2h}) / 2 for the "midpoint" solver type). z is fresh standard-normal noise.

Behaves like diffusers' ``DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++",
solver_order=2)``, given the same per-step noise. (k-diffusion's ``sample_dpmpp_2m_sde`` is the same
method; A1111 draws its noise from a Brownian tree, sdlite from the per-step ``noise`` argument.)
"""

from __future__ import annotations

import math

import numpy as np

from .dpmpp_2m import DPMPP2MScheduler


class DPMPP2MSDEScheduler(DPMPP2MScheduler):
    """Stochastic DPM-Solver++(2M) SDE sampler: ``step`` needs ``noise`` (standard normal, model_output's shape)."""

    name = "DPM++ 2M SDE"
    stochastic = True

    def _first_order(self, i: int, x: np.ndarray, x0: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        if self.sigmas[i + 1] == 0:
            return x0  # h -> inf: e^{-h} = 0 and sigma_t = 0, only the data prediction remains
        alpha_t, sig_t, sig_s, h = self._vp_terms(i)
        decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        return (sig_t / sig_s * math.exp(-h)) * x + (alpha_t * decay) * x0 + (sig_t * math.sqrt(decay)) * noise

    def _second_order(self, i: int, x: np.ndarray, x0: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        alpha_t, sig_t, sig_s0, h = self._vp_terms(i)
        if h == 0:
            return x  # a zero-length step (final_sigmas_type="sigma_min")
        decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        d1 = (h / self._vp_terms(i - 1)[3]) * (x0 - self._prev_x0)  # (1 / r0) (x0 - x0_prev), r0 = h_prev / h
        # Weight of D1: midpoint (as published) or the Heun-style variant of the reference.
        d1_coeff = 0.5 * alpha_t * decay if self.solver_type == "midpoint" else alpha_t * (decay / (-2.0 * h) + 1.0)
        return (
            (sig_t / sig_s0 * math.exp(-h)) * x
            + (alpha_t * decay) * x0
            + d1_coeff * d1
            + (sig_t * math.sqrt(decay)) * noise
        )
