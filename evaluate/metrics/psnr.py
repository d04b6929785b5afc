"""PSNR on uint8 frames, as TokenBench and the image tokenizer papers report it."""

from __future__ import annotations

import numpy as np

PROTOCOL = "PSNR on uint8 RGB, 10*log10(255^2 / MSE) per image (MSE over all pixels and channels), mean over images"


def psnr_uint8(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """reference, reconstruction: (H, W, 3) uint8. Identical images give +inf."""
    if reference.shape != reconstruction.shape or reference.dtype != np.uint8 or reconstruction.dtype != np.uint8:
        raise ValueError("psnr_uint8 takes two uint8 arrays of the same shape")
    mse = np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))
