"""Transformer layers for packed 4-D tokens: one block used by the encoder and the decoder.

Encoder blocks follow SigLIP2 exactly (LayerNorm with bias, biased projections, GELU-tanh MLP) and use its
parameter names, so a SigLIP2 checkpoint loads by name. Decoder blocks, trained from scratch, use RMSNorm,
QK-RMSNorm and no biases (spec). Both apply 4-D RoPE to queries and keys, and can run over a video tile
by tile with a KV cache of the earlier tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from atoken.train.model.attention import build_block_mask, packed_attention
from atoken.train.model.rope import apply_rope

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


@dataclass
class TokenInfo:
    """What attention needs about the tokens in flight: sample, temporal tile, RoPE angles."""
    samples: torch.Tensor  # (N,) int64
    tiles: torch.Tensor  # (N,) int64
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (N, head_dim / 2), None = RoPE off
    window: int | None = None  # earlier tiles a token may attend to (None: all of them)
    # Samples and tiles of the cached keys of earlier tiles, which these tokens also attend to (set by Stack).
    past_samples: torch.Tensor | None = None  # (M,)
    past_tiles: torch.Tensor | None = None  # (M,)
    _block_mask: BlockMask | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def key_samples(self) -> torch.Tensor:
        """(M + N,): the cached keys' samples, then these tokens'."""
        return self.samples if self.past_samples is None else torch.cat([self.past_samples, self.samples])

    @property
    def key_tiles(self) -> torch.Tensor:
        """(M + N,)"""
        return self.tiles if self.past_tiles is None else torch.cat([self.past_tiles, self.tiles])

    def block_mask(self) -> BlockMask:
        """The flex path's BlockMask, built on first use and then reused by every layer that reads this TokenInfo
        (so400m: 27 encoder + 27 decoder layers share one, where each used to build its own)."""
        if self._block_mask is None:
            self._block_mask = build_block_mask(self.samples, self.key_samples, self.tiles, self.key_tiles,
                                                self.window)
        return self._block_mask


@dataclass
class KVCache:
    """Keys and values of earlier tiles, per layer, with the samples and tiles they belong to."""
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (M, H, D)
    values: list[torch.Tensor] = field(default_factory=list)
    samples: torch.Tensor | None = None  # (M,)
    tiles: torch.Tensor | None = None  # (M,)

    def drop_before(self, tile: int) -> None:
        """Forget the tiles no later query can see: what bounds memory on long videos."""
        if self.tiles is None:
            return
        keep = self.tiles >= tile
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.samples, self.tiles = self.samples[keep], self.tiles[keep]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool, qk_norm: bool, backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.backend = heads, width // heads, backend
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.out_proj = nn.Linear(width, width, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None

    def forward(self, x: torch.Tensor, info: TokenInfo, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.heads, self.head_dim)  # (N, H, D)
        k = self.k_proj(x).view(n, self.heads, self.head_dim)  # (N, H, D)
        v = self.v_proj(x).view(n, self.heads, self.head_dim)  # (N, H, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if info.rope is not None:
            q, k = apply_rope(q, *info.rope), apply_rope(k, *info.rope)
        if cache is not None and cache.samples is not None:
            k = torch.cat([cache.keys[layer], k])  # (M + N, H, D)
            v = torch.cat([cache.values[layer], v])
        if cache is not None:
            # Stored for the next tile; the caller appends samples/tiles once all layers have run.
            cache.keys[layer:layer + 1] = [k]
            cache.values[layer:layer + 1] = [v]
        # The cached keys' samples and tiles come with `info` (Stack puts them there), and so does the mask.
        out = packed_attention(q, k, v, info.samples, info.key_samples, info.tiles, info.key_tiles, self.backend,
                               info.window, info.block_mask)  # (N, H, D)
        return self.out_proj(out.reshape(n, -1))  # (N, width)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width, bias=bias)
        self.fc2 = nn.Linear(mlp_width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block; `siglip=True` is SigLIP2's encoder layer, False the decoder's."""

    def __init__(self, width: int, heads: int, mlp_width: int, siglip: bool, eps: float = 1e-6,
                 backend: str = "auto"):
        super().__init__()
        norm = (lambda: nn.LayerNorm(width, eps=eps)) if siglip else (lambda: nn.RMSNorm(width, eps=eps))
        self.layer_norm1 = norm()
        self.self_attn = Attention(width, heads, bias=siglip, qk_norm=not siglip, backend=backend)
        self.layer_norm2 = norm()
        self.mlp = MLP(width, mlp_width, bias=siglip)

    def forward(self, x: torch.Tensor, info: TokenInfo, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), info, cache, layer)
        return x + self.mlp(self.layer_norm2(x))


class Stack(nn.Module):
    """The blocks, run over all tokens at once or over one tile with a cache of the tiles before it."""

    def __init__(self, depth: int, width: int, heads: int, mlp_width: int, siglip: bool, eps: float = 1e-6,
                 backend: str = "auto"):
        super().__init__()
        self.layers = nn.ModuleList(Block(width, heads, mlp_width, siglip, eps, backend) for _ in range(depth))
        # Activation checkpointing (train.stages[].activation_checkpointing): each block's activations are
        # recomputed in backward instead of kept, a block's worth of memory instead of depth's.
        self.checkpointing = False

    def forward(self, x: torch.Tensor, info: TokenInfo, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None and cache.samples is not None:
            # Keys of this tile's every layer: the cached tiles' and its own, one mask for all layers.
            info = replace(info, past_samples=cache.samples, past_tiles=cache.tiles)
        recompute = self.checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, info, None, index, use_reentrant=False)
            else:
                x = layer(x, info, cache, index)
        if cache is not None:
            cache.samples = info.samples if cache.samples is None else torch.cat([cache.samples, info.samples])
            cache.tiles = info.tiles if cache.tiles is None else torch.cat([cache.tiles, info.tiles])
        return x
