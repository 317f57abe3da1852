"""DDIM sampler: Song et al. 2021, "Denoising Diffusion Implicit Models", deterministic (eta = 0).

Each step predicts x0 from the model output and re-noises it to the previous timestep along the
predicted noise direction (eq. 12 with sigma_t = 0). Behaves like diffusers' ``DDIMScheduler`` with
``eta=0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import TRAINING_DEFAULTS
from .vp import VPSampler

# diffusers' DDIMScheduler defaults; a config key, when present, overrides them (as from_config does).
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


class DDIMScheduler(VPSampler):
    """Deterministic DDIM sampler. Stateless between steps: each ``step`` needs only its own inputs."""

    name = "DDIM"
    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        if self.config["rescale_betas_zero_snr"]:
            # Unlike the samplers in sigma, the reference keeps alpha_bar_T = 0 (pure noise; use v-prediction).
            self.alphas_cumprod[-1] = 0.0

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Return x_{t-1} from x_t (``sample``) and the model output at ``timestep``; ``noise`` is ignored."""
        model_output, sample = self._check(model_output, sample)
        t = int(timestep)
        # The previous timestep is one stride back, whatever the spacing (as in the reference).
        a_prev = self.alpha_bar(t - self.num_train_timesteps // self.num_inference_steps)
        pred_x0, pred_eps = self.predict_x0_eps(model_output, sample, t)
        pred_x0 = self.clip(pred_x0)
        # DDIM eq. 12 with sigma_t = 0: "predicted x0" term plus "direction pointing to x_t".
        prev = a_prev**0.5 * pred_x0 + (1 - a_prev) ** 0.5 * pred_eps
        return prev.astype(np.float32)
