"""PSNR on uint8 frames in TokenBench's convention, which is also what keeps a perfect image finite.

NVlabs/TokenBench @dcbb7d5 token_bench/metrics_cli.py `PSNR` (one function for images and videos):
    psnr = 20 * np.log10(_UINT8_MAX_F / (np.sqrt(mse) + _FLOAT32_EPS)),  _FLOAT32_EPS = np.finfo(np.float32).eps
so identical inputs give 20·log10(255 / ε) ≈ 186.6 dB (PSNR_CAP) instead of +inf, and a mean over images
stays finite. Otherwise it is within 1.04e-6 / √MSE dB of 10·log10(255² / MSE). The MSE here is exact (an
integer sum of squared uint8 differences, then one float64 division); TokenBench's float32 arithmetic differs
from it by < 1e-4 dB (tests/evaluate/test_video_protocols.py).
"""

from __future__ import annotations

import math

import numpy as np

EPS = float(np.finfo(np.float32).eps)  # TokenBench's _FLOAT32_EPS
PEAK = 255.0
PSNR_CAP = 20.0 * math.log10(PEAK / EPS)  # ≈ 186.6 dB: the PSNR of identical images

PROTOCOL = ("PSNR on uint8 RGB, 20·log10(255 / (√MSE + ε)) per image, ε = float32 eps 1.1920929e-07 (TokenBench "
            "metrics_cli.PSNR): identical images give 186.6 dB, not +inf; MSE over all pixels and channels; mean "
            "over images")


def squared_error_sum(reference: np.ndarray, reconstruction: np.ndarray) -> int:
    """Σ (a − b)² over uint8 arrays of one shape, exactly (int64), without wrapping around uint8."""
    if reference.shape != reconstruction.shape or reference.dtype != np.uint8 or reconstruction.dtype != np.uint8:
        raise ValueError("PSNR takes two uint8 arrays of the same shape")
    difference = reference.astype(np.int32) - reconstruction.astype(np.int32)  # in [-255, 255]
    return int(np.square(difference).sum(dtype=np.int64))  # each square ≤ 65025 fits int32; the sum may not


def psnr_from_mse(mse: float) -> float:
    return float(20.0 * math.log10(PEAK / (math.sqrt(mse) + EPS)))


def psnr_uint8(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """reference, reconstruction: (H, W, 3) uint8. Identical images give PSNR_CAP (≈ 186.6 dB)."""
    return psnr_from_mse(squared_error_sum(reference, reconstruction) / reference.size)
