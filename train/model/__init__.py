"""Model definitions; `build_model` turns the config's model section into a module."""

from __future__ import annotations

from torch import nn

from atoken.pipeline.config import ModelSection
from atoken.train.model.conv_vae import ConvVAE
from atoken.train.model.patch_autoencoder import PatchAutoencoder
from atoken.train.model.tokenizer import PRESETS, Tokenizer, TokenizerConfig


def build_model(section: ModelSection) -> nn.Module:
    """Both kinds keep one image contract: model(pixels (B, 3, H, W)) → reconstruction, mean, logvar."""
    if section.kind == "patch_autoencoder":
        return PatchAutoencoder(section.patch_size, section.hidden_channels, section.latent_channels)
    if section.kind == "conv_vae":  # the evaluation's conventional baseline: 16x compression, same latent width
        return ConvVAE(section.hidden_channels, section.latent_channels)
    if section.kind == "atoken":
        return Tokenizer.from_preset(section.preset, latent_channels=section.latent_channels,
                                     patch_size=section.patch_size, text_dim=section.text_dim,
                                     gaussians_per_voxel=section.gaussians_per_voxel,
                                     voxel_grid=section.voxel_grid)
    raise ValueError(f"train.model.kind: unknown model {section.kind!r}")


__all__ = ["PRESETS", "ConvVAE", "PatchAutoencoder", "Tokenizer", "TokenizerConfig", "build_model"]
