"""Transformer layers for packed 4-D tokens: one block used by the encoder and the decoder.

Encoder blocks follow SigLIP2 exactly (LayerNorm with bias, biased projections, GELU-tanh MLP) and use its
parameter names, so a SigLIP2 checkpoint loads by name. Decoder blocks, trained from scratch, use RMSNorm,
QK-RMSNorm and no biases (spec). Both apply 4-D RoPE to queries and keys, and can run over a video tile
by tile with a KV cache of the earlier tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from atoken.train.model.attention import packed_attention
from atoken.train.model.rope import apply_rope


@dataclass
class TokenInfo:
    """What attention needs about the tokens in flight: sample, temporal tile, RoPE angles."""
    samples: torch.Tensor  # (N,) int64
    tiles: torch.Tensor  # (N,) int64
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (N, head_dim / 2), None = RoPE off
    window: int | None = None  # earlier tiles a token may attend to (None: all of them)


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
        key_samples, key_tiles = info.samples, info.tiles
        if cache is not None and cache.samples is not None:
            k = torch.cat([cache.keys[layer], k])  # (M + N, H, D)
            v = torch.cat([cache.values[layer], v])
            key_samples = torch.cat([cache.samples, info.samples])
            key_tiles = torch.cat([cache.tiles, info.tiles])
        if cache is not None:
            # Stored for the next tile; the caller appends samples/tiles once all layers have run.
            cache.keys[layer:layer + 1] = [k]
            cache.values[layer:layer + 1] = [v]
        out = packed_attention(q, k, v, info.samples, key_samples, info.tiles, key_tiles, self.backend,
                               info.window)  # (N, H, D)
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

    def forward(self, x: torch.Tensor, info: TokenInfo, cache: KVCache | None = None) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x, info, cache, index)
        if cache is not None:
            cache.samples = info.samples if cache.samples is None else torch.cat([cache.samples, info.samples])
            cache.tiles = info.tiles if cache.tiles is None else torch.cat([cache.tiles, info.tiles])
        return x
