"""Attention over packed sequences: per-sample (block-diagonal) and temporally block-causal over tiles.

A query token may attend to a key token when both belong to the same sample and the key's temporal
tile is not later than the query's (and, with a window, not more than `window` tiles earlier). For
images and 3D (one tile) that is plain per-sample attention;
for videos it is what makes tile-by-tile encoding with a KV cache give exactly the full result.

Two paths behind one function (dinov2's pattern): `flex` (FlexAttention with a block-sparse mask, the
fast path on GPU) and `masked` (a dense boolean mask with SDPA, plain PyTorch, any device). Tests
compare them.

The flex path's BlockMask (which 128x128 blocks of queries x keys to visit, and which of those need the mask
evaluated) is built once per packed batch by `build_block_mask` and shared by every layer (TokenInfo caches it).
A packed sequence keeps each sample's tokens together and their tiles in order (tokens.pack, grid_coords' raster
order), so the keys a query may see are one contiguous run, found by binary search, and the blocks follow from
the runs in O(N log N + blocks²) instead of create_block_mask's O(N²) evaluation of the mask: on one CPU thread,
8 ms and 3 MiB at 32k tokens against 19-35 s and 10 GiB per create_block_mask call, which so400m made in each
of its 54 layers (benchmarks/results/block-mask-cpu.json). Keys in any other order (a KV cache's are tile-major
across samples) fall back to create_block_mask; both give the same BlockMask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

BLOCK = 128  # FlexAttention's default block size, queries and keys alike


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
                     backend: str = "auto", window: int | None = None,
                     block_mask: Callable[[], BlockMask] | None = None) -> torch.Tensor:
    """q (Nq, H, D), k/v (Nk, H, D) → (Nq, H, D). `block_mask`: returns these samples' and tiles'
    `build_block_mask`, for a caller that keeps one per batch; called by the flex path only (None: build here)."""
    if backend == "auto":
        backend = "flex" if q.is_cuda else "masked"
    if backend == "masked":
        mask = allowed(query_samples, key_samples, query_tiles, key_tiles, window)  # (Nq, Nk)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask[None])  # (H, Nq, D)
        return out.transpose(0, 1)  # (Nq, H, D)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        if block_mask is None:
            mask = build_block_mask(query_samples, key_samples, query_tiles, key_tiles, window)
        else:
            mask = block_mask()
        attend = _compiled_flex() if q.is_cuda else flex_attention
        out = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                     block_mask=mask)  # (1, H, Nq, D)
        return out[0].transpose(0, 1)  # (Nq, H, D)
    raise ValueError(f"unknown attention backend {backend!r} (auto, flex, masked)")


def mask_mod(query_samples: torch.Tensor, key_samples: torch.Tensor, query_tiles: torch.Tensor,
             key_tiles: torch.Tensor, window: int | None = None):
    """`allowed` as FlexAttention's mask_mod: one (query, key) pair at a time."""

    def mod(batch, head, query_index, key_index):
        same = query_samples[query_index] == key_samples[key_index]
        causal = key_tiles[key_index] <= query_tiles[query_index]
        if window is not None:
            causal = causal & (key_tiles[key_index] >= query_tiles[query_index] - window)
        return same & causal

    return mod


def build_block_mask(query_samples: torch.Tensor, key_samples: torch.Tensor, query_tiles: torch.Tensor,
                     key_tiles: torch.Tensor, window: int | None = None, block: int = BLOCK) -> BlockMask:
    """FlexAttention's BlockMask of `allowed`, identical to create_block_mask's (same blocks, same order)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mod = mask_mod(query_samples, key_samples, query_tiles, key_tiles, window)
    runs = key_runs(query_samples, key_samples, query_tiles, key_tiles, window)
    if runs is None:
        return create_block_mask(mod, B=None, H=None, Q_LEN=query_samples.shape[0], KV_LEN=key_samples.shape[0],
                                 device=query_samples.device, BLOCK_SIZE=block)
    return _from_runs(*runs, key_samples.shape[0], block, mod)


def key_runs(query_samples: torch.Tensor, key_samples: torch.Tensor, query_tiles: torch.Tensor,
             key_tiles: torch.Tensor, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(start, end), (Nq,) each: query i may attend to exactly the keys start[i] ≤ j < end[i]. None when the keys
    are not sorted by (sample, tile): then a query's keys need not be one run."""
    if query_samples.numel() == 0 or key_samples.numel() == 0:
        return None
    low = torch.minimum(query_tiles.min(), key_tiles.min())
    span = torch.maximum(query_tiles.max(), key_tiles.max()) - low + 1  # () int64: tiles fit in [0, span)
    order = key_samples * span + (key_tiles - low)  # (Nk,) sample-major, then tile
    if not bool((order[1:] >= order[:-1]).all()):  # the one host sync of the build
        return None
    tiles = query_tiles - low  # (Nq,)
    first = torch.zeros_like(tiles) if window is None else (tiles - window).clamp(min=0)  # earliest tile seen
    start = torch.searchsorted(order, query_samples * span + first)  # (Nq,)
    end = torch.searchsorted(order, query_samples * span + tiles, right=True)  # (Nq,)
    return start, end


def _from_runs(start: torch.Tensor, end: torch.Tensor, keys: int, block: int, mod) -> BlockMask:
    """The BlockMask of queries that each see one run of keys [start, end): a block is visited when some query's
    run meets it, and full (mask_mod skipped) when every query's run covers it, as create_block_mask classifies
    its dense mask; a block with padding (past the last query or key) is never full there either."""
    from torch.nn.attention.flex_attention import BlockMask

    queries = start.shape[0]
    rows, cols = -(-queries // block), -(-keys // block)  # query blocks R, key blocks C
    pad = rows * block - queries
    # Padding queries see nothing (start past end), so they add no visits and spoil fullness, as in torch.
    start = torch.cat([start, start.new_full((pad,), keys)]).view(rows, block)  # (R, block)
    end = torch.cat([end, end.new_zeros(pad)]).view(rows, block)  # (R, block)
    live = (start < end).int()  # (R, block)
    # A run meets key blocks start // block .. (end - 1) // block: +1 at the first, -1 after the last, and a
    # cumulative sum along the key blocks counts the runs meeting each block. All indices lie in [0, C].
    edges = torch.zeros(rows, cols + 1, dtype=torch.int32, device=start.device)  # (R, C + 1)
    edges.scatter_add_(1, start // block, live)
    edges.scatter_add_(1, (end - 1) // block + 1, -live)
    visited = edges.cumsum(1)[:, :cols] > 0  # (R, C)
    first_key = torch.arange(cols, device=start.device) * block  # (C,)
    full = ((start.amax(1)[:, None] <= first_key) & (end.amin(1)[:, None] >= first_key + block)
            & (first_key + block <= keys))  # (R, C)
    partial = visited & ~full
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block, mask_mod=mod,
                                    seq_lengths=(queries, keys))


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) bool → counts (1, 1, R) and key-block indices (1, 1, R, C), visited first: create_block_mask's layout."""
    blocks = blocks[None, None].int()  # (1, 1, R, C)
    counts = blocks.sum(-1, dtype=torch.int32)  # (1, 1, R)
    return counts, torch.argsort(blocks, dim=-1, descending=True, stable=True).int()


_COMPILED = None


def _compiled_flex():
    # FlexAttention is only fast compiled; compile once per process.
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=True)
    return _COMPILED
