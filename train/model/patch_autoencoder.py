"""The first slice's tokenizer: a small convolutional KL autoencoder over image patches.

It is the smallest model that learns in minutes on 2 CPU cores, with the interfaces the AToken
transformer will keep: `encode` → (mean, logvar) latents, `decode` → pixels in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn


class KLAutoencoder(nn.Module):
    """The image contract every convolutional kind keeps: `self.encoder` maps pixels (B, 3, H, W) to moments
    (B, 2C, h, w), `self.decoder` maps a latent (B, C, h, w) back to pixels; a subclass builds both."""

    encoder: nn.Module
    decoder: nn.Module

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(pixels).chunk(2, dim=1)  # (B, C, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)  # (B, 3, H, W)

    def forward(self, pixels: torch.Tensor, sample: bool = True, noise=None) -> dict[str, torch.Tensor]:
        """`noise`: a callable giving ε shaped like the mean (the training loop's per-stream draws); None: the
        global RNG."""
        mean, logvar = self.encode(pixels)
        epsilon = noise(mean) if noise is not None else torch.randn_like(mean)  # (B, C, h, w)
        latent = mean + epsilon * (0.5 * logvar).exp() if sample else mean
        return {"reconstruction": self.decode(latent), "mean": mean, "logvar": logvar}


class PatchAutoencoder(KLAutoencoder):
    def __init__(self, patch_size: int, hidden_channels: int, latent_channels: int):
        super().__init__()
        self.patch_size = patch_size
        self.latent_channels = latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, hidden_channels, kernel_size=patch_size, stride=patch_size),
            nn.GELU(),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden_channels, 2 * latent_channels, kernel_size=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, hidden_channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(hidden_channels, 3, kernel_size=patch_size, stride=patch_size),
        )
