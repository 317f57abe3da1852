"""Shared machinery of the multistep solvers in log-SNR time (DPM++ 2M, DPM++ 2M SDE, UniPC, DEIS).

They work on variance-preserving samples x_t = alpha_t x0 + sigma_t eps (so ``init_noise_sigma`` is 1 and the
model input is not rescaled) and describe each noise level by its VE sigma = sigma_t / alpha_t. The schedule
is built as diffusers' multistep schedulers build it: integer timesteps from
:func:`~.sigmas.multistep_timesteps` with their sigmas interpolated from the training table, or a Karras /
exponential / beta schedule over the whole training range with timesteps mapped back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import (
    SPACINGS,
    alphas_cumprod_from_config,
    broadcast_per_sample,
    check_option,
    check_steps,
    multistep_timesteps,
    resample_sigmas,
    sigma_schedule_from_config,
    sigma_to_t,
    train_sigmas,
    vp_alpha_sigma,
)
from .walk import ScheduleWalk

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class MultistepSampler(ScheduleWalk):
    """Base class: config, schedule and noise levels of a VP multistep solver.

    Subclasses set ``name`` and ``DEFAULTS`` and implement ``_final_sigma``, ``_reset_state`` and ``step``.
    State: past model outputs and the step index (``sdlite.schedulers.walk``); ``set_timesteps`` resets both.
    """

    stochastic = False
    init_noise_sigma = 1.0
    DEFAULTS: dict[str, Any] = {}
    # Whether the timesteps of Karras sigmas are rounded (else truncated) to integers.
    ROUND_KARRAS_TIMESTEPS = True

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**self.DEFAULTS, **(config or {})}
        who = self.name
        check_option(who, "prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
        check_option(who, "timestep_spacing", cfg["timestep_spacing"], SPACINGS)
        for key in ("thresholding", "variance_type", "use_flow_sigmas", "use_dynamic_shifting", "use_lu_lambdas"):
            # Pixel-space (thresholding, learned variance) and flow-matching options; not for SD latents. Keys the
            # reference class does not have are not read (from_config ignores them too).
            if key in self.DEFAULTS and cfg[key]:
                raise NotImplementedError(f"{who}: {key}={cfg[key]!r} is not supported")
        self.config = cfg
        self.sigma_schedule = sigma_schedule_from_config(cfg, who)
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.prediction_type: str = cfg["prediction_type"]
        self.timestep_spacing: str = cfg["timestep_spacing"]
        self.steps_offset = int(cfg["steps_offset"])
        self.solver_order = int(cfg["solver_order"])
        if self.solver_order < 1:
            raise ValueError(f"{who}: solver_order must be >= 1, got {self.solver_order}")
        self.lower_order_final = bool(cfg["lower_order_final"])
        rescale = "rescale_betas_zero_snr" in self.DEFAULTS and bool(cfg["rescale_betas_zero_snr"])
        self.alphas_cumprod = alphas_cumprod_from_config({**cfg, "rescale_betas_zero_snr": rescale})
        self._train_sigmas = train_sigmas(self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.sigmas = self._train_sigmas.copy()
        self._reset_state()

    def _reset_state(self) -> None:
        """Forget the multistep history."""

    def _final_sigma(self, sigmas: np.ndarray) -> float:
        """The sigma the last step lands on, given the schedule's own sigmas."""
        raise NotImplementedError

    def _last_timestep(self) -> int | None:
        """The highest timestep a timestep-spaced schedule may start from (None: the last training step)."""
        return None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose integer timesteps and their sigmas for ``num_inference_steps`` steps; reset the history."""
        check_steps(num_inference_steps)
        n = int(num_inference_steps)
        if self.sigma_schedule is None:
            timesteps = multistep_timesteps(
                n, self.num_train_timesteps, self.timestep_spacing, self.steps_offset, self._last_timestep()
            )
            sigmas = np.interp(timesteps, np.arange(self.num_train_timesteps), self._train_sigmas)
        else:
            lo, hi = self.config.get("sigma_min"), self.config.get("sigma_max")
            sigmas = resample_sigmas(self.sigma_schedule, self._train_sigmas[::-1], n, lo, hi)
            t = sigma_to_t(sigmas, self._train_sigmas)
            if self.sigma_schedule == "karras" and self.ROUND_KARRAS_TIMESTEPS:
                t = np.round(t)
            timesteps = t.astype(np.int64)
        self.timesteps = timesteps
        self.sigmas = np.concatenate([sigmas, [self._final_sigma(sigmas)]]).astype(np.float32)
        self.num_inference_steps = len(timesteps)
        self._restart()
        self._reset_state()

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Return ``sample`` unchanged: the solver keeps samples in the model's (VP) scale."""
        return sample

    def _check(self, model_output: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps() before step()")
        return np.asarray(model_output, dtype=np.float32), np.asarray(sample, dtype=np.float32)

    def data_prediction(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        """The model's x0 estimate at VE noise level ``sigma``, for this sampler's prediction type."""
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if self.prediction_type == "sample":
            return model_output
        return alpha_t * sample - sigma_t * model_output  # v_prediction (Salimans & Ho 2022)

    def noise_to(self, original_samples: np.ndarray, noise: np.ndarray, entry: int | list[int]) -> np.ndarray:
        """Noise clean samples to schedule entry ``entry``: x = alpha_t x0 + sigma_t noise."""
        sigma = self.sigmas[np.atleast_1d(entry)].astype(np.float64)
        alpha_t = 1 / np.sqrt(sigma**2 + 1)
        ndim = np.ndim(original_samples)
        signal = broadcast_per_sample(alpha_t, ndim).astype(np.float32)
        noise_scale = broadcast_per_sample(sigma * alpha_t, ndim).astype(np.float32)
        return (signal * original_samples + noise_scale * noise).astype(np.float32)
