"""Noise schedules shared by the samplers: betas, alphas_cumprod, sigmas and timestep spacing.

A discrete-time diffusion model is trained on ``num_train_timesteps`` noise levels. Training defines
``betas``; ``alphas_cumprod[t]`` (alpha-bar in Ho et al. 2020) is how much signal survives at step ``t``;
``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` is the same noise level in the variance-exploding
parametrisation of Karras et al. 2022 (``x = x0 + sigma * eps``). Samplers pick a few of those levels
(timestep spacing, Lin et al. 2023 "Common Diffusion Noise Schedules and Sample Steps are Flawed",
Table 2) or resample sigmas directly (Karras et al. 2022, eq. 5).

The tables are float32, as the reference implementation (diffusers) keeps them, so that a model
sees the same timesteps and noise levels it would see there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

SPACINGS = ("leading", "trailing", "linspace")

# diffusers' defaults for the training noise schedule (DDPM's linear betas, Ho et al. 2020), which most of its
# scheduler classes share; each sampler's DEFAULTS starts from these.
TRAINING_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


def check_steps(num_inference_steps: int) -> None:
    """Raise ValueError unless ``num_inference_steps`` is a positive integer."""
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_inference_steps!r}")


def check_option(who: str, key: str, value: Any, supported: Sequence[str], error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming sampler ``who`` unless its config option ``key`` is one of ``supported``."""
    if value not in supported:
        raise error(f"{who}: {key} {value!r} is not supported; expected one of {', '.join(supported)}")


