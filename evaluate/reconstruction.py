"""Pixels as the metrics see them: the tokenizer's [-1, 1] floats quantised to uint8 as an image writer would.

The reconstruction metrics themselves run in evaluate/suite.py, through the tokenizer adapter."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8, rounding as an image writer would."""
    return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(1, 2, 0).numpy()


def short_side_resize_description(size: int) -> str:
    """The protocols' `preprocess` field for `resize_short_side_crop(·, size)`."""
    return (f"short side {size} (PIL bicubic, antialiased, long side int(long · {size} / short)) + centre crop "
            f"{size} at (round((h − {size}) / 2), round((w − {size}) / 2)), as torchvision Resize + CenterCrop")


def resize_short_side_crop(media: torch.Tensor, size: int) -> torch.Tensor:
    """(T, 3, H, W) in [-1, 1] → (T, 3, size, size): each frame's short side resized to `size`, then the centre
    square. The ImageNet reconstruction protocol (LlamaGen, TiTok, AToken: short side 256 + centre crop 256)
    through torchvision's Resize(size, BICUBIC) + CenterCrop(size) arithmetic on PIL images: PIL's bicubic widens
    its kernel by the downscale factor, so it is antialiased. Run on the uint8 pixels, as an ImageNet loader
    does (decoded shards hold uint8 values, so the round trip through uint8 loses nothing)."""
    from PIL import Image

    height, width = media.shape[-2:]
    short, long = min(height, width), max(height, width)
    long = int(size * long / short)  # torchvision's _compute_resized_output_size
    new_h, new_w = (size, long) if height <= width else (long, size)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # torchvision center_crop
    frames = []
    for frame in media:
        image = Image.fromarray(to_uint8(frame)).resize((new_w, new_h), Image.Resampling.BICUBIC)
        array = np.asarray(image)[top:top + size, left:left + size]  # (size, size, 3)
        frames.append(torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0)  # (3, size, size)
    return torch.stack(frames)  # (T, 3, size, size)
