"""Attention pooling (SigLIP's MAP head) over a packed token sequence → one embedding per sample.

Spec row "understanding": the encoder output is pooled by a learned probe that cross-attends to the
sample's tokens. Parameter names and maths are those of transformers'
`Siglip2MultiheadAttentionPoolingHead` (`probe`, `attention`, `layernorm`, `mlp.fc1`, `mlp.fc2`), so a
SigLIP2 checkpoint's head loads with `load_state_dict(strict=True)`; the one difference is the input:
here the samples of a batch are packed end to end in one (N, D) sequence, told apart by `sample_ids`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PoolingMLP(nn.Module):
    """SigLIP's MLP: fc1 → GELU (tanh approximation, SigLIP's `gelu_pytorch_tanh`) → fc2."""

    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AttentionPooling(nn.Module):
    """Multihead attention pooling: one learned query per sample, attending to that sample's tokens only."""

    def __init__(self, width: int, heads: int, mlp_width: int, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width))  # (1, 1, D), as SigLIP initialises it
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = PoolingMLP(width, mlp_width)

    def forward(self, hidden: torch.Tensor, sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
        """hidden (N, D), sample_ids (N,) in [0, num_samples), any order → (num_samples, D).

        The B probes are the B queries of one attention call over all N packed tokens, with a block mask
        letting probe b see only the tokens of sample b. Keys and values are projected once for the N
        real tokens and the scores cost B·N per head; padding every sample to the longest one would
        instead project B·L_max tokens, many times N when one long video shares a batch with small images.
        """
        probe = self.probe.expand(1, num_samples, -1)  # (1, B, D): one batch, B queries
        samples = torch.arange(num_samples, device=hidden.device)  # (B,)
        blocked = sample_ids[None, :] != samples[:, None]  # (B, N) True: another sample's token
        # An additive finfo.min mask, as transformers builds for this head, not a boolean one (-inf): a
        # sample without tokens then pools the mean of all values instead of turning into NaN, which
        # would poison the gradients of every other sample through the shared parameters.
        attn_mask = torch.zeros(blocked.shape, dtype=hidden.dtype, device=hidden.device)  # (B, N)
        attn_mask = attn_mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)  # (B, N)
        keys = hidden.unsqueeze(0)  # (1, N, D)
        # need_weights=False: the weights are unused, and asking for them also averages them over heads.
        pooled = self.attention(probe, keys, keys, attn_mask=attn_mask, need_weights=False)[0]  # (1, B, D)
        pooled = pooled + self.mlp(self.layernorm(pooled))  # (1, B, D)
        return pooled[0]  # (B, D)
