"""UniPC sampler ("UniPC"): Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models".

Each step first corrects the sample the previous step predicted, using the model output just computed at it
(UniC, Algorithm 2 / eq. 8 with the B(h) variants of sec. 3.3: bh1 B(h) = h, bh2 B(h) = e^h - 1), then
predicts the next sample from the last ``solver_order`` outputs (UniP, Algorithm 1), all in log-SNR time
lambda with data prediction x0 (the default, ``predict_x0``) or noise prediction. The corrector reuses the
model evaluation of the next step, so it costs no extra evaluation.

Behaves like diffusers' ``UniPCMultistepScheduler``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .multistep import MultistepSampler
from .sigmas import TRAINING_DEFAULTS, log_snr, vp_alpha_sigma

# diffusers' UniPCMultistepScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "sigma_min": None,
    "sigma_max": None,
}

SOLVER_TYPES = ("bh1", "bh2")


def unipc_weights(rks: list[float], hh: float, solver_type: str, order: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The linear system R rho = b of UniPC (Zhao et al. 2023, eq. 8 / Algorithm 1-2) and B(h).

    ``rks`` are the step ratios r_k of the past outputs (ending with r = 1); ``hh`` is -h for data
    prediction (h for noise prediction). b_k = phi_{k+1}(hh) k! / B(h), with phi the exponential-integrator
    functions: phi_1(hh) = (e^hh - 1) / hh, phi_{k+1} = (phi_k - 1/k!) / hh.
    """
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        rhs.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1 / factorial
    return np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64), b_h


