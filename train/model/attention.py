"""Attention over packed sequences: per-sample (block-diagonal) and temporally block-causal over tiles.

A query token may attend to a key token when both belong to the same sample and the key's temporal
tile is not later than the query's (and, with a window, not more than `window` tiles earlier). For
images and 3D (one tile) that is plain per-sample attention;
for videos it is what makes tile-by-tile encoding with a KV cache give exactly the full result.

Two paths behind one function (dinov2's pattern): `flex` (FlexAttention with a block-sparse mask, the
fast path on GPU) and `masked` (a dense boolean mask with SDPA, plain PyTorch, any device). Tests
compare them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def allowed(query_samples: torch.Tensor, key_samples: torch.Tensor, query_tiles: torch.Tensor,
            key_tiles: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(Nq, Nk) bool: same sample, key tile ≤ query tile and, with a window, within `window` tiles back."""
    same = query_samples[:, None] == key_samples[None, :]
    causal = key_tiles[None, :] <= query_tiles[:, None]
    if window is not None:
        causal = causal & (key_tiles[None, :] >= query_tiles[:, None] - window)
    return same & causal


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_samples: torch.Tensor,
                     key_samples: torch.Tensor, query_tiles: torch.Tensor, key_tiles: torch.Tensor,
                     backend: str = "auto", window: int | None = None) -> torch.Tensor:
    """q (Nq, H, D), k/v (Nk, H, D) → (Nq, H, D)."""
    if backend == "auto":
        backend = "flex" if q.is_cuda else "masked"
    if backend == "masked":
        mask = allowed(query_samples, key_samples, query_tiles, key_tiles, window)  # (Nq, Nk)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask[None])  # (H, Nq, D)
        return out.transpose(0, 1)  # (Nq, H, D)
    if backend == "flex":
        return _flex_attention(q, k, v, query_samples, key_samples, query_tiles, key_tiles, window)
    raise ValueError(f"unknown attention backend {backend!r} (auto, flex, masked)")


def _flex_attention(q, k, v, query_samples, key_samples, query_tiles, key_tiles, window) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(batch, head, query_index, key_index):
        same = query_samples[query_index] == key_samples[key_index]
        causal = key_tiles[key_index] <= query_tiles[query_index]
        if window is not None:
            causal = causal & (key_tiles[key_index] >= query_tiles[query_index] - window)
        return same & causal

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=q.shape[0], KV_LEN=k.shape[0],
                                   device=q.device)
    attend = _compiled_flex() if q.is_cuda else flex_attention
    out = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=block_mask)  # (1, H, Nq, D)
    return out[0].transpose(0, 1)  # (Nq, H, D)


_COMPILED = None


def _compiled_flex():
    # FlexAttention is only fast compiled; compile once per process.
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=True)
    return _COMPILED
