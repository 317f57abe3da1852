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

from .sigmas import (
    alphas_cumprod,
    betas_from_config,
    broadcast_per_sample,
    check_steps,
    index_for_timestep,
    multistep_timesteps,
    resample_sigmas,
    rescale_zero_terminal_snr,
    sigma_schedule_from_config,
    sigma_to_t,
    train_sigmas,
)

# diffusers' DPMSolverMultistepScheduler defaults for the keys this sampler reads; a config key, when
# present, overrides them (as from_config does). algorithm_type and solver_order are fixed by the
# sampler's name.
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
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

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SOLVER_TYPES = ("midpoint", "heun")

# Below this many steps the last step is taken first order (lower_order_final), which the reference
# found more stable for few-step sampling.
_LOWER_ORDER_FINAL_BELOW = 15


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    # VE sigma -> VP (alpha_t, sigma_t) with alpha_t² + sigma_t² = 1.
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def _lambda(sigma: float) -> float:
    # log-SNR lambda = log(alpha_t / sigma_t) = -log(sigma).
    alpha_t, sigma_t = _alpha_sigma(sigma)
    return math.log(alpha_t) - math.log(sigma_t)


class DPMPP2MScheduler:
    """DPM-Solver++(2M); deterministic.

    State: the previous step's x0 prediction and a step index. The index is found from the first timestep
    passed to ``step`` after ``set_timesteps`` (so a loop may start mid-schedule, as img2img does) and
    advances by one per ``step``. ``set_timesteps`` resets both.
    """

    name = "DPM++ 2M"
    stochastic = False
    order = 1  # model evaluations per step
    init_noise_sigma = 1.0  # works on VP samples: x_t = alpha_t x0 + sigma_t eps

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**DEFAULTS, **(config or {})}
        who = self.name
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(
                f"{who}: prediction_type {cfg['prediction_type']!r} is not supported; "
                f"expected one of {', '.join(PREDICTION_TYPES)}"
            )
        if cfg["solver_type"] not in SOLVER_TYPES:
            raise ValueError(
                f"{who}: solver_type {cfg['solver_type']!r} is not supported; expected one of {', '.join(SOLVER_TYPES)}"
            )
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(
                f"{who}: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported; expected zero or sigma_min"
            )
        self.sigma_schedule = sigma_schedule_from_config(cfg, who)
        for key in ("thresholding", "use_flow_sigmas", "use_lu_lambdas", "variance_type"):
            # Pixel-space (thresholding, learned variance) and flow-matching options; not for SD latents.
            if cfg[key]:
                raise NotImplementedError(f"{who}: {key}={cfg[key]!r} is not supported")
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.prediction_type: str = cfg["prediction_type"]
        self.solver_type: str = cfg["solver_type"]
        self.lower_order_final = bool(cfg["lower_order_final"])
        self.euler_at_final = bool(cfg["euler_at_final"])
        self.final_sigmas_type: str = cfg["final_sigmas_type"]
        self.timestep_spacing: str = cfg["timestep_spacing"]
        self.steps_offset = int(cfg["steps_offset"])
        self.lambda_min_clipped = float(cfg["lambda_min_clipped"])
        self._sigma_min_override = cfg["sigma_min"]
        self._sigma_max_override = cfg["sigma_max"]
        # The reference rounds the timesteps of Karras sigmas, except for the cosine schedule, and truncates
        # the others.
        self._round_timesteps = cfg["beta_schedule"] != "squaredcos_cap_v2"
        betas = betas_from_config(
            self.num_train_timesteps, cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"], cfg["trained_betas"]
        )
        if cfg["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = alphas_cumprod(betas)
        if cfg["rescale_betas_zero_snr"]:
            # Zero terminal SNR means infinite sigma; keep it finite (the reference's 2^-24).
            self.alphas_cumprod[-1] = 2.0**-24
        self._train_sigmas = train_sigmas(self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.sigmas = self._train_sigmas.copy()
        self._reset_state()

    def _reset_state(self) -> None:
        self._step_index: int | None = None
        self._prev_x0: np.ndarray | None = None  # x0 prediction of the previous step (the "2M" memory)
        self._steps_done = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the integer timesteps and their sigmas for ``num_inference_steps`` steps; reset the history."""
        check_steps(num_inference_steps)
        n = int(num_inference_steps)
        if self.sigma_schedule is None:
            # Steps whose log-SNR falls below lambda_min_clipped are cut from the noisy end.
            lambdas = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(1 - self.alphas_cumprod))
            clipped = int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
            last_timestep = self.num_train_timesteps - clipped
            timesteps = multistep_timesteps(
                n, self.num_train_timesteps, self.timestep_spacing, self.steps_offset, last_timestep
            )
            sigmas = np.interp(timesteps, np.arange(self.num_train_timesteps), self._train_sigmas)
        else:
            sigmas = resample_sigmas(
                self.sigma_schedule, self._train_sigmas[::-1], n, self._sigma_min_override, self._sigma_max_override
            )
            t = sigma_to_t(sigmas, self._train_sigmas)
            if self.sigma_schedule == "karras" and self._round_timesteps:
                t = np.round(t)
            timesteps = t.astype(np.int64)
        self.timesteps = timesteps
        # Last step lands on sigma 0 (a clean sample) or on the smallest training sigma.
        last = 0.0 if self.final_sigmas_type == "zero" else float(self._train_sigmas[0])
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.num_inference_steps = len(timesteps)
        self._reset_state()

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Return ``sample`` unchanged: the solver keeps samples in the model's (VP) scale."""
        return sample

    def _index(self, timestep: Any) -> int:
        if self._step_index is None:
            # A full run starts at index 0 even when its first timestep repeats (the reference would jump
            # to the repeat and run off the end); a mid-schedule start is looked up.
            index = 0 if timestep == self.timesteps[0] else index_for_timestep(self.timesteps, timestep)
            # Like the reference, an unknown timestep means "the last step".
            self._step_index = len(self.timesteps) - 1 if index is None else index
        return self._step_index

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        # DPM-Solver++ works with x0 (Lu et al. 2022, sec. 4): convert the model output to it.
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if self.prediction_type == "sample":
            return model_output
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One step from sigma_i to sigma_{i+1}; ``noise`` is required when ``stochastic`` and ignored otherwise."""
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps() before step()")
        model_output = np.asarray(model_output, dtype=np.float32)
        x = np.asarray(sample, dtype=np.float32)
        if self.stochastic:
            if noise is None:
                raise ValueError(
                    f"{self.name} is stochastic: step() needs noise, a standard normal array of model_output's shape"
                )
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != model_output.shape:
                raise ValueError(f"{self.name}: noise has shape {noise.shape}, expected {model_output.shape}")
        i = self._index(timestep)
        n = len(self.timesteps)
        sigma_s0, sigma_t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x0 = self._data_prediction(model_output, x, sigma_s0).astype(np.float32)
        # First order at the very end: always when the last sigma is 0 (the second-order term has h = inf),
        # and for short schedules, where it is the more stable choice.
        final_first_order = i == n - 1 and (
            self.euler_at_final
            or (self.lower_order_final and n < _LOWER_ORDER_FINAL_BELOW)
            or self.final_sigmas_type == "zero"
        )
        if self._steps_done < 1 or final_first_order or self._prev_x0 is None:
            prev = self._first_order(x, x0, sigma_s0, sigma_t, noise)
        else:
            prev = self._second_order(x, x0, self._prev_x0, float(self.sigmas[i - 1]), sigma_s0, sigma_t, noise)
        self._prev_x0 = x0
        self._steps_done += 1
        self._step_index = i + 1
        return prev.astype(np.float32)

    def _first_order(
        self, x: np.ndarray, x0: np.ndarray, sigma_s: float, sigma_t: float, noise: np.ndarray | None
    ) -> np.ndarray:
        # DPM-Solver++(1), Lu et al. 2022 eq. 8 (equivalent to DDIM):
        # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0.
        if sigma_t == 0:
            return x0  # the limit h -> inf: the step lands on the clean prediction
        alpha_t, sig_t = _alpha_sigma(sigma_t)
        _, sig_s = _alpha_sigma(sigma_s)
        h = _lambda(sigma_t) - _lambda(sigma_s)
        return (sig_t / sig_s) * x - (alpha_t * math.expm1(-h)) * x0

    def _second_order(
        self,
        x: np.ndarray,
        x0: np.ndarray,
        prev_x0: np.ndarray,
        sigma_s1: float,
        sigma_s0: float,
        sigma_t: float,
        noise: np.ndarray | None,
    ) -> np.ndarray:
        # DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: D1 is the finite difference of x0 over the last
        # two steps, scaled by the step-size ratio r0 = h_prev / h.
        alpha_t, sig_t = _alpha_sigma(sigma_t)
        _, sig_s0 = _alpha_sigma(sigma_s0)
        lam_t, lam_s0, lam_s1 = _lambda(sigma_t), _lambda(sigma_s0), _lambda(sigma_s1)
        h, h_prev = lam_t - lam_s0, lam_s0 - lam_s1
        if h == 0:
            # A zero-length step (final_sigmas_type="sigma_min" repeats the last sigma) leaves x unchanged.
            return x
        r0 = h_prev / h
        phi = alpha_t * math.expm1(-h)  # alpha_t (e^{-h} - 1)
        # Weight of D1: midpoint (Algorithm 2 as published) or the Heun-style variant of the reference.
        d1_coeff = -0.5 * phi if self.solver_type == "midpoint" else alpha_t * (math.expm1(-h) / h + 1.0)
        d1 = (1.0 / r0) * (x0 - prev_x0)
        return (sig_t / sig_s0) * x - phi * x0 + d1_coeff * d1

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Noise clean samples to ``timesteps`` of the current schedule: x = alpha_t x0 + sigma_t noise."""
        indices = []
        for t in np.asarray(timesteps).reshape(-1):
            index = index_for_timestep(self.timesteps, t)
            indices.append(len(self.timesteps) - 1 if index is None else index)
        sigma = self.sigmas[indices].astype(np.float64)
        alpha_t = 1 / np.sqrt(sigma**2 + 1)
        ndim = np.ndim(original_samples)
        signal = broadcast_per_sample(alpha_t, ndim).astype(np.float32)
        noise_scale = broadcast_per_sample(sigma * alpha_t, ndim).astype(np.float32)
        return (signal * original_samples + noise_scale * noise).astype(np.float32)
