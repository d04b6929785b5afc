"""4-D rotary position embedding: the head dimension split evenly over the t, x, y and z axes.

With head_dim 72 (so400m) each axis gets 18 dimensions, i.e. 9 frequency pairs, base 10000 (spec).
Rotation uses the "rotate half" layout within each axis' slice.
"""

from __future__ import annotations

import torch

AXES = 4  # t, x, y, z


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(head_dim / 8,) inverse frequencies shared by every axis."""
    if head_dim % (2 * AXES) != 0:
        raise ValueError(f"head_dim {head_dim} must split into {AXES} axes of frequency pairs (a multiple of 8)")
    pairs = head_dim // (2 * AXES)
    return base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)


def rope_angles(coords: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """coords (N, 4) int → cos, sin of shape (N, head_dim / 2), axis-major (t pairs, then x, y, z)."""
    inv_freq = rope_frequencies(head_dim, base).to(coords.device)  # (P,)
    angles = coords.double()[:, :, None] * inv_freq  # (N, 4, P)
    angles = angles.reshape(coords.shape[0], -1)  # (N, 4P) = (N, head_dim / 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, head_dim) rotated by (N, head_dim / 2) angles."""
    first, second = x.float().chunk(2, dim=-1)  # (N, H, D/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (N, 1, D/2)
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)  # (N, H, D)
    return rotated.to(x.dtype)
