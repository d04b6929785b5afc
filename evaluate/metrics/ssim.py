"""SSIM in scikit-image's convention (the one the spec pins): 7x7 uniform window, data range 255."""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

PROTOCOL = "SSIM: skimage.metrics.structural_similarity on uint8 RGB, channel_axis=-1, data_range=255, win_size=7"


def ssim_uint8(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """reference, reconstruction: (H, W, 3) uint8."""
    if reference.shape != reconstruction.shape:
        raise ValueError("ssim_uint8 takes two arrays of the same shape")
    return float(structural_similarity(reference, reconstruction, channel_axis=-1, data_range=255, win_size=7))
