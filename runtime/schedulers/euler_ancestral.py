"""Euler ancestral sampler ("Euler a"): Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithm 2 (Euler steps, no churn), with the ancestral step of
k-diffusion (Crowson): each step goes down to sigma_down with Euler's method on the probability-flow
ODE, then adds fresh noise of size sigma_up, so that sigma_down² + sigma_up² = sigma_next².

Works in the variance-exploding parametrisation x = x0 + sigma * eps; the model, trained on
variance-preserving inputs, is fed x / sqrt(sigma² + 1). Behaves like diffusers'
``EulerAncestralDiscreteScheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import (
    alphas_cumprod,
    betas_from_config,
    broadcast_per_sample,
    check_steps,
    index_for_timestep,
    rescale_zero_terminal_snr,
    spaced_timesteps,
    train_sigmas,
)

# diffusers' EulerAncestralDiscreteScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

PREDICTION_TYPES = ("epsilon", "v_prediction")


def ancestral_step(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """Split a step from ``sigma_from`` to ``sigma_to`` into (sigma_down, sigma_up) (k-diffusion, eta = 1).

    sigma_up is the noise the step re-injects; sigma_down is where the deterministic step must land so
    that adding that noise gives total noise sigma_to.
    """
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class EulerAncestralScheduler:
    """Stochastic Euler ancestral sampler: ``step`` needs ``noise`` (standard normal, model_output's shape).

    State: a step index. It is found from the first timestep passed to ``scale_model_input`` or ``step``
    after ``set_timesteps`` (so a loop may start mid-schedule, as img2img does) and advances by one per
    ``step``. ``set_timesteps`` resets it.
    """

    stochastic = True
    order = 1

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**DEFAULTS, **(config or {})}
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(
                f"Euler a: prediction_type {cfg['prediction_type']!r} is not supported; "
                f"expected one of {', '.join(PREDICTION_TYPES)}"
            )
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.prediction_type: str = cfg["prediction_type"]
        self.timestep_spacing: str = cfg["timestep_spacing"]
        self.steps_offset = int(cfg["steps_offset"])
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
        self.timesteps = np.zeros(0, dtype=np.float32)
        # Until set_timesteps, the noise levels of all training steps (for init_noise_sigma).
        self.sigmas = np.concatenate([self._train_sigmas[::-1], [0.0]]).astype(np.float32)
        self._step_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latent noise for the current schedule."""
        sigma_max = float(self.sigmas.max())
        if self.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        # sqrt(sigma_max² + 1) for "leading" spacing, as the reference does.
        return float(np.float32((sigma_max**2 + 1) ** 0.5))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the (float) timesteps and their sigmas for ``num_inference_steps`` steps."""
        check_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        # Unlike DDIM/PNDM, "linspace" timesteps stay fractional (the reference does not round them).
        self.timesteps = spaced_timesteps(
            self.num_inference_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset
        ).astype(np.float32)
        # Noise level at fractional timesteps: linear interpolation of the training table.
        sigmas = np.interp(self.timesteps, np.arange(self.num_train_timesteps), self._train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self._step_index = None

    def _index(self, timestep: Any) -> int:
        if self._step_index is None:
            # A full run starts at index 0 even when its first timestep repeats (the reference would jump
            # to the repeat and run off the end); a mid-schedule start is looked up.
            index = 0 if timestep == self.timesteps[0] else index_for_timestep(self.timesteps, timestep)
            if index is None:
                raise ValueError(f"Euler a: timestep {timestep!r} is not in the schedule set by set_timesteps()")
            self._step_index = index
        return self._step_index

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """Scale x (variance sigma² + 1) to the unit-variance input the model was trained on."""
        if self.num_inference_steps is None:
            raise RuntimeError("Euler a: call set_timesteps() before scale_model_input()")
        sigma = float(self.sigmas[self._index(timestep)])
        return (np.asarray(sample, dtype=np.float32) / (sigma**2 + 1) ** 0.5).astype(np.float32)

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One Euler ancestral step from sigma_i to sigma_{i+1}; ``noise`` is required."""
        if self.num_inference_steps is None:
            raise RuntimeError("Euler a: call set_timesteps() before step()")
        if noise is None:
            raise ValueError(
                "Euler a is stochastic: step() needs noise, a standard normal array of model_output's shape"
            )
        model_output = np.asarray(model_output, dtype=np.float32)
        x = np.asarray(sample, dtype=np.float32)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != model_output.shape:
            raise ValueError(f"Euler a: noise has shape {noise.shape}, expected {model_output.shape}")
        i = self._index(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if self.prediction_type == "epsilon":
            denoised = x - sigma * model_output
        else:  # v_prediction on the VP input x / sqrt(sigma² + 1)
            denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        d = (x - denoised) / sigma  # dx/dsigma of the probability-flow ODE (Karras et al. eq. 4 / Alg. 2)
        x = x + d * (sigma_down - sigma)
        x = x + noise * sigma_up
        self._step_index = i + 1
        return x.astype(np.float32)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Noise clean samples to ``timesteps`` of the current schedule: x = x0 + sigma * noise."""
        indices = []
        for t in np.asarray(timesteps).reshape(-1):
            index = index_for_timestep(self.timesteps, t)
            if index is None:
                raise ValueError(f"Euler a: timestep {t!r} is not in the schedule set by set_timesteps()")
            indices.append(index)
        sigma = broadcast_per_sample(self.sigmas[indices], np.ndim(original_samples))
        return (original_samples + noise * sigma).astype(np.float32)
