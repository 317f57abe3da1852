"""Shared machinery of the samplers that work on noise levels sigma (k-diffusion style).

These samplers (Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ SDE, DPM++ 2S a) work in the variance-exploding
parametrisation of Karras et al. 2022, ``x = x0 + sigma * eps``: the sample starts at standard deviation
``sigma_max``, the model (trained on variance-preserving inputs) is fed ``x / sqrt(sigma² + 1)``, and a step
moves ``x`` from ``sigma_i`` to ``sigma_{i+1}`` using the model's estimate of the clean sample ("denoised").

The schedule is built as diffusers' ``*DiscreteScheduler`` classes build it: timesteps spaced over the
training steps (:func:`~.sigmas.spaced_timesteps`), their sigmas interpolated from the training table,
optionally replaced by a Karras / exponential / beta schedule over the same range
(:func:`~.sigmas.resample_sigmas`) with timesteps mapped back (:func:`~.sigmas.sigma_to_t`), then a final 0.

Two-stage samplers (Heun, DPM2, ...) evaluate the model twice per step; as in diffusers, their
``timesteps`` hold ``2n - 1`` entries (the last step is a single Euler step to sigma = 0) and ``step`` is
called once per entry: entry ``j`` is stage ``j % 2`` of step ``j // 2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .sigmas import (
    SPACINGS,
    TRAINING_DEFAULTS,
    alphas_cumprod_from_config,
    broadcast_per_sample,
    check_noise,
    check_option,
    check_steps,
    resample_sigmas,
    sigma_schedule_from_config,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)
from .walk import ScheduleWalk


def denoised_from_output(prediction_type: str, model_output: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
    """The model's clean-sample estimate D(x; sigma) from its raw output, for a VE sample ``x`` at ``sigma``.

    epsilon: x - sigma * eps (Karras et al. 2022, Table 1); v_prediction (Salimans & Ho 2022) on the VP
    input x / sqrt(sigma² + 1); sample: the output itself.
    """
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return model_output


def ancestral_split(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """Split a step ``sigma_from -> sigma_to`` into (sigma_down, sigma_up) for an ancestral step (eta = 1).

    sigma_up is the fresh noise the step adds, sigma_down where the deterministic part must land, so that
    sigma_down² + sigma_up² = sigma_to² (k-diffusion's ``get_ancestral_step``).
    """
    sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class VESampler(ScheduleWalk):
    """Base class: config, schedule, input scaling and noise levels of a sigma-space sampler.

    Subclasses set ``name`` and ``DEFAULTS`` (the diffusers class's defaults for the keys it reads) and
    implement ``_step``; two-stage samplers also override ``_expand`` and ``_model_sigma``.

    State: the step index (``sdlite.schedulers.walk``), advancing by one entry per ``step``.
    """

    stochastic = False
    DEFAULTS: dict[str, Any] = {}
    PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    # Sigma schedules the reference class can use (its use_*_sigmas flags).
    SIGMA_SCHEDULES: tuple[str, ...] = ("karras", "exponential", "beta")
    # KDPM2 rounds the timesteps of Karras sigmas to integers; the others keep them fractional.
    ROUND_KARRAS_TIMESTEPS = False
    # Precision of the spaced timesteps before their sigmas are interpolated (float64 in DPMSolverSDE).
    TIMESTEP_DTYPE: type = np.float32

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        cfg = {**self.DEFAULTS, **(config or {})}
        who = self.name
        check_option(who, "prediction_type", cfg["prediction_type"], self.PREDICTION_TYPES)
        check_option(who, "timestep_spacing", cfg["timestep_spacing"], SPACINGS)
        # Keys the reference class does not have are not read (from_config ignores them too).
        flags = {
            key: cfg[key]
            for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
            if key in self.DEFAULTS
        }
        self.sigma_schedule = sigma_schedule_from_config(flags, who)
        if self.sigma_schedule is not None and self.sigma_schedule not in self.SIGMA_SCHEDULES:
            raise ValueError(f"{who} cannot use {self.sigma_schedule} sigmas")
        # Only classes with a final_sigmas_type key (Euler) may end on sigma_min instead of 0.
        final = cfg["final_sigmas_type"] if "final_sigmas_type" in self.DEFAULTS else "zero"
        if final not in ("zero", "sigma_min"):
            raise ValueError(
                f"{who}: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported; expected zero or sigma_min"
            )
        self.config = cfg
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        self.prediction_type: str = cfg["prediction_type"]
        self.timestep_spacing: str = cfg["timestep_spacing"]
        self.steps_offset = int(cfg["steps_offset"])
        self.final_sigmas_type: str = final
        # Only classes with sigma_min/sigma_max config keys honour them.
        self._sigma_min = cfg.get("sigma_min") if "sigma_min" in self.DEFAULTS else None
        self._sigma_max = cfg.get("sigma_max") if "sigma_max" in self.DEFAULTS else None
        # Zero-terminal-SNR rescaling only where the reference class has that option.
        rescale = "rescale_betas_zero_snr" in self.DEFAULTS and bool(cfg["rescale_betas_zero_snr"])
        self.alphas_cumprod = alphas_cumprod_from_config({**cfg, "rescale_betas_zero_snr": rescale})
        self._train_sigmas = train_sigmas(self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.float32)
        # Until set_timesteps, the noise levels of all training steps (for init_noise_sigma).
        self.sigmas = np.concatenate([self._train_sigmas[::-1], [0.0]]).astype(np.float32)
        self._base_sigmas = self.sigmas

    # --- schedule ----------------------------------------------------------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latent noise for the current schedule."""
        sigma_max = float(self.sigmas.max())
        if self.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        # sqrt(sigma_max² + 1) for "leading" spacing, as the reference does.
        return float(np.float32((sigma_max**2 + 1) ** 0.5))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps and sigmas for ``num_inference_steps`` steps and reset the sampler's state."""
        check_steps(num_inference_steps)
        n = int(num_inference_steps)
        timesteps = spaced_timesteps(n, self.num_train_timesteps, self.timestep_spacing, self.steps_offset)
        timesteps = timesteps.astype(self.TIMESTEP_DTYPE)
        # Noise level at (possibly fractional) timesteps: linear interpolation of the training table.
        sigmas = np.interp(timesteps, np.arange(self.num_train_timesteps), self._train_sigmas)
        if self.sigma_schedule is not None:
            sigmas = resample_sigmas(self.sigma_schedule, sigmas, n, self._sigma_min, self._sigma_max)
            timesteps = sigma_to_t(sigmas, self._train_sigmas)
            if self.sigma_schedule == "karras" and self.ROUND_KARRAS_TIMESTEPS:
                timesteps = np.round(timesteps)
        self._sigmas64 = np.asarray(sigmas, dtype=np.float64)
        # The last step lands on sigma 0 (a clean sample) or, if asked, on the smallest training sigma.
        last = float(self._train_sigmas[0]) if self.final_sigmas_type == "sigma_min" else 0.0
        self._base_sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self._base_timesteps = np.asarray(timesteps, dtype=np.float64)
        self.num_inference_steps = n
        self.timesteps, self.sigmas = self._expand(self._base_timesteps, self._base_sigmas)
        self._restart()
        self._reset_state()

    def _expand(self, timesteps: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # One model evaluation per step: the schedule as is. Returns (timesteps, per-entry sigmas).
        return timesteps.astype(np.float32), sigmas

    def _reset_state(self) -> None:
        """Forget what earlier steps left behind (multistep history, a half-done two-stage step)."""

    # --- stepping ------------------------------------------------------------------------------------------

    def _model_sigma(self, j: int) -> float:
        # The noise level the model sees at entry j of `timesteps`.
        return float(self.sigmas[j])

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """Scale x (variance sigma² + 1) to the unit-variance input the model was trained on."""
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps() before scale_model_input()")
        sigma = self._model_sigma(self._index(timestep))
        return (np.asarray(sample, dtype=np.float32) / (sigma**2 + 1) ** 0.5).astype(np.float32)

    def denoised(self, model_output: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
        """The clean-sample estimate for this sampler's prediction type (see :func:`denoised_from_output`)."""
        return denoised_from_output(self.prediction_type, model_output, x, sigma)

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Advance one entry of ``timesteps``; ``noise`` (standard normal, model_output's shape) is required
        when ``stochastic`` is True and ignored otherwise."""
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps() before step()")
        model_output = np.asarray(model_output, dtype=np.float32)
        x = np.asarray(sample, dtype=np.float32)
        if self.stochastic:
            noise = check_noise(self.name, noise, model_output)
        j = self._index(timestep)
        if j >= len(self.timesteps):
            raise RuntimeError(f"{self.name}: step() called more often than there are timesteps")
        prev = self._step(j, model_output, x, noise)
        self._step_index = j + 1
        return np.asarray(prev, dtype=np.float32)

    def _step(self, j: int, model_output: np.ndarray, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def noise_to(self, original_samples: np.ndarray, noise: np.ndarray, entry: int | list[int]) -> np.ndarray:
        """Noise clean samples to schedule entry ``entry``: x = x0 + sigma * noise."""
        sigma = broadcast_per_sample(self.sigmas[np.atleast_1d(entry)], np.ndim(original_samples))
        return (original_samples + noise * sigma).astype(np.float32)


# diffusers' defaults shared by its k-diffusion ports (Heun, LMS, KDPM2, DPM-Solver SDE ...); each sampler
# starts from these and changes what its class changes.
KDIFFUSION_DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


class TwoStageSampler(VESampler):
    """Base class of samplers that evaluate the model twice per step (at sigma_i, then at a second point).

    ``timesteps`` interleaves each step's two evaluation points; the last step, which lands on sigma = 0,
    is a single Euler step (as in k-diffusion and diffusers). Subclasses give the second point's sigma and
    the two stages' updates.
    """

    order = 2  # step k begins at entry 2k (a strength cut lands there, never on a second stage)

    def _reset_state(self) -> None:
        self._start: np.ndarray | None = None  # x at the start of the step in progress

    def _expand(self, timesteps: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(timesteps)
        second = [self._stage_two_timestep(i) for i in range(n - 1)]
        expanded = np.empty(2 * n - 1, dtype=np.float64)
        expanded[0::2] = timesteps
        expanded[1::2] = second
        # Per-entry sigmas as the reference lists them (the step's end sigma for a second stage).
        per_entry = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        return expanded.astype(np.float32), per_entry

    def _stage_two_sigma(self, i: int) -> float:
        """Noise level of step ``i``'s second model evaluation."""
        raise NotImplementedError

    def _stage_two_timestep(self, i: int) -> float:
        # The (fractional) training timestep of that noise level.
        return float(sigma_to_t(np.array([self._stage_two_sigma(i)]), self._train_sigmas)[0])

    def _model_sigma(self, j: int) -> float:
        i, stage = divmod(j, 2)
        return float(self._base_sigmas[i]) if stage == 0 else self._stage_two_sigma(i)

    def _step(self, j: int, model_output: np.ndarray, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        i, stage = divmod(j, 2)
        sigma, sigma_next = float(self._base_sigmas[i]), float(self._base_sigmas[i + 1])
        if stage == 0:
            self._start = x
            return self._first_stage(i, self.denoised(model_output, x, sigma), x, sigma, sigma_next, noise)
        if self._start is None:
            raise RuntimeError(f"{self.name}: a run must start at the first evaluation of a step")
        start, self._start = self._start, None
        denoised = self.denoised(model_output, x, self._stage_two_sigma(i))
        return self._second_stage(i, denoised, x, start, sigma, sigma_next, noise)

    def _first_stage(
        self, i: int, denoised: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float, noise: np.ndarray | None
    ) -> np.ndarray:
        raise NotImplementedError

    def _second_stage(
        self,
        i: int,
        denoised: np.ndarray,
        x: np.ndarray,
        start: np.ndarray,
        sigma: float,
        sigma_next: float,
        noise: np.ndarray | None,
    ) -> np.ndarray:
        raise NotImplementedError
