"""The latent bottlenecks: a diagonal-Gaussian (KL) head for continuous tokens, FSQ for discrete ones.

Spec rows "latent" and "discrete": the encoder's hidden state goes through `KLHead` to a (mean, logvar)
pair of `latent_channels` (32 in stage 1, 48 from stage 2); in stage 4 the 48-d latent is quantized by
`FSQ` as 8 groups of 6 dims with 4 levels each, i.e. 8 codes of 4**6 = 4096 per position.
"""

from __future__ import annotations

import torch
from torch import nn

# exp(20) ≈ 5e8 and exp(-30) ≈ 1e-13: wide enough never to bind in a healthy run, narrow enough that
# exp(logvar) stays finite in float32 (the clamp of the LDM / SD autoencoders).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class KLHead(nn.Module):
    """Hidden state → moments of a diagonal Gaussian posterior q(z | x) = N(mean, exp(logvar))."""

    def __init__(self, width: int, latent_channels: int):
        super().__init__()
        self.latent_channels = latent_channels
        self.proj = nn.Linear(width, 2 * latent_channels)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.proj(hidden)  # (N, 2C)
        mean, logvar = moments.chunk(2, dim=-1)  # (N, C) each
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw z = mean + std·ε, so gradients reach mean and logvar."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)  # (N, C)
        return mean + torch.exp(0.5 * logvar) * noise  # (N, C)

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1)), in nats.

        A mean rather than the per-sample sum, so its weight does not change with the number of tokens
        that packing puts in a batch.
        """
        per_element = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # (N, C)
        return per_element.mean()


class FSQ(nn.Module):
    """Finite Scalar Quantization (Mentzer et al. 2023, arXiv:2309.15505) over groups of channels.

    Each channel is bounded to (-1, 1) by tanh, then snapped to the nearest of L evenly spaced levels
    that include both ends:

        level index k ∈ {0, …, L-1}  ↦  value 2k/(L-1) - 1
        L = 4:  k = 0, 1, 2, 3        ↦  -1, -1/3, +1/3, +1

    This is the symmetry-preserving FSQ of Parker et al. 2024 (arXiv:2411.19842, Sec. 3.2; `preserve_symmetry`
    in vector-quantize-pytorch). Mentzer et al.'s own bound (App. A.1) instead shifts tanh by half a step for
    even L and gives the lopsided grid {-1, -1/2, 0, +1/2} for L = 4; the symmetric grid uses the whole
    [-1, 1] range and treats both signs alike. For L ≤ 5 the grid values are fixed points (tanh of a grid
    value snaps back to it), so quantizing twice is a no-op.

    A group's code is its level indices read as digits, first channel least significant:
    code = Σ_i k_i · Π_{j<i} L_j, so codes run over [0, Π L) and every combination is reachable.
    The gradient is straight-through across the rounding only: it still flows through tanh, which is
    what keeps the encoder's outputs inside the range that the levels cover (Mentzer et al., Sec. 3).
    """

    def __init__(self, channels: int = 48, groups: int = 8, levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)):
        super().__init__()
        if channels != groups * len(levels):
            raise ValueError(f"FSQ: channels={channels} must equal groups ({groups}) × len(levels) ({len(levels)})")
        if min(levels) < 2:
            raise ValueError(f"FSQ: every level count must be ≥ 2, got {levels}")
        self.channels, self.groups, self.levels = channels, groups, tuple(levels)
        self.codebook_size = int(torch.tensor(levels).prod())  # per group
        # Buffers, not parameters: FSQ learns nothing; non-persistent, so checkpoints stay free of them.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)  # (d,)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), dim=0)  # (d,)
        self.register_buffer("_basis", basis, persistent=False)

    def bound(self, latent: torch.Tensor) -> torch.Tensor:
        """Squash to (-1, 1); the grid's end levels are reached for |latent| ≳ 1."""
        return torch.tanh(latent)

    def round_to_levels(self, bounded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, groups, d) values in [-1, 1] → (grid values with identity gradient, level indices int64)."""
        steps = (self._levels - 1).to(bounded.dtype)  # (d,)
        # floor(x + 0.5) rather than torch.round (ties to even), to match the reference formula bit for bit;
        # bounded ∈ [-1, 1] keeps x + 0.5 ∈ [0.5, L - 0.5], so the index stays in [0, L).
        index = torch.floor((bounded + 1.0) * steps / 2.0 + 0.5).long()  # (..., G, d)
        values = self._index_to_value(index, bounded.dtype)  # (..., G, d)
        # Adding (b - b.detach()) == 0 exactly, so the forward value is the grid value bit for bit (what
        # `codes_to_latent` returns), while the gradient w.r.t. `bounded` is the identity.
        return values + (bounded - bounded.detach()), index

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, channels) → (quantized (N, channels) on the level grid, codes (N, groups) int64)."""
        n = latent.shape[0]
        grouped = latent.view(n, self.groups, len(self.levels))  # (N, G, d)
        quantized, index = self.round_to_levels(self.bound(grouped))  # (N, G, d) each
        codes = (index * self._basis).sum(dim=-1)  # (N, G)
        return quantized.reshape(n, self.channels), codes  # (N, C), (N, G)

    def codes_to_latent(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, groups) int codes → (N, channels) grid values, equal to `forward`'s quantized output."""
        index = (codes.unsqueeze(-1) // self._basis) % self._levels  # (N, G, d)
        values = self._index_to_value(index, dtype)  # (N, G, d)
        return values.reshape(codes.shape[0], self.channels)  # (N, C)

    def _index_to_value(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # One formula shared by `forward` and `codes_to_latent`, so both give bit-identical floats.
        steps = (self._levels - 1).to(dtype)  # (d,)
        return index.to(dtype) * 2.0 / steps - 1.0  # (..., d) in [-1, 1]
