"""Perceptual reconstruction terms of the image loss (spec: losses): LPIPS, Gram and CLIP-perceptual at 224².

All three read one frozen feature network so that a step pays for one forward pass over target and
reconstruction: real LPIPS (VGG16 from a safetensors path, lpips' calibrated heads) when a backbone is given,
otherwise the declared EfficientNet-Lite0 stand-in of evaluate/metrics/lpips.py. The paper names neither the
Gram network nor its layers; ours are the LPIPS network's taps. CLIP-perceptual compares the pooled embeddings
of a frozen vision tower (SigLIP2 from a path), or, without one, the stand-in's last tap mean-pooled.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from atoken.evaluate.metrics.lpips import LPIPS, PerceptualStandIn, unit_normalise
from atoken.train.losses.towers import ImageTower


def resize_for_features(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) → (B, 3, size, size), antialiased when shrinking (the spec's 224² for perceptual terms)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, C, C): F Fᵀ / (H·W) of the features unit-normalised over channels at each position.

    The paper leaves the normalisation open; unit-normalising (as LPIPS does before its distance) keeps every
    entry within [-1, 1] whatever the layer's activation scale, so the spec's weight of 1000 on the mean squared
    entry difference gives a term of the same order as L1."""
    batch, channels, height, width = features.shape
    # float32 even under bf16 autocast: entries of one matrix differ by ~1e-3, below bf16's resolution near 1.
    with torch.autocast(features.device.type, enabled=False):
        flat = unit_normalise(features.float()).reshape(batch, channels, height * width)  # (B, C, HW)
        return flat @ flat.transpose(1, 2) / (height * width)  # (B, C, C)


class PerceptualLosses(nn.Module):
    def __init__(self, resolution: int = 224, lpips_backbone: str | None = None, vision_tower: str | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.resolution = resolution
        self.network = LPIPS(lpips_backbone) if lpips_backbone else PerceptualStandIn()
        # The tower is the process's shared copy at this placement (frozen_hf_model): move the rest to match.
        self.tower = ImageTower.from_path(vision_tower, device, dtype) if vision_tower else None
        self.requires_grad_(False).eval()
        self.stand_ins = {}
        if not lpips_backbone:
            self.stand_ins["lpips"] = "EfficientNet-Lite0 features (PerceptualStandIn), not LPIPS"
        if not vision_tower:
            self.stand_ins["clip_perceptual"] = "EfficientNet-Lite0 last tap, mean-pooled, not a SigLIP2 tower"

    def train(self, mode: bool = True) -> PerceptualLosses:
        return super().train(False)  # frozen networks stay in eval mode (batch norm statistics)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(self.network, LPIPS):
            return self.network.backbone((images - self.network.shift) / self.network.scale)
        return self.network.taps(((images + 1.0) * 127.5 - 127.0) / 128.0)

    def _layer_distance(self, index: int, target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        difference = (unit_normalise(target) - unit_normalise(output)) ** 2  # (B, C, h, w)
        if isinstance(self.network, LPIPS):
            return self.network.heads[index](difference).mean(dim=(1, 2, 3))  # (B,)
        return difference.sum(dim=1).mean(dim=(1, 2))  # (B,)

    def forward(self, target: torch.Tensor, output: torch.Tensor,
                terms: Collection[str] = ("lpips", "gram", "clip_perceptual")) -> dict[str, torch.Tensor]:
        """target, output (B, 3, H, W) in [-1, 1] → the asked `terms` of {lpips, gram, clip_perceptual}, each a
        batch mean (a term not asked for is not computed: the 3D render loss needs LPIPS alone)."""
        batch = target.shape[0]
        # In the frozen network's dtype (bf16 on GPU), whether or not autocast is on (the 3D render loss calls
        # it from float32 code).
        dtype = next(self.network.parameters()).dtype
        both = resize_for_features(torch.cat([target.detach(), output]).to(dtype), self.resolution)  # (2B, 3, R, R)
        taps = self._taps(both)
        result: dict[str, torch.Tensor] = {}
        if "lpips" in terms:
            lpips = sum(self._layer_distance(i, f[:batch], f[batch:]) for i, f in enumerate(taps))  # (B,)
            if isinstance(self.network, PerceptualStandIn):
                lpips = lpips / len(taps)  # the stand-in's uniform layer weights
            result["lpips"] = lpips.mean()
        if "gram" in terms:
            result["gram"] = sum((gram_matrix(f[:batch]) - gram_matrix(f[batch:])).square().mean() for f in taps)
        if "clip_perceptual" in terms:
            if self.tower is not None:
                embedded = F.normalize(self.tower(both), dim=-1)  # (2B, D)
            else:
                embedded = F.normalize(taps[-1].mean(dim=(2, 3)), dim=-1)  # (2B, C_last)
            result["clip_perceptual"] = (1.0 - (embedded[:batch] * embedded[batch:]).sum(-1)).mean()
        return result
