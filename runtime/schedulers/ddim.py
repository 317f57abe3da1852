"""DDIM sampler: Song et al. 2021, "Denoising Diffusion Implicit Models", deterministic (eta = 0).

Each step predicts x0 from the model output and re-noises it to the previous timestep along the
predicted noise direction (eq. 12 with sigma_t = 0). Behaves like diffusers' ``DDIMScheduler`` with
``eta=0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import (
    add_noise_vp,
    alphas_cumprod,
    betas_from_config,
    check_steps,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

# diffusers' DDIMScheduler defaults; a config key, when present, overrides them (as from_config does).
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DDIMScheduler:
    """Deterministic DDIM sampler. Stateless between steps: each ``step`` needs only its own inputs."""

    stochastic = False
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**DEFAULTS, **(config or {})}
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(
                f"DDIM: prediction_type {cfg['prediction_type']!r} is not supported; "
                f"expected one of {', '.join(PREDICTION_TYPES)}"
            )
        if cfg["thresholding"]:
            # Dynamic thresholding (Saharia et al. 2022) is for pixel-space models; SD works in latent space.
            raise NotImplementedError("DDIM: thresholding=True is not supported")
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.prediction_type: str = cfg["prediction_type"]
        self.timestep_spacing: str = cfg["timestep_spacing"]
        self.steps_offset = int(cfg["steps_offset"])
        # Clipping x0 to [-range, range] suits pixel-space models; SD configs turn it off.
        self.clip_sample_range = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        betas = betas_from_config(
            self.num_train_timesteps, cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"], cfg["trained_betas"]
        )
        if cfg["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = alphas_cumprod(betas)
        # alpha_bar "before" step 0: exactly clean (1) or the first training level.
        self.final_alpha_cumprod = 1.0 if cfg["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the integer timesteps for ``num_inference_steps`` denoising steps."""
        check_steps(num_inference_steps)
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"DDIM: steps must be <= num_train_timesteps ({self.num_train_timesteps}), got {num_inference_steps}"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = np.round(
            spaced_timesteps(
                self.num_inference_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset
            )
        ).astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Return ``sample`` unchanged: DDIM feeds the model the unscaled sample."""
        return sample

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Return x_{t-1} from x_t (``sample``) and the model output at ``timestep``; ``noise`` is ignored."""
        if self.num_inference_steps is None:
            raise RuntimeError("DDIM: call set_timesteps() before step()")
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        t = int(timestep)
        # The previous timestep is one stride back, whatever the spacing (as in the reference).
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            pred_x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            pred_eps = model_output
        elif self.prediction_type == "sample":
            pred_x0 = model_output
            pred_eps = (sample - a_t**0.5 * pred_x0) / b_t**0.5
        else:  # v_prediction (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1 - a) x0
            pred_x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            pred_eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if self.clip_sample_range is not None:
            pred_x0 = np.clip(pred_x0, -self.clip_sample_range, self.clip_sample_range)
        # DDIM eq. 12 with sigma_t = 0: "predicted x0" term plus "direction pointing to x_t".
        prev = a_prev**0.5 * pred_x0 + (1 - a_prev) ** 0.5 * pred_eps
        return prev.astype(np.float32)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Noise clean samples to integer ``timesteps`` (one per sample, or one for all)."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
