"""Shared machinery of the samplers that step between training timesteps of the VP process (DDIM, DDPM,
PNDM, LCM, TCD).

They work on variance-preserving samples x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al.
2020, eq. 4) at integer timesteps t, so ``init_noise_sigma`` is 1 and the model sees the sample unscaled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import add_noise_vp, alphas_cumprod_from_config, check_option, check_steps, spaced_timesteps
from .walk import ScheduleWalk

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def predict_x0_eps(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_bar: float
) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from a model output at a timestep with cumulative alpha ``alpha_bar`` (VP parametrisation).

    v_prediction is Salimans & Ho 2022: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.
    """
    a, b = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / b
    return a * sample - b * model_output, a * model_output + b * sample  # v_prediction


class VPSampler(ScheduleWalk):
    """Base class: config, alpha-bar table, spaced timesteps and ``add_noise`` of a discrete VP sampler.

    Subclasses set ``name`` and ``DEFAULTS`` (the diffusers class's defaults for the keys it reads) and
    implement ``step``. Options are read only where the reference class has them: ``thresholding``,
    ``clip_sample`` / ``clip_sample_range``, ``set_alpha_to_one``, ``rescale_betas_zero_snr``.
    """

    stochastic = False
    init_noise_sigma = 1.0
    DEFAULTS: dict[str, Any] = {}
    PREDICTION_TYPES: tuple[str, ...] = PREDICTION_TYPES

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**self.DEFAULTS, **(config or {})}
        who = self.name
        check_option(who, "prediction_type", cfg["prediction_type"], self.PREDICTION_TYPES)
        if "thresholding" in self.DEFAULTS and cfg["thresholding"]:
            # Dynamic thresholding (Saharia et al. 2022) is for pixel-space models; SD works in latent space.
            raise NotImplementedError(f"{who}: thresholding=True is not supported")
        self.config = cfg
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.prediction_type: str = cfg["prediction_type"]
        self.timestep_spacing: str = cfg["timestep_spacing"]
        self.steps_offset = int(cfg["steps_offset"])
        # Clipping x0 to [-range, range] suits pixel-space models; SD configs turn it off.
        clip = "clip_sample" in self.DEFAULTS and cfg["clip_sample"]
        self.clip_sample_range = float(cfg["clip_sample_range"]) if clip else None
        rescale = "rescale_betas_zero_snr" in self.DEFAULTS and bool(cfg["rescale_betas_zero_snr"])
        self.alphas_cumprod = alphas_cumprod_from_config({**cfg, "rescale_betas_zero_snr": rescale})
        # alpha_bar "before" step 0: exactly clean (1) or, with set_alpha_to_one=False, the first training level.
        to_one = "set_alpha_to_one" not in self.DEFAULTS or cfg["set_alpha_to_one"]
        self.final_alpha_cumprod = 1.0 if to_one else float(self.alphas_cumprod[0])
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.int64)

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        # The config's timestep spacing, rounded to integer training timesteps, descending.
        spaced = spaced_timesteps(
            num_inference_steps, self.num_train_timesteps, self.timestep_spacing, self.steps_offset
        )
        return np.round(spaced).astype(np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the integer timesteps for ``num_inference_steps`` denoising steps."""
        check_steps(num_inference_steps)
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"{self.name}: steps must be <= num_train_timesteps ({self.num_train_timesteps}), "
                f"got {num_inference_steps}"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = self._spaced_timesteps(self.num_inference_steps)
        self._restart()

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Return ``sample`` unchanged: the model sees the unscaled VP sample."""
        return sample

    def _check(self, model_output: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # (model_output, sample) as float32, once set_timesteps has run.
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps() before step()")
        return np.asarray(model_output, dtype=np.float32), np.asarray(sample, dtype=np.float32)

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at training timestep ``t``; before step 0 (t < 0), ``final_alpha_cumprod``."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def predict_x0_eps(self, model_output: np.ndarray, sample: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(x0, eps) from the model output at timestep ``t`` (see :func:`predict_x0_eps`)."""
        return predict_x0_eps(self.prediction_type, model_output, sample, float(self.alphas_cumprod[t]))

    def clip(self, x0: np.ndarray) -> np.ndarray:
        """``x0`` clipped to [-clip_sample_range, clip_sample_range] when clip_sample is set."""
        if self.clip_sample_range is None:
            return x0
        return np.clip(x0, -self.clip_sample_range, self.clip_sample_range)

    def noise_to(self, original_samples: np.ndarray, noise: np.ndarray, entry: int | list[int]) -> np.ndarray:
        """Noise clean samples to the timestep of schedule entry ``entry``."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, self.timesteps[np.atleast_1d(entry)])

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Noise clean samples to integer training ``timesteps`` (one per sample, or one for all): here a timestep
        names its noise level, in the schedule or not, as the training process defines it."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
