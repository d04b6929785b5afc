"""Frozen image towers from Hugging Face folders: the distillation teacher and the CLIP-perceptual network.

SigLIP (fixed resolution) and SigLIP2 naflex checkpoints load by path through transformers (model loading only,
safetensors only). SigLIP2 naflex takes pre-cut patches; they are cut here in its (h, w, c) order, the same
order as the first frame of our own patches (train/model/tokens.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from atoken.train.model.text_encoder import frozen_hf_model, weights_sha256

TOWER_TYPES = ("siglip", "siglip2")


class ImageTower(nn.Module):
    def __init__(self, model: nn.Module, model_type: str, image_size: int, patch_size: int, file_sha256: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_type = model_type
        self.image_size = image_size
        self.patch_size = patch_size
        self.file_sha256 = file_sha256
        scale = getattr(model, "logit_scale", None)
        # The teacher's own similarity scale, for the temperature-scaled distillation (SigLIP learns it).
        self.similarity_scale = float(scale.exp()) if scale is not None else 100.0

    @classmethod
    def from_path(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ImageTower:
        from transformers import AutoConfig

        folder = Path(path)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type not in TOWER_TYPES:
            raise ValueError(f"{folder}: a {config.model_type!r} model; the image tower must be one of {TOWER_TYPES}")
        sha = weights_sha256(folder)
        model = frozen_hf_model(str(folder.resolve()), str(device), dtype)  # shared with the folder's text tower
        vision = config.vision_config
        return cls(model, config.model_type, getattr(vision, "image_size", 224), vision.patch_size, sha)

    def train(self, mode: bool = True) -> ImageTower:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] (SigLIP's own normalisation) → pooled embeddings (B, D), in the tower's
        dtype (bf16 on GPU: the inputs are cast, since the understanding losses call it outside autocast)."""
        images = images.to(next(self.model.parameters()).dtype)
        if self.model_type == "siglip":
            pixels = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False,
                                   antialias=True)
            features = self.model.get_image_features(pixel_values=pixels)
        else:
            p = self.patch_size
            rows, cols = images.shape[-2] // p, images.shape[-1] // p
            patches = rearrange(images[..., : rows * p, : cols * p], "b c (h ph) (w pw) -> b (h w) (ph pw c)",
                                ph=p, pw=p)  # (B, N, p·p·3)
            mask = torch.ones(patches.shape[:2], dtype=torch.long, device=images.device)  # (B, N)
            shapes = torch.tensor([[rows, cols]] * images.shape[0], device=images.device)  # (B, 2)
            features = self.model.get_image_features(pixel_values=patches, pixel_attention_mask=mask,
                                                     spatial_shapes=shapes)
        return features if isinstance(features, torch.Tensor) else features.pooler_output