def check_noise(who: str, noise: np.ndarray | None, model_output: np.ndarray) -> np.ndarray:
    """Return ``noise`` as float32; ValueError when a stochastic sampler ``who`` got none or the wrong shape."""
    if noise is None:
        raise ValueError(f"{who} is stochastic: step() needs noise, a standard normal array of model_output's shape")
    noise = np.asarray(noise, dtype=np.float32)
    if noise.shape != model_output.shape:
        raise ValueError(f"{who}: noise has shape {noise.shape}, expected {model_output.shape}")
    return noise


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos²((t/T + s) / (1 + s) · π/2) with s = 0.008;
    # beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), capped so the last steps do not reach beta = 1.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def float32_linspace(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=torch.float32)`` bit for bit.

    torch computes in float32: step = (end - start) / (num - 1), the first half as start + step * i and the
    second half as end - step * (num - 1 - i), each with one rounding (a fused multiply-add). numpy's
    float64 linspace rounded to float32 differs by 1 ulp in places, which third-order multistep samplers
    amplify past 1e-5. The float64 product of two float32 values is exact, so rounding the float64 sum once
    to float32 reproduces the fused result."""
    start32, end32 = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((end32 - start32) / np.float32(num - 1))
    index = np.arange(num, dtype=np.float64)
    rising = (np.float64(start32) + step * index).astype(np.float32)
    falling = (np.float64(end32) - step * (num - 1 - index)).astype(np.float32)
    return np.where(index < num // 2, rising, falling).astype(np.float32)


def betas_from_config(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Return the float32 training betas described by a diffusers scheduler config.

    ``trained_betas`` wins when given. ``"scaled_linear"`` is linear in sqrt(beta), the schedule Stable
    Diffusion was trained with; ``"squaredcos_cap_v2"`` is the cosine schedule of Nichol & Dhariwal 2021.
    """
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return float32_linspace(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        # Square after the float32 cast, as the reference does, so rounding matches.
        root = float32_linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise NotImplementedError(
        f"beta_schedule {beta_schedule!r} is not supported; expected linear, scaled_linear or squaredcos_cap_v2"
    )


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """Return alpha-bar, the cumulative product of ``1 - betas``, as float32.

    The product is accumulated in float64 and rounded once per entry; torch does the same on CPU, so the
    table is bit-identical to the reference's.
    """
    alphas = (1.0 - np.asarray(betas, dtype=np.float32)).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = np.sqrt(alphas_cumprod(betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    # Shift so the last step is pure noise, then scale so the first step is unchanged.
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab * sqrt_ab
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Return sigma = sqrt((1 - alpha_bar) / alpha_bar) for every training timestep, ascending, float32."""
    ab = np.asarray(alphas_cumprod, dtype=np.float32)
    return np.sqrt((1 - ab) / ab)


def spaced_timesteps(
    num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """Return ``num_inference_steps`` training timesteps, descending, as float64 (not yet rounded).

    ``"leading"`` takes every k-th step from 0 and adds ``steps_offset`` (Stable Diffusion 1.x);
    ``"trailing"`` counts back from the last training step, so the first step is pure noise;
    ``"linspace"`` spreads the steps evenly over [0, T - 1]. Samplers round (or not) as their reference does.
    """
    check_steps(num_inference_steps)
    n, total = int(num_inference_steps), int(num_train_timesteps)
    if spacing == "linspace":
        return np.linspace(0, total - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = total // n
        return (np.arange(n) * ratio + steps_offset)[::-1].astype(np.float64)
    if spacing == "trailing":
        ratio = total / n
        return np.round(np.arange(total, 0, -ratio)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; expected one of {', '.join(SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Return ``num_steps`` sigmas from ``sigma_max`` down to ``sigma_min`` (Karras et al. 2022, eq. 5).

    The steps are uniform in sigma^(1/rho); rho = 7 (the paper's value) spends more steps at low noise.
    """
    ramp = np.linspace(0, 1, num_steps)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Map sigmas to fractional training timesteps by linear interpolation in log(sigma).

    ``train_sigmas`` is the ascending per-timestep table from :func:`train_sigmas`; results are clamped to
    [0, T - 1].
    """
    log_table = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10)).reshape(-1)
    # low = last table entry not above log_sigma (0 when none is), so [low, low + 1] brackets it.
    below = log_table[None, :] <= log_sigma[:, None]
    last_below = len(log_table) - 1 - np.argmax(below[:, ::-1], axis=1)
    low_idx = np.where(below.any(axis=1), last_below, 0).clip(max=len(log_table) - 2)
    low, high = log_table[low_idx], log_table[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(np.shape(sigmas))


def index_for_timestep(timesteps: np.ndarray, timestep: float) -> int | None:
    """Return the position of ``timestep`` in ``timesteps``, or None when it is absent.

    When it appears more than once the second match is returned: a loop that starts mid-schedule
    (img2img) then does not skip a noise level. This is the reference's rule.
    """
    matches = np.flatnonzero(timesteps == timestep)
    if len(matches) == 0:
        return None
    return int(matches[1] if len(matches) > 1 else matches[0])


def broadcast_per_sample(values: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a per-sample vector to (batch, 1, 1, ...) so it broadcasts against an ndim-dimensional batch."""
    values = np.asarray(values).reshape(-1)
    return values.reshape(values.shape + (1,) * (ndim - 1))


def add_noise_vp(
    alphas_cumprod: np.ndarray, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
) -> np.ndarray:
    """Forward diffusion q(x_t | x_0) = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps (Ho et al. 2020, eq. 4)."""
    ab = np.asarray(alphas_cumprod, dtype=np.float32)[np.asarray(timesteps, dtype=np.int64).reshape(-1)]
    ndim = np.ndim(original_samples)
    signal = broadcast_per_sample(np.sqrt(ab), ndim)
    noise_scale = broadcast_per_sample(np.sqrt(1 - ab), ndim)
    return (signal * original_samples + noise_scale * noise).astype(np.float32)


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Return ``num_steps`` sigmas from ``sigma_max`` to ``sigma_min``, uniform in log(sigma).

    The "Exponential" schedule of k-diffusion (``get_sigmas_exponential``): equal steps in log-SNR time.
    """
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def _betainc(a: float, b: float, x: float) -> float:
    # Regularized incomplete beta function I_x(a, b) by its continued fraction (evaluated with the modified
    # Lentz method), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly.
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * frac / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile function (inverse CDF) of the Beta(a, b) distribution, to about 1e-15 (bisection)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    # The CDF is monotone, so bisection always converges; 60 halvings reach float64 resolution.
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """Return ``num_steps`` sigmas from ``sigma_max`` to ``sigma_min`` placed at quantiles of Beta(alpha, beta).

    Lee et al. 2024, "Beta Sampling is All You Need": with alpha = beta = 0.6 the steps cluster at both
    ends of the noise range.
    """
    quantiles = [beta_ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, num_steps)]
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in quantiles])


# Sigma schedules that replace the model's own (timestep-spaced) noise levels, by diffusers config flag.
SIGMA_SCHEDULES = {
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}


def resample_sigmas(
    kind: str, sigmas: np.ndarray, num_steps: int, sigma_min: float | None = None, sigma_max: float | None = None
) -> np.ndarray:
    """Replace descending ``sigmas`` by ``num_steps`` sigmas of schedule ``kind`` over the same range.

    ``kind`` is "karras" (eq. 5 of Karras et al. 2022), "exponential" or "beta". The range is
    [sigmas[-1], sigmas[0]] unless ``sigma_min`` / ``sigma_max`` override an end.
    """
    lo = float(sigmas[-1]) if sigma_min is None else float(sigma_min)
    hi = float(sigmas[0]) if sigma_max is None else float(sigma_max)
    if kind == "karras":
        return karras_sigmas(lo, hi, num_steps)
    if kind == "exponential":
        return exponential_sigmas(lo, hi, num_steps)
    if kind == "beta":
        return beta_sigmas(lo, hi, num_steps)
    raise ValueError(f"unknown sigma schedule {kind!r}; expected one of {', '.join(SIGMA_SCHEDULES)}")


def sigma_schedule_from_config(cfg: dict, who: str) -> str | None:
    """Return which of :data:`SIGMA_SCHEDULES` a config turns on (None for none); ValueError for several."""
    on = [kind for kind, key in SIGMA_SCHEDULES.items() if cfg.get(key)]
    if len(on) > 1:
        raise ValueError(f"{who}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set")
    return on[0] if on else None


def multistep_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    spacing: str,
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """Integer timesteps of the multistep solvers (DPM-Solver, UniPC, DEIS), descending, int64.

    Unlike :func:`spaced_timesteps`, "linspace" and "leading" place ``num_inference_steps + 1`` points and
    drop the last (t = 0), so no step evaluates the model at the clean end. ``last_timestep`` (default T)
    caps the first step for solvers that clip low log-SNR values.
    """
    check_steps(num_inference_steps)
    n, total = int(num_inference_steps), int(num_train_timesteps)
    last = total if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = total / n
        return np.arange(last, 0, -ratio).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; expected one of {', '.join(SPACINGS)}")


def alphas_cumprod_from_config(cfg: dict) -> np.ndarray:
    """alpha-bar for a diffusers config (betas, optional zero-terminal-SNR rescale), float32.

    With ``rescale_betas_zero_snr`` the last entry would be 0 (infinite sigma); it is kept finite at 2^-24,
    as the reference does.
    """
    betas = betas_from_config(
        int(cfg["num_train_timesteps"]), cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"], cfg["trained_betas"]
    )
    rescale = bool(cfg.get("rescale_betas_zero_snr", False))
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    ab = alphas_cumprod(betas)
    if rescale:
        ab[-1] = 2.0**-24
    return ab


def vp_alpha_sigma(sigma: float) -> tuple[float, float]:
    """VE sigma -> VP (alpha_t, sigma_t), alpha_t² + sigma_t² = 1 (x_vp = x_ve / sqrt(sigma² + 1))."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def log_snr(sigma: float) -> float:
    """log-SNR lambda = log(alpha_t) - log(sigma_t) of a VE sigma (= -log(sigma)), the time of DPM-Solver/UniPC."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    return math.log(alpha_t) - math.log(sigma_t)
