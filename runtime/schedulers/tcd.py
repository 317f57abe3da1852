"""Trajectory Consistency Distillation sampler ("TCD"): Zheng et al. 2024, "Trajectory Consistency
Distillation", Strategic Stochastic Sampling (sec. 4.3, Algorithm 4).

Each step predicts x0 and eps, jumps along the probability-flow trajectory to an intermediate timestep
s = floor((1 - gamma) t_prev) (the DDIM-style "pred_noised_sample"), then re-noises from s to the next
timestep t_prev with fresh noise; gamma (``eta``, default 0.3) sets how stochastic sampling is (gamma = 0
is deterministic DDIM-like, gamma = 1 is LCM-like). Meant for TCD-distilled models (TCD-LoRA).

Behaves like diffusers' ``TCDScheduler`` with ``step(..., eta=0.3)`` (its default).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .lcm import DEFAULTS as LCM_DEFAULTS
from .lcm import LCMScheduler

# diffusers' TCDScheduler defaults (the same keys and values as LCMScheduler's).
DEFAULTS: dict[str, Any] = dict(LCM_DEFAULTS)


class TCDScheduler(LCMScheduler):
    """Stochastic TCD sampler: ``step`` needs ``noise`` (unused on the last step, and when ``eta`` is 0).

    ``eta`` (the paper's gamma, in [0, 1]) is an attribute; set it after construction to change it.
    """

    name = "TCD"
    DEFAULTS = DEFAULTS
    eta = 0.3  # diffusers' default for TCDScheduler.step

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """True unless eta (gamma) is 0, which makes TCD deterministic."""
        return self.eta > 0

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One TCD step: to the intermediate timestep s along the trajectory, then re-noised to t_prev."""
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"TCD: eta (gamma) must be in [0, 1], got {self.eta}")
        i, model_output, x, noise = self._prepare(model_output, sample, timestep, noise)
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        # s = floor((1 - gamma) t_prev), in float32 as the reference computes it (it decides ties like 7.0).
        s = int(np.floor(np.float32(1 - self.eta) * np.float32(prev_t)))
        a_prev, a_s = self.alpha_bar(prev_t), self.alpha_bar(s)
        # Unlike LCM, the reference applies no clip_sample here.
        x0, eps = self.predict_x0_eps(model_output, x, t)
        noised = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps  # DDIM jump to s
        self._step_index = i + 1
        if self.eta == 0 or i == self.num_inference_steps - 1:
            return noised.astype(np.float32)
        ratio = a_prev / a_s
        return (ratio**0.5 * noised + (1 - ratio) ** 0.5 * noise).astype(np.float32)
