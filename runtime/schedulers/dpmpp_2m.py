"""DPM-Solver++(2M) sampler ("DPM++ 2M", "DPM++ 2M Karras"): Lu et al. 2022, "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2 (multistep, second order).

The solver integrates the diffusion ODE in log-SNR time lambda = log(alpha_t / sigma_t) using the
data prediction x0; each step reuses the previous step's x0 for a second-order correction, so one
model evaluation per step buys second order. The noise levels are the model's timesteps (default) or a
Karras (Karras et al. 2022, eq. 5), exponential or beta schedule over the training range. Behaves like
diffusers' ``DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
solver_order=2)`` (``use_karras_sigmas=True`` for "DPM++ 2M Karras").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .multistep import MultistepSampler
from .sigmas import TRAINING_DEFAULTS, check_noise, check_option, log_snr, vp_alpha_sigma

# diffusers' DPMSolverMultistepScheduler defaults for the keys this sampler reads; a config key, when
# present, overrides them (as from_config does). algorithm_type and solver_order are fixed by the
# sampler's name.
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "prediction_type": "epsilon",
    "thresholding": False,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "lambda_min_clipped": -float("inf"),
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "variance_type": None,
    "rescale_betas_zero_snr": False,
    "sigma_min": None,
    "sigma_max": None,
}

SOLVER_TYPES = ("midpoint", "heun")

# Below this many steps the last step is taken first order (lower_order_final), which the reference
# found more stable for few-step sampling.
_LOWER_ORDER_FINAL_BELOW = 15


class DPMPP2MScheduler(MultistepSampler):
    """DPM-Solver++(2M); deterministic.

    State: the previous step's x0 prediction and a step index. The index is found from the first timestep
    passed to ``step`` after ``set_timesteps`` (so a loop may start mid-schedule, as img2img does) and
    advances by one per ``step``. ``set_timesteps`` resets both.
    """

    name = "DPM++ 2M"
    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__({**(config or {}), "solver_order": 2})
        cfg, who = self.config, self.name
        check_option(who, "solver_type", cfg["solver_type"], SOLVER_TYPES)
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(
                f"{who}: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported; expected zero or sigma_min"
            )
        self.solver_type: str = cfg["solver_type"]
        self.euler_at_final = bool(cfg["euler_at_final"])
        self.final_sigmas_type: str = cfg["final_sigmas_type"]
        self.lambda_min_clipped = float(cfg["lambda_min_clipped"])
        # The reference rounds the timesteps of Karras sigmas, except for the cosine schedule, and truncates
        # the others.
        self.ROUND_KARRAS_TIMESTEPS = cfg["beta_schedule"] != "squaredcos_cap_v2"

    def _reset_state(self) -> None:
        self._prev_x0: np.ndarray | None = None  # x0 prediction of the previous step (the "2M" memory)
        self._steps_done = 0

    def _last_timestep(self) -> int:
        # Steps whose log-SNR falls below lambda_min_clipped are cut from the noisy end.
        lambdas = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(1 - self.alphas_cumprod))
        return self.num_train_timesteps - int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))

    def _final_sigma(self, sigmas: np.ndarray) -> float:
        # Last step lands on sigma 0 (a clean sample) or on the smallest training sigma.
        return 0.0 if self.final_sigmas_type == "zero" else float(self._train_sigmas[0])

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One step from sigma_i to sigma_{i+1}; ``noise`` is required when ``stochastic`` and ignored otherwise."""
        model_output, x = self._check(model_output, sample)
        if self.stochastic:
            noise = check_noise(self.name, noise, model_output)
        i = self._index(timestep)
        n = len(self.timesteps)
        x0 = self.data_prediction(model_output, x, float(self.sigmas[i])).astype(np.float32)
        # First order at the very end: always when the last sigma is 0 (the second-order term has h = inf),
        # and for short schedules, where it is the more stable choice.
        final_first_order = i == n - 1 and (
            self.euler_at_final
            or (self.lower_order_final and n < _LOWER_ORDER_FINAL_BELOW)
            or self.final_sigmas_type == "zero"
        )
        if self._steps_done < 1 or final_first_order or self._prev_x0 is None:
            prev = self._first_order(i, x, x0, noise)
        else:
            prev = self._second_order(i, x, x0, noise)
        self._prev_x0 = x0
        self._steps_done += 1
        self._step_index = i + 1
        return prev.astype(np.float32)

    def _vp_terms(self, i: int) -> tuple[float, float, float, float]:
        """(alpha_t, sigma_t, sigma_s) in VP form and h = lambda_t - lambda_s in log-SNR time, for the step from
        sigma_i (s) to sigma_{i+1} (t)."""
        sigma_s, sigma_t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha_t, sig_t = vp_alpha_sigma(sigma_t)
        _, sig_s = vp_alpha_sigma(sigma_s)
        return alpha_t, sig_t, sig_s, log_snr(sigma_t) - log_snr(sigma_s)

    def _first_order(self, i: int, x: np.ndarray, x0: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        # DPM-Solver++(1), Lu et al. 2022 eq. 8 (equivalent to DDIM):
        # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0.
        if self.sigmas[i + 1] == 0:
            return x0  # the limit h -> inf: the step lands on the clean prediction
        alpha_t, sig_t, sig_s, h = self._vp_terms(i)
        return (sig_t / sig_s) * x - (alpha_t * math.expm1(-h)) * x0

    def _second_order(self, i: int, x: np.ndarray, x0: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        # DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: D1 is the finite difference of x0 over the last
        # two steps, scaled by the step-size ratio r0 = h_prev / h.
        alpha_t, sig_t, sig_s0, h = self._vp_terms(i)
        if h == 0:
            # A zero-length step (final_sigmas_type="sigma_min" repeats the last sigma) leaves x unchanged.
            return x
        r0 = self._vp_terms(i - 1)[3] / h
        phi = alpha_t * math.expm1(-h)  # alpha_t (e^{-h} - 1)
        # Weight of D1: midpoint (Algorithm 2 as published) or the Heun-style variant of the reference.
        d1_coeff = -0.5 * phi if self.solver_type == "midpoint" else alpha_t * (math.expm1(-h) / h + 1.0)
        d1 = (1.0 / r0) * (x0 - self._prev_x0)
        return (sig_t / sig_s0) * x - phi * x0 + d1_coeff * d1
