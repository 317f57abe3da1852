"""How close an image is to a reference: PSNR and SSIM, in numpy.

Images are float arrays in 0..1, (H, W) or (H, W, C); SSIM is computed per channel and averaged, as
scikit-image does with ``channel_axis``.
"""

from __future__ import annotations

import numpy as np

# Wang et al. (2004), sec. III-C: an 11x11 circular-symmetric Gaussian window with sigma 1.5, K1 = 0.01,
# K2 = 0.03, dynamic range L = 1 for images in 0..1.
WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    _check(image, reference)
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _gaussian_kernel(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _filter_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D filtering of (H, W) over the 'valid' region (no padding), as Wang et al. do."""
    size = len(kernel)
    rows = np.lib.stride_tricks.sliding_window_view(x, size, axis=0) @ kernel  # (H-size+1, W)
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=1) @ kernel  # (H-size+1, W-size+1)


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Mean SSIM of one channel (Wang et al. 2004, eq. 13, averaged over windows as in eq. 17)."""
    kernel = _gaussian_kernel()
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, kernel), _filter_valid(y, kernel)
    # Local (co)variances from E[xy] - E[x]E[y] under the Gaussian weights.
    var_x = _filter_valid(x * x, kernel) - mu_x**2
    var_y = _filter_valid(y * y, kernel) - mu_y**2
    cov = _filter_valid(x * y, kernel) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004): 1 for identical images, lower as structure differs.

    Needs images of at least 11x11 pixels (one Gaussian window)."""
    _check(image, reference)
    x, y = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    if min(x.shape[:2]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels; got {x.shape[1]}x{x.shape[0]}")
    if x.ndim == 2:
        return _ssim_channel(x, y, data_range)
    return float(np.mean([_ssim_channel(x[..., c], y[..., c], data_range) for c in range(x.shape[-1])]))


def _check(image: np.ndarray, reference: np.ndarray) -> None:
    if np.shape(image) != np.shape(reference):
        raise ValueError(f"images differ in shape: {np.shape(image)} vs {np.shape(reference)}")
