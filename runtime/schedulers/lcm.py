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

from .sigmas import add_noise_vp, alphas_cumprod_from_config, check_steps, index_for_timestep

# diffusers' LCMScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
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

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
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


def predict_x0_eps(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_bar: float
) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from a model output at a timestep with cumulative alpha ``alpha_bar`` (VP parametrisation)."""
    a, b = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / b
    return a * sample - b * model_output, a * model_output + b * sample  # v_prediction


class LCMScheduler:
    """Stochastic LCM sampler: ``step`` needs ``noise`` (unused on the last step)."""

    name = "LCM"
    stochastic = True
    order = 1
    init_noise_sigma = 1.0
    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**self.DEFAULTS, **(config or {})}
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(
                f"{self.name}: prediction_type {cfg['prediction_type']!r} is not supported; "
                f"expected one of {', '.join(PREDICTION_TYPES)}"
            )
        if cfg["thresholding"]:
            # Dynamic thresholding (Saharia et al. 2022) is for pixel-space models; SD works in latent space.
            raise NotImplementedError(f"{self.name}: thresholding=True is not supported")
        self.config = cfg
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.original_inference_steps = int(cfg["original_inference_steps"])
        self.prediction_type: str = cfg["prediction_type"]
        self.clip_sample_range = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        self.alphas_cumprod = alphas_cumprod_from_config(cfg)
        # alpha_bar "before" step 0: exactly clean (1) or the first training level.
        self.final_alpha_cumprod = 1.0 if cfg["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps from the distillation schedule; reset the step index."""
        self.timesteps = consistency_timesteps(
            num_inference_steps, self.num_train_timesteps, self.original_inference_steps, self.name
        )
        self.num_inference_steps = int(num_inference_steps)
        self._step_index = None

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Return ``sample`` unchanged: the model sees the unscaled sample."""
        return sample

    def _index(self, timestep: Any) -> int:
        if self._step_index is None:
            index = index_for_timestep(self.timesteps, timestep)
            if index is None:
                raise ValueError(f"{self.name}: timestep {timestep!r} is not in the schedule set by set_timesteps()")
            self._step_index = index
        return self._step_index

    def _prepare(
        self, model_output: np.ndarray, sample: np.ndarray, timestep: Any, noise: np.ndarray | None
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps() before step()")
        model_output = np.asarray(model_output, dtype=np.float32)
        i = self._index(timestep)
        if i < self.num_inference_steps - 1:
            if noise is None:
                raise ValueError(
                    f"{self.name} is stochastic: step() needs noise, a standard normal array of model_output's shape"
                )
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != model_output.shape:
                raise ValueError(f"{self.name}: noise has shape {noise.shape}, expected {model_output.shape}")
        return i, model_output, np.asarray(sample, dtype=np.float32), noise

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One consistency step: denoise with f(x, t), then re-noise to the next timestep (not after the last)."""
        i, model_output, x, noise = self._prepare(model_output, sample, timestep, noise)
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        scaled_t = t * float(self.config["timestep_scaling"])
        c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5
        x0, _ = predict_x0_eps(self.prediction_type, model_output, x, a_t)
        if self.clip_sample_range is not None:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        denoised = c_out * x0 + c_skip * x  # the consistency function (eq. 7)
        self._step_index = i + 1
        if i == self.num_inference_steps - 1:
            return denoised.astype(np.float32)
        return (a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * noise).astype(np.float32)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Noise clean samples to integer ``timesteps`` (one per sample, or one for all)."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
