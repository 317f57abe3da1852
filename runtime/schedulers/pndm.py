"""PNDM / PLMS sampler: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds".

Each step moves the sample along the DDIM "transfer" of eq. (9) (the pseudo-numerical step), fed with a
noise estimate combined from several model evaluations: Runge-Kutta (PRK, eq. 13) for the first
steps, then the 4th-order linear multistep (Adams-Bashforth) formula (PLMS, eq. 12). With
``skip_prk_steps`` (Stable Diffusion's config) the warm-up is a Heun step followed by 2nd- and
3rd-order multistep steps instead of the RK4 warm-up. Behaves like diffusers' ``PNDMScheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import TRAINING_DEFAULTS, check_steps
from .vp import VPSampler

# diffusers' PNDMScheduler defaults; a config key, when present, overrides them (as from_config does).
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}

# RK4 needs four points to start the 4th-order multistep formula.
_PNDM_ORDER = 4


class PNDMScheduler(VPSampler):
    """Pseudo linear multistep sampler (PLMS), with or without the pseudo Runge-Kutta warm-up.

    State: the method is multistep, so it keeps past noise estimates; ``step`` must be called once per
    entry of ``timesteps``, in order. ``set_timesteps`` resets the state.
    """

    name = "PNDM"
    order = 1  # as diffusers' PNDM: a strength cut counts entries (the duplicated entry is an extra evaluation)
    DEFAULTS = DEFAULTS
    PREDICTION_TYPES = ("epsilon", "v_prediction")

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.skip_prk_steps = bool(self.config["skip_prk_steps"])
        self._prk_count = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self._counter = 0  # number of step() calls since set_timesteps
        self._ets: list[np.ndarray] = []  # past noise estimates, newest last
        self._cur_sample: np.ndarray | None = None  # start point of the RK / Heun step in progress
        self._rk_sum: np.ndarray | float = 0.0  # running RK4 weighted sum of slopes

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps for ``num_inference_steps`` denoising steps and reset the multistep state."""
        check_steps(num_inference_steps)
        n = int(num_inference_steps)
        if not self.skip_prk_steps and n < _PNDM_ORDER:
            raise ValueError(
                f"PNDM with skip_prk_steps=False needs at least {_PNDM_ORDER} steps for its Runge-Kutta "
                f"warm-up, got {n}"
            )
        base = self._spaced_timesteps(n)[::-1]  # ascending, which makes the constructions below easier to read
        if self.skip_prk_steps:
            # The opening Heun step evaluates the model twice: at t_last and again at the next timestep.
            prk = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            # Each RK4 step over the last 4 intervals evaluates at t, t - h/2 (twice) and t - h, h = T // n.
            half = self.num_train_timesteps // n // 2
            points = base[-_PNDM_ORDER:].repeat(2) + np.tile(np.array([0, half]), _PNDM_ORDER)
            prk = points[:-1].repeat(2)[1:-1][::-1]
            plms = base[:-3][::-1]
        self._prk_count = len(prk)
        self.timesteps = np.concatenate([prk, plms]).astype(np.int64)
        self._prk_timesteps = prk
        self.num_inference_steps = n
        self._reset_state()

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Advance one entry of ``timesteps``; ``noise`` is ignored (PNDM is deterministic)."""
        model_output, sample = self._check(model_output, sample)
        if self._counter < self._prk_count:
            prev = self._step_prk(model_output, int(timestep), sample)
        else:
            prev = self._step_plms(model_output, int(timestep), sample)
        self._counter += 1
        return prev

    def _step_prk(self, eps: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        # RK4 (PRK, eq. 13): every 4 calls make one step of size h = T // n from the same start point;
        # calls 0..2 move to the intermediate points with the latest slope, call 3 combines the slopes
        # with weights 1/6, 1/3, 1/3, 1/6.
        phase = self._counter % 4
        prev_t = t - (0 if self._counter % 2 else self.num_train_timesteps // self.num_inference_steps // 2)
        start_t = int(self._prk_timesteps[self._counter // 4 * 4])
        if phase == 0:
            self._rk_sum = self._rk_sum + (1 / 6) * eps
            self._ets.append(eps)
            self._cur_sample = sample
        elif phase in (1, 2):
            self._rk_sum = self._rk_sum + (1 / 3) * eps
        else:
            eps = self._rk_sum + (1 / 6) * eps
            self._rk_sum = 0.0
        start = self._cur_sample if self._cur_sample is not None else sample
        return self._transfer(start, start_t, prev_t, eps)

    def _step_plms(self, eps: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        ratio = self.num_train_timesteps // self.num_inference_steps
        prev_t = t - ratio
        if self._counter == 1:
            # Second half of the opening Heun step (skip_prk_steps only): redo the first step from its start
            # point with the mean of the slope there and the slope at the Euler-predicted end point.
            prev_t, t = t, t + ratio
            eps = (eps + self._ets[-1]) / 2
            sample = self._cur_sample
            self._cur_sample = None
            return self._transfer(sample, t, prev_t, eps)
        self._ets = self._ets[-3:] + [eps]
        e = self._ets
        if len(e) == 1:
            # First step: plain Euler; remember its start point for the Heun correction.
            self._cur_sample = sample
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            # Adams-Bashforth 4 (PNDM eq. 12).
            eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        return self._transfer(sample, t, prev_t, eps)

    def _transfer(self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        # The transfer part phi of PNDM eq. (9): x_{t-δ} from x_t and an estimate of eps.
        a_t, a_prev = float(self.alphas_cumprod[t]), self.alpha_bar(prev_t)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.prediction_type == "v_prediction":
            # v = sqrt(a) eps - sqrt(1 - a) x0  =>  eps = sqrt(a) v + sqrt(1 - a) x_t
            model_output = a_t**0.5 * model_output + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        prev = sample_coeff * sample - ((a_prev - a_t) / denom) * model_output
        return prev.astype(np.float32)
