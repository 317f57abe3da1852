"""DEIS sampler ("DEIS"): Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator",
the multistep exponential integrator in rho = sigma_t / alpha_t ("logrho" variant, sec. 4, eq. 15): the
noise prediction is extrapolated by a Lagrange polynomial through the last ``solver_order`` steps and
integrated exactly in log(rho).

Behaves like diffusers' ``DEISMultistepScheduler`` (its "logrho" solver, the only one it implements).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .multistep import MultistepSampler
from .sigmas import TRAINING_DEFAULTS

# diffusers' DEISMultistepScheduler defaults; a config key, when present, overrides them.
DEFAULTS: dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "algorithm_type": "deis",
    "solver_type": "logrho",
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "use_dynamic_shifting": False,
}

# Below this many steps the last steps drop to lower order (lower_order_final), as the reference does.
_LOWER_ORDER_FINAL_BELOW = 15


# DEIS's coefficients are differences of nearly equal terms that then multiply noise predictions of
# similar size with alternating signs, so rounding matters: everything here is computed in float32 as the
# reference computes it, so that both round alike (float64 would differ from it by ~1e-5 after a few
# third-order steps).


def _integral_2(t: np.float32, b: np.float32, c: np.float32) -> np.float32:
    # Antiderivative in rho of the Lagrange basis for node b (other node c), times the log-rho weight:
    # t (log t - log c - 1) / (log b - log c).
    return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))


def _integral_3(t: np.float32, b: np.float32, c: np.float32, d: np.float32) -> np.float32:
    # The same for three nodes (b the node whose basis is integrated, c and d the others).
    lt, lc, ld, lb = np.log(t), np.log(c), np.log(d), np.log(b)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return numerator / ((lb - lc) * (lb - ld))


def _alpha_sigma32(sigma: np.float32) -> tuple[np.float32, np.float32]:
    # VE sigma -> VP (alpha_t, sigma_t), in float32 like the reference.
    alpha_t = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
    return alpha_t, sigma * alpha_t


def _rho(sigma: np.float32) -> np.float32:
    # rho = sigma_t / alpha_t of a VE sigma.
    alpha_t, sigma_t = _alpha_sigma32(sigma)
    return sigma_t / alpha_t


class DEISScheduler(MultistepSampler):
    """Deterministic DEIS sampler (multistep, one model evaluation per step)."""

    name = "DEIS"
    DEFAULTS = DEFAULTS

    def __init__(self, config=None) -> None:
        super().__init__(config)
        # The reference maps other solvers' algorithm and solver names onto DEIS logrho.
        if self.config["algorithm_type"] not in ("deis", "dpmsolver", "dpmsolver++"):
            raise ValueError(f"DEIS: algorithm_type {self.config['algorithm_type']!r} is not supported; expected deis")
        if self.config["solver_type"] not in ("logrho", "midpoint", "heun", "bh1", "bh2"):
            raise ValueError(f"DEIS: solver_type {self.config['solver_type']!r} is not supported; expected logrho")
        if self.solver_order > 3:
            raise ValueError(f"DEIS: solver_order must be 1, 2 or 3, got {self.solver_order}")

    def _final_sigma(self, sigmas: np.ndarray) -> float:
        # The reference ends on the schedule's last sigma (a zero-length last step) for Karras / exponential /
        # beta sigmas, and on the smallest training sigma otherwise: never on 0.
        return float(sigmas[-1]) if self.sigma_schedule is not None else float(self._train_sigmas[0])

    def _reset_state(self) -> None:
        self._outputs: list[np.ndarray] = []  # noise predictions of past steps, newest last
        self._lower_order_nums = 0

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One DEIS step from sigma_i to sigma_{i+1}; ``noise`` is ignored."""
        model_output, x = self._check(model_output, sample)
        i = self._index(timestep)
        n = len(self.timesteps)
        # DEIS integrates the noise prediction: convert whatever the model predicts to eps (via x0).
        alpha_s, sigma_s = _alpha_sigma32(self.sigmas[i])
        if self.prediction_type == "epsilon":
            x0 = (x - sigma_s * model_output) / alpha_s
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = alpha_s * x - sigma_s * model_output
        eps = ((x - alpha_s * x0) / sigma_s).astype(np.float32)
        self._outputs = [*self._outputs, eps][-self.solver_order :]
        short = self.lower_order_final and n < _LOWER_ORDER_FINAL_BELOW
        if self.solver_order == 1 or self._lower_order_nums < 1 or (i == n - 1 and short):
            order = 1
        elif self.solver_order == 2 or self._lower_order_nums < 2 or (i == n - 2 and short):
            order = 2
        else:
            order = 3
        prev = self._update(i, x, order)
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        self._step_index = i + 1
        return prev.astype(np.float32)

    def _update(self, i: int, x: np.ndarray, order: int) -> np.ndarray:
        alpha_t, sig_t = _alpha_sigma32(self.sigmas[i + 1])
        alpha_s0, sig_s0 = _alpha_sigma32(self.sigmas[i])
        m = self._outputs
        if order == 1:
            # DDIM-like exponential-integrator step (eq. 11 with a constant eps).
            h = (np.log(alpha_t) - np.log(sig_t)) - (np.log(alpha_s0) - np.log(sig_s0))
            return (alpha_t / alpha_s0) * x - (sig_t * (np.exp(h) - np.float32(1))) * m[-1]
        rho_t, rho_s0, rho_s1 = (_rho(self.sigmas[k]) for k in (i + 1, i, i - 1))
        if order == 2:
            c1 = _integral_2(rho_t, rho_s0, rho_s1) - _integral_2(rho_s0, rho_s0, rho_s1)
            c2 = _integral_2(rho_t, rho_s1, rho_s0) - _integral_2(rho_s0, rho_s1, rho_s0)
            return alpha_t * (x / alpha_s0 + c1 * m[-1] + c2 * m[-2])
        rho_s2 = _rho(self.sigmas[i - 2])
        c1 = _integral_3(rho_t, rho_s0, rho_s1, rho_s2) - _integral_3(rho_s0, rho_s0, rho_s1, rho_s2)
        c2 = _integral_3(rho_t, rho_s1, rho_s2, rho_s0) - _integral_3(rho_s0, rho_s1, rho_s2, rho_s0)
        c3 = _integral_3(rho_t, rho_s2, rho_s0, rho_s1) - _integral_3(rho_s0, rho_s2, rho_s0, rho_s1)
        return alpha_t * (x / alpha_s0 + c1 * m[-1] + c2 * m[-2] + c3 * m[-3])
