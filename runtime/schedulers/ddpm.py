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

from .sigmas import SPACINGS, TRAINING_DEFAULTS, check_noise, check_option
from .vp import VPSampler

# diffusers' DDPMScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

# "fixed_small_log" is the same standard deviation as "fixed_small", computed through a log.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPMScheduler(VPSampler):
    """Stochastic DDPM sampler: ``step`` needs ``noise`` (unused on the last step, t = 0)."""

    name = "DDPM"
    stochastic = True
    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        # learned / learned_range need a model that predicts its variance (not Stable Diffusion).
        check_option(self.name, "variance_type", cfg["variance_type"], VARIANCE_TYPES, NotImplementedError)
        check_option(self.name, "timestep_spacing", cfg["timestep_spacing"], SPACINGS)
        self.variance_type: str = cfg["variance_type"]
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

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
        model_output, x = self._check(model_output, sample)
        t = int(timestep)
        if t > 0:
            noise = check_noise(self.name, noise, model_output)
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(self._previous_timestep(t))
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha_step = a_t / a_prev  # alpha_t of the (possibly multi-step) transition t_prev -> t
        beta_step = 1 - alpha_step
        x0 = self.clip(self.predict_x0_eps(model_output, x, t)[0])
        # Posterior mean mu~_t(x_t, x0), Ho et al. 2020 eq. 7.
        prev = (a_prev**0.5 * beta_step / b_t) * x0 + (alpha_step**0.5 * b_prev / b_t) * x
        if t > 0:
            # beta_t ("fixed_large") or beta-tilde, the posterior variance of eq. 7, kept off zero.
            posterior = max(b_prev / b_t * beta_step, 1e-20)
            variance = beta_step if self.variance_type == "fixed_large" else posterior
            prev = prev + variance**0.5 * noise
        return prev.astype(np.float32)
