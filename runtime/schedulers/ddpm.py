"""DDPM sampler ("DDPM"): Ho et al. 2020, "Denoising Diffusion Probabilistic Models": ancestral sampling
of the reverse process. Each step predicts x0, takes the mean of the posterior q(x_{t-1} | x_t, x0)
(eq. 7) between the current and the previous timestep of the schedule, and adds noise of the posterior's
variance ("fixed_small", beta-tilde of eq. 7) or of beta_t ("fixed_large"), sec. 3.2.

Behaves like diffusers' ``DDPMScheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import SPACINGS, add_noise_vp, alphas_cumprod_from_config, check_steps, spaced_timesteps

# diffusers' DDPMScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# "fixed_small_log" is the same standard deviation as "fixed_small", computed through a log.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPMScheduler:
    """Stochastic DDPM sampler: ``step`` needs ``noise`` (unused on the last step, t = 0)."""

    name = "DDPM"
    stochastic = True
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**DEFAULTS, **(config or {})}
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(
                f"DDPM: prediction_type {cfg['prediction_type']!r} is not supported; "
                f"expected one of {', '.join(PREDICTION_TYPES)}"
            )
        if cfg["variance_type"] not in VARIANCE_TYPES:
            # learned / learned_range need a model that predicts its variance (not Stable Diffusion).
            raise NotImplementedError(
                f"DDPM: variance_type {cfg['variance_type']!r} is not supported; expected one of "
                f"{', '.join(VARIANCE_TYPES)}"
            )
        if cfg["timestep_spacing"] not in SPACINGS:
            raise ValueError(
                f"DDPM: timestep_spacing {cfg['timestep_spacing']!r} is not supported; "
                f"expected one of {', '.join(SPACINGS)}"
            )
        if cfg["thresholding"]:
            # Dynamic thresholding (Saharia et al. 2022) is for pixel-space models; SD works in latent space.
            raise NotImplementedError("DDPM: thresholding=True is not supported")
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.prediction_type: str = cfg["prediction_type"]
        self.variance_type: str = cfg["variance_type"]
        self.timestep_spacing: str = cfg["timestep_spacing"]
        self.steps_offset = int(cfg["steps_offset"])
        self.clip_sample_range = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        self.alphas_cumprod = alphas_cumprod_from_config(cfg)
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the integer timesteps for ``num_inference_steps`` steps."""
        check_steps(num_inference_steps)
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"DDPM: steps must be <= num_train_timesteps ({self.num_train_timesteps}), got {num_inference_steps}"
            )
        self.num_inference_steps = int(num_inference_steps)
        spaced = spaced_timesteps(
            self.num_inference_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset
        )
        self.timesteps = np.round(spaced).astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Return ``sample`` unchanged: DDPM feeds the model the unscaled sample."""
        return sample

    def _previous_timestep(self, t: int) -> int:
        # The next entry of the schedule, or -1 (alpha_bar = 1, the clean sample) after the last.
        matches = np.flatnonzero(self.timesteps == t)
        if len(matches) == 0:
            raise ValueError(f"DDPM: timestep {t!r} is not in the schedule set by set_timesteps()")
        index = int(matches[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Return x_{t_prev} sampled from the posterior; ``noise`` is required (ignored at t = 0)."""
        if self.num_inference_steps is None:
            raise RuntimeError("DDPM: call set_timesteps() before step()")
        model_output = np.asarray(model_output, dtype=np.float32)
        x = np.asarray(sample, dtype=np.float32)
        t = int(timestep)
        if t > 0 and noise is None:
            raise ValueError("DDPM is stochastic: step() needs noise, a standard normal array of model_output's shape")
        prev_t = self._previous_timestep(t)
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha_step = a_t / a_prev  # alpha_t of the (possibly multi-step) transition t_prev -> t
        beta_step = 1 - alpha_step
        if self.prediction_type == "epsilon":
            x0 = (x - b_t**0.5 * model_output) / a_t**0.5
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction (Salimans & Ho 2022)
            x0 = a_t**0.5 * x - b_t**0.5 * model_output
        if self.clip_sample_range is not None:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # Posterior mean mu~_t(x_t, x0), Ho et al. 2020 eq. 7.
        prev = (a_prev**0.5 * beta_step / b_t) * x0 + (alpha_step**0.5 * b_prev / b_t) * x
        if t > 0:
            # beta_t ("fixed_large") or beta-tilde, the posterior variance of eq. 7, kept off zero.
            posterior = max(b_prev / b_t * beta_step, 1e-20)
            variance = beta_step if self.variance_type == "fixed_large" else posterior
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != model_output.shape:
                raise ValueError(f"DDPM: noise has shape {noise.shape}, expected {model_output.shape}")
            prev = prev + variance**0.5 * noise
        return prev.astype(np.float32)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Noise clean samples to integer ``timesteps`` (one per sample, or one for all)."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
