"""Differentiable SSIM for the Gaussian render loss (Wang et al. 2004: 11x11 Gaussian window, σ 1.5).

Written out because the metric (scikit-image) is NumPy and has no gradient; the test checks this against
`skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K1, K2 = 0.01, 0.03


def _window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    line = line / line.sum()
    return (line[:, None] * line[None, :]).expand(channels, 1, size, size)  # (C, 1, k, k)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """x, y (B, C, H, W) → (B,) mean SSIM over the valid (unpadded) windows and channels."""
    channels = x.shape[1]
    size = int(2 * round(3.5 * sigma) + 1)  # 11 for σ 1.5, as scikit-image's truncate=3.5
    window = _window(size, sigma, channels, x)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window, groups=channels)  # (B, C, H - k + 1, W - k + 1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2, 3))
