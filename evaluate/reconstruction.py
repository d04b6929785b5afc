"""Pixels as the metrics see them: the tokenizer's [-1, 1] floats quantised to uint8 as an image writer would.

The reconstruction metrics themselves run in evaluate/suite.py, through the tokenizer adapter."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8, rounding as an image writer would."""
    return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(1, 2, 0).numpy()
