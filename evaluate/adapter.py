"""One adapter through which any tokenizer is evaluated: encode and decode callables (plus optional heads).

Media are what the shards decode to: (T, 3, H, W) float in [-1, 1], an image being T = 1. `encode` takes a
list of media and returns whatever latent the tokenizer keeps; `decode` turns that latent back into the list
of media. The suite never looks inside the latent, so a baseline VAE, the AToken transformer or an external
tokenizer wrapped in two functions are scored by the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

Media = torch.Tensor  # (T, 3, H, W) in [-1, 1]


@dataclass
class TokenizerAdapter:
    name: str
    encode: Callable[[list[Media]], Any]
    decode: Callable[[Any], list[Media]]
    # Pooled embeddings (S, D), for zero-shot classification and retrieval; None: the tokenizer has none.
    embed: Callable[[list[Media]], torch.Tensor] | None = None
    # 3D: (voxels (V, 3) int, features (V, F)) → Gaussians (a dict as GaussianHead returns); None: no 3D head.
    decode_gaussians: Callable[[np.ndarray, np.ndarray], dict[str, torch.Tensor]] | None = None
    latent: str = "posterior mean (no sampling)"  # what `decode` receives: a protocol field of every metric
    device: str = "cpu"  # where the suite puts media before encode and embed; outputs come back to the CPU
    # The pixel multiple the tokenizer codes (its patch, or its total stride): the suite centre-crops each image
    # and frame whose sides are not multiples of it (native-aspect shards) and records the crop in the protocols.
    multiple: int = 1

    @torch.no_grad()
    def reconstruct(self, media: list[Media]) -> list[Media]:
        out = self.decode(self.encode(media))
        if len(out) != len(media) or any(o.shape != m.shape for o, m in zip(out, media, strict=True)):
            raise ValueError(
                f"tokenizer {self.name!r}: decode returned shapes {[tuple(o.shape) for o in out]} "
                f"for inputs {[tuple(m.shape) for m in media]}"
            )
        return out


def image_model_adapter(model: nn.Module, name: str) -> TokenizerAdapter:
    """A model with the pipeline's image contract: encode(pixels (B, 3, H, W)) → (mean, logvar), decode(latent).

    A video is its frames, each coded as an image (what a per-frame 2D VAE does); the posterior mean is used,
    never a sample, so evaluation is deterministic."""

    def encode(media: list[Media]) -> list[tuple[list[int], torch.Tensor, list[int]]]:
        # One batch per frame size (native-aspect shards mix sizes): (indices, mean, frames of each).
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, m in enumerate(media):
            by_size.setdefault(tuple(m.shape[1:]), []).append(index)
        groups = []
        for indices in by_size.values():
            mean, _ = model.encode(torch.cat([media[i] for i in indices]).to(device))  # (ΣT, C, h, w)
            groups.append((indices, mean, [media[i].shape[0] for i in indices]))
        return groups

    def decode(latent: list[tuple[list[int], torch.Tensor, list[int]]]) -> list[Media]:
        out: dict[int, Media] = {}
        for indices, mean, lengths in latent:
            out.update(zip(indices, model.decode(mean).cpu().split(lengths), strict=True))  # each (T, 3, H, W)
        return [out[i] for i in range(len(out))]

    device = model_device(model)
    multiple = getattr(model, "compression", None) or getattr(model, "patch_size", 1)  # conv_vae: 16x; patches
    return TokenizerAdapter(name, encode, decode, device=str(device), multiple=int(multiple))


def atoken_adapter(model: nn.Module, name: str, quantize: bool = False) -> TokenizerAdapter:
    """The AToken transformer: media packed into one sequence, posterior mean (FSQ-quantized for a model trained
    with quantize, curriculum stage 4) decoded to pixel patches."""
    from atoken.train.model.tokens import pack, patchify_video, split_samples, unpatchify, voxel_tokens

    patch, temporal = model.config.patch_size, model.config.temporal_patch
    device = model_device(model)

    def packed(media: list[Media]):
        return pack([patchify_video(m.cpu(), patch, temporal) for m in media]).to(device)

    def encode(media: list[Media]):
        batch = packed(media)
        mean = model.encode(batch)["mean"]  # (N, C)
        return batch, model.quantize(mean)[0] if quantize else mean

    def decode(latent) -> list[Media]:
        batch, mean = latent
        patches = model.decode(mean, batch)["patches"].cpu()  # (N, 3072)
        batch = batch.to("cpu")
        return [
            unpatchify(part, layout, patch, temporal)
            for part, layout in zip(split_samples(patches, batch), batch.layouts, strict=True)
        ]

    @torch.no_grad()
    def embed(media: list[Media]) -> torch.Tensor:
        return model.embed(packed(media)).cpu()  # (S, D)

    @torch.no_grad()
    def decode_gaussians(voxels: np.ndarray, features: np.ndarray) -> dict[str, torch.Tensor]:
        batch = pack(
            [
                voxel_tokens(
                    torch.from_numpy(np.asarray(voxels)).long(),
                    torch.from_numpy(np.asarray(features, dtype=np.float32)),
                    model.config.patch_dim,
                )
            ]
        ).to(device)
        mean = model.encode(batch)["mean"]  # (V, C)
        gaussians = model.decode(model.quantize(mean)[0] if quantize else mean, batch)["gaussians"]
        return {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in gaussians.items()}

    latent = "FSQ-quantized posterior mean" if quantize else "posterior mean (no sampling)"
    return TokenizerAdapter(name, encode, decode, embed, decode_gaussians, latent, str(device), multiple=patch)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def adapter_for_model(model: nn.Module, name: str, quantize: bool = False) -> TokenizerAdapter:
    """The adapter for a model `atoken.train.model.build_model` made."""
    from atoken.train.model import Tokenizer

    model.eval()
    if isinstance(model, Tokenizer):
        return atoken_adapter(model, name, quantize)
    if quantize:
        raise ValueError(f"tokenizer {name!r}: only the atoken model has an FSQ quantizer")
    return image_model_adapter(model, name)