class UniPCScheduler(MultistepSampler):
    """Deterministic UniPC sampler (predictor-corrector, one model evaluation per step)."""

    name = "UniPC"
    DEFAULTS = DEFAULTS

    def __init__(self, config=None) -> None:
        super().__init__(config)
        cfg = self.config
        # The reference maps DPM-Solver's and DEIS's solver names onto bh2.
        if cfg["solver_type"] not in (*SOLVER_TYPES, "midpoint", "heun", "logrho"):
            raise ValueError(f"UniPC: solver_type {cfg['solver_type']!r} is not supported; expected one of bh1, bh2")
        self.solver_type = cfg["solver_type"] if cfg["solver_type"] in SOLVER_TYPES else "bh2"
        self.predict_x0 = bool(cfg["predict_x0"])
        self.disable_corrector = {int(i) for i in (cfg["disable_corrector"] or [])}
        if cfg["solver_p"] is not None:
            raise NotImplementedError("UniPC: solver_p (an external predictor) is not supported")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(
                f"UniPC: final_sigmas_type {cfg['final_sigmas_type']!r} is not supported; expected zero or sigma_min"
            )
        if not self.lower_order_final and cfg["final_sigmas_type"] == "zero" and self.solver_order > 1:
            # The higher-order last step to sigma = 0 divides by zero (the reference returns NaN).
            raise ValueError("UniPC: lower_order_final=False needs final_sigmas_type='sigma_min'")

    def _final_sigma(self, sigmas: np.ndarray) -> float:
        if self.config["final_sigmas_type"] == "zero":
            return 0.0
        # sigma_min: the schedule's own last sigma, or the smallest training sigma for timestep spacing.
        return float(sigmas[-1]) if self.sigma_schedule is not None else float(self._train_sigmas[0])

    def _reset_state(self) -> None:
        self._outputs: list[np.ndarray] = []  # converted model outputs of past steps, newest last
        self._last_sample: np.ndarray | None = None  # the sample the previous predictor started from
        self._this_order = 1
        self._lower_order_nums = 0

    def _convert(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        # The solver works on x0 (predict_x0) or on eps.
        x0 = self.data_prediction(model_output, sample, sigma)
        if self.predict_x0:
            return x0
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        return model_output if self.prediction_type == "epsilon" else (sample - alpha_t * x0) / sigma_t

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Correct the previous prediction with this output, then predict the next sample; ``noise`` is ignored."""
        model_output, x = self._check(model_output, sample)
        i = self._index(timestep)
        n = len(self.timesteps)
        converted = self._convert(model_output, x, float(self.sigmas[i])).astype(np.float32)
        if i > 0 and (i - 1) not in self.disable_corrector and self._last_sample is not None:
            x = self._correct(i, converted, self._last_sample, x, self._this_order).astype(np.float32)
        self._outputs = [*self._outputs, converted][-self.solver_order :]
        order = min(self.solver_order, n - i) if self.lower_order_final else self.solver_order
        self._this_order = min(order, self._lower_order_nums + 1)
        self._last_sample = x
        prev = self._predict(i, x, self._this_order)
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        self._step_index = i + 1
        return prev.astype(np.float32)

    def _coeffs(self, sigma_t: float, sigma_s0: float) -> tuple[float, float, float, float]:
        alpha_t, sig_t = vp_alpha_sigma(sigma_t)
        alpha_s0, sig_s0 = vp_alpha_sigma(sigma_s0)
        return alpha_t, sig_t, alpha_s0, sig_s0

    def _base_update(self, x: np.ndarray, m0: np.ndarray, sigma_t: float, sigma_s0: float, hh: float) -> np.ndarray:
        # The first-order (DPM-Solver++(1) / DPM-Solver-1) part of both UniP and UniC.
        alpha_t, sig_t, alpha_s0, sig_s0 = self._coeffs(sigma_t, sigma_s0)
        if self.predict_x0:
            return (sig_t / sig_s0) * x - (alpha_t * math.expm1(hh)) * m0
        return (alpha_t / alpha_s0) * x - (sig_t * math.expm1(hh)) * m0

    def _predict(self, i: int, x: np.ndarray, order: int) -> np.ndarray:
        # UniP-p (Algorithm 1): step i from sigma_i to sigma_{i+1} with the last `order` outputs.
        sigma_t, sigma_s0 = float(self.sigmas[i + 1]), float(self.sigmas[i])
        m0 = self._outputs[-1]
        if sigma_t == 0 and order == 1:
            # h -> inf: the step lands on the data prediction (the reference gets NaN where B(h) = -inf
            # meets a zero residual, with bh1 or noise prediction).
            if self.predict_x0:
                return m0
            alpha_s0, sig_s0 = vp_alpha_sigma(sigma_s0)
            return (x - sig_s0 * m0) / alpha_s0
        if sigma_t == sigma_s0:
            return x  # a zero-length last step (final_sigmas_type="sigma_min" repeating the last sigma)
        lam_s0 = log_snr(sigma_s0)
        h = log_snr(sigma_t) - lam_s0
        hh = -h if self.predict_x0 else h
        rks, d1s = [], []
        for k in range(1, order):
            rk = (log_snr(float(self.sigmas[i - k])) - lam_s0) / h
            rks.append(rk)
            d1s.append((self._outputs[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        rows, rhs, b_h = unipc_weights(rks, hh, self.solver_type, order)
        x_t = self._base_update(x, m0, sigma_t, sigma_s0, hh)
        if not d1s:
            return x_t
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(rows[:-1, :-1], rhs[:-1])
        residual = sum(float(rho) * d1 for rho, d1 in zip(rhos, d1s, strict=True))
        scale = vp_alpha_sigma(sigma_t)[0 if self.predict_x0 else 1]
        return x_t - (scale * b_h) * residual

    def _correct(self, i: int, model_t: np.ndarray, last: np.ndarray, x_t: np.ndarray, order: int) -> np.ndarray:
        # UniC (Algorithm 2): redo step i-1 (sigma_{i-1} -> sigma_i) from `last` with the new output model_t.
        sigma_t, sigma_s0 = float(self.sigmas[i]), float(self.sigmas[i - 1])
        m0 = self._outputs[-1]
        lam_s0 = log_snr(sigma_s0)
        h = log_snr(sigma_t) - lam_s0
        hh = -h if self.predict_x0 else h
        rks, d1s = [], []
        for k in range(1, order):
            rk = (log_snr(float(self.sigmas[i - (k + 1)])) - lam_s0) / h
            rks.append(rk)
            d1s.append((self._outputs[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        rows, rhs, b_h = unipc_weights(rks, hh, self.solver_type, order)
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(rows, rhs)
        residual = sum(float(rho) * d1 for rho, d1 in zip(rhos[:-1], d1s, strict=True))
        x_base = self._base_update(last, m0, sigma_t, sigma_s0, hh)
        scale = vp_alpha_sigma(sigma_t)[0 if self.predict_x0 else 1]
        return x_base - (scale * b_h) * (residual + float(rhos[-1]) * (model_t - m0))
