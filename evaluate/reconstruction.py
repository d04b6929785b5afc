"""Reconstruction evaluation: encode and decode held-out shards, score each image, keep the protocol.

A plain function; the pipeline's evaluate stage runs it as a Ray task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from atoken.evaluate.metrics import psnr, ssim
from atoken.pipeline.config import ModelSection
from atoken.pipeline.storage import Storage
from atoken.train.checkpoint import load_model_weights
from atoken.train.data import ShardInfo, decode_image, read_shard
from atoken.train.model import build_model

METRICS = {"psnr": (psnr.psnr_uint8, psnr.PROTOCOL), "ssim": (ssim.ssim_uint8, ssim.PROTOCOL)}


@dataclass
class ReconstructionReport:
    summary: dict[str, float]
    protocol: dict[str, Any]
    rows: list[dict[str, Any]]  # one per image: key + each metric
    grid: list[list[np.ndarray]]  # [originals, reconstructions], (H, W, 3) uint8 each


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8, rounding as an image writer would."""
    return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def evaluate_reconstruction(model_section: ModelSection, weights_uri: str, shards: list[ShardInfo],
                            storage: Storage, metric_names: list[str], max_samples: int | None,
                            grid_samples: int, batch_size: int = 32) -> ReconstructionReport:
    model = build_model(model_section)
    load_model_weights(storage, weights_uri, model)
    model.eval()
    samples = [sample for shard in shards for sample in read_shard(storage, shard.uri)]
    samples = samples[:max_samples]
    if not samples:
        raise ValueError("evaluation: the validation shards hold no samples")
    rows: list[dict[str, Any]] = []
    grid: list[list[np.ndarray]] = [[], []]
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels = torch.stack([decode_image(s) for s in chunk])  # (B, 3, H, W)
        # The posterior mean, not a sample: evaluation must be deterministic.
        reconstruction = model(pixels, sample=False)["reconstruction"]  # (B, 3, H, W)
        for sample, original, decoded in zip(chunk, pixels, reconstruction, strict=True):
            reference, output = to_uint8(original), to_uint8(decoded)
            row = {"key": sample["__key__"]}
            row |= {name: METRICS[name][0](reference, output) for name in metric_names}
            rows.append(row)
            if len(grid[0]) < grid_samples:
                grid[0].append(reference)
                grid[1].append(output)
    summary = {name: float(np.mean([row[name] for row in rows])) for name in metric_names}
    protocol = {name: METRICS[name][1] for name in metric_names}
    protocol |= {"split": "val", "samples": len(rows), "latent": "posterior mean (no sampling)",
                 "resolution": f"{pixels.shape[-1]} px square"}
    return ReconstructionReport(summary, protocol, rows, grid)
