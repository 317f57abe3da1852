"""Latent Consistency Model sampler ("LCM"): Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference", Algorithm 3 (multistep consistency sampling).

Each step maps x_t to a clean estimate with the consistency function f(x, t) = c_skip(t) x + c_out(t) x0
(eq. 7; the boundary-condition scalings of Song et al. 2023 with sigma_data = 0.5 on t scaled by
``timestep_scaling``), then re-noises it to the next timestep with fresh noise. Meant for models distilled
for it (LCM / LCM-LoRA); any model runs, with poor images.

Behaves like diffusers' ``LCMScheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import TRAINING_DEFAULTS, check_noise, check_steps
from .vp import VPSampler

# diffusers' LCMScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}

SIGMA_DATA = 0.5  # data standard deviation assumed by the consistency-model scalings


def consistency_timesteps(
    num_inference_steps: int, num_train_timesteps: int, original_steps: int, who: str
) -> np.ndarray:
    """The timesteps of LCM / TCD: ``num_inference_steps`` picked evenly from the distillation schedule.

    Distillation used ``original_steps`` timesteps k - 1, 2k - 1, ..., T - 1 (k = T // original_steps);
    sampling takes every (original_steps / steps)-th of them from the top, so it can use at most
    ``original_steps`` steps.
    """
    check_steps(num_inference_steps)
    n = int(num_inference_steps)
    if original_steps > num_train_timesteps:
        raise ValueError(
            f"{who}: original_inference_steps ({original_steps}) must be <= num_train_timesteps ({num_train_timesteps})"
        )
    if n > original_steps:
        raise ValueError(f"{who}: steps must be <= original_inference_steps ({original_steps}), got {n}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.int64)


class LCMScheduler(VPSampler):
    """Stochastic LCM sampler: ``step`` needs ``noise`` (unused on the last step)."""

    name = "LCM"
    stochastic = True
    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.original_inference_steps = int(self.config["original_inference_steps"])
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps from the distillation schedule; reset the step index."""
        self.timesteps = consistency_timesteps(
            num_inference_steps, self.num_train_timesteps, self.original_inference_steps, self.name
        )
        self.num_inference_steps = int(num_inference_steps)
        self._restart()

    def _prepare(
        self, model_output: np.ndarray, sample: np.ndarray, timestep: Any, noise: np.ndarray | None
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
        model_output, sample = self._check(model_output, sample)
        i = self._index(timestep)
        if i < self.num_inference_steps - 1:
            noise = check_noise(self.name, noise, model_output)
        return i, model_output, sample, noise

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One consistency step: denoise with f(x, t), then re-noise to the next timestep (not after the last)."""
        i, model_output, x, noise = self._prepare(model_output, sample, timestep, noise)
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_prev = self.alpha_bar(prev_t)
        scaled_t = t * float(self.config["timestep_scaling"])
        c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5
        x0 = self.clip(self.predict_x0_eps(model_output, x, t)[0])
        denoised = c_out * x0 + c_skip * x  # the consistency function (eq. 7)
        self._step_index = i + 1
        if i == self.num_inference_steps - 1:
            return denoised.astype(np.float32)
        return (a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * noise).astype(np.float32)
