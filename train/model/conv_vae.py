"""The conventional baseline every evaluation report shows beside the transformer: a convolutional KL-VAE with
the same 16x spatial compression and the same latent channels.

    pixels (B, 3, H, W) ─► 4x4/4 patchify conv ─► 2 x [ResBlock, stride-2 conv] ─► ResBlock ─► 1x1 → mean, logvar
    latent (B, C, H/16, W/16) ─► 1x1 ─► ResBlock ─► 2 x [2x up, conv, ResBlock] ─► 4x4/4 transposed conv → (B, 3, H, W)

A ConvNeXt-style patchify stem instead of SD-VAE's full-resolution residual blocks: with those, one step on
2 CPU cores took 5-8x the tiny transformer's (measured, 64 px, batch 32), and the baseline must train within
the same budget. Same image contract as the other kinds (encode → mean, logvar; decode; forward →
reconstruction, mean, logvar), so the same stage-1 harness trains it on the same images.
"""

from __future__ import annotations

import torch
from torch import nn

from atoken.train.model.patch_autoencoder import KLAutoencoder

STEM = 4  # the patchify stem's stride
DOWNSAMPLINGS = 2  # then 2 stride-2 convs: 4 · 2² = 16x per side, the transformer's patch size


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        groups = min(8, channels)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)  # (B, C, h, w)


class ConvVAE(KLAutoencoder):
    def __init__(self, hidden_channels: int, latent_channels: int):
        super().__init__()
        self.latent_channels = latent_channels
        self.compression = STEM * 2**DOWNSAMPLINGS
        widths = [hidden_channels * 2**i for i in range(DOWNSAMPLINGS + 1)]  # e.g. 32, 64, 128
        encoder: list[nn.Module] = [nn.Conv2d(3, widths[0], STEM, stride=STEM)]  # (B, w0, H/4, W/4)
        for i in range(DOWNSAMPLINGS):
            encoder += [ResBlock(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        encoder += [
            ResBlock(widths[-1]),
            nn.GroupNorm(min(8, widths[-1]), widths[-1]),
            nn.SiLU(),
            nn.Conv2d(widths[-1], 2 * latent_channels, 1),
        ]  # (B, 2C, H/16, W/16)
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 1), ResBlock(widths[-1])]
        for i in reversed(range(DOWNSAMPLINGS)):
            decoder += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                ResBlock(widths[i]),
            ]
        decoder += [
            nn.GroupNorm(min(8, widths[0]), widths[0]),
            nn.SiLU(),
            nn.ConvTranspose2d(widths[0], 3, STEM, stride=STEM),
        ]  # (B, 3, H, W)
        self.decoder = nn.Sequential(*decoder)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = pixels.shape[-2:]
        if height % self.compression or width % self.compression:
            raise ValueError(f"conv_vae: image sides must be multiples of {self.compression}, got {height}x{width}")
        return super().encode(pixels)  # (B, C, H/16, W/16) each
