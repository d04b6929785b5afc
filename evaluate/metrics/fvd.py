"""rFVD, TokenBench style: Fréchet distance between I3D logits of reference and reconstructed videos.

Each video: its first ≤ 300 frames, short side resized to 224 and centre-cropped to 224×224, scaled to
[-1, 1], one pass of Kinetics-400 I3D over the whole clip → 400 time-averaged logits per video. The two
sets of 400-d vectors are summarised by float64 running sums (FrechetStats), so videos can stream in
batches and partial accumulators from several workers merge. Published rFVD numbers differ by up to
~10% between implementations (spec, evaluation protocols): report PROTOCOL with every number.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from atoken.evaluate.metrics.frechet import FrechetStats, frechet_from_stats
from atoken.evaluate.metrics.i3d import I3D_SHA256, MIN_FRAMES, SOURCE, InceptionI3d, default_i3d_path, load_i3d
from atoken.evaluate.metrics.i3d import features as i3d_features

SIZE = 224
MAX_FRAMES = 300
FEATURE_DIM = 400

PROTOCOL: dict[str, Any] = {
    "metric": "rFVD (TokenBench style)",
    "network": "Kinetics-400 RGB I3D (DeepMind kinetics-i3d), PyTorch port atoken.evaluate.metrics.i3d",
    "weights": SOURCE,
    "weights_sha256": I3D_SHA256,
    "frames": f"first ≤ {MAX_FRAMES} frames per video, whole clip in one pass (≥ {MIN_FRAMES})",
    "resize": f"short side → {SIZE} (bilinear, antialiased, float), centre crop {SIZE}×{SIZE}",
    "range": "[-1, 1] (uint8 / 127.5 - 1)",
    "features": f"{FEATURE_DIM}-d I3D logits, averaged over time as the TF/JAX model does",
    "feature_dim": FEATURE_DIM,
    "distance": "Fréchet distance, unbiased covariance; sqrtm as pytorch-fid",
    "implementation": "atoken float64 running sums",
}


def preprocess(video: np.ndarray, chunk: int = 32) -> torch.Tensor:
    """(T, H, W, 3) uint8 → (min(T, 300), 224, 224, 3) float32 in [-1, 1]; resized a chunk of frames at a time."""
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"rFVD takes (T, H, W, 3) uint8 videos, got {video.shape} {video.dtype}")
    frames = torch.from_numpy(np.ascontiguousarray(video[:MAX_FRAMES]))  # (T, H, W, 3)
    height, width = frames.shape[1:3]
    scale = SIZE / min(height, width)
    size = (max(SIZE, round(height * scale)), max(SIZE, round(width * scale)))
    top, left = (size[0] - SIZE) // 2, (size[1] - SIZE) // 2
    out = torch.empty(frames.shape[0], SIZE, SIZE, 3)
    for start in range(0, frames.shape[0], chunk):  # a 300-frame 720p clip is 3 GB as float: never hold it all
        x = frames[start:start + chunk].permute(0, 3, 1, 2).float()  # (t, 3, H, W)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)  # (t, 3, h, w)
        x = x[:, :, top:top + SIZE, left:left + SIZE]  # (t, 3, 224, 224)
        out[start:start + chunk] = x.permute(0, 2, 3, 1) / 127.5 - 1.0  # (t, 224, 224, 3)
    return out


def video_features(model: InceptionI3d, videos: Sequence[np.ndarray]) -> np.ndarray:
    """Each (T, H, W, 3) uint8 video → its 400 I3D logits: (N, 400) float64. Videos may differ in T and size."""
    progress = tqdm(videos, desc="rFVD: I3D", unit="video", leave=False, disable=None)  # silent off a terminal
    rows = [i3d_features(model, preprocess(video)[None]).double().cpu().numpy() for video in progress]  # (1, 400)
    return np.concatenate(rows) if rows else np.zeros((0, FEATURE_DIM))


class FVDAccumulator:
    """Streaming rFVD: feed (reference, reconstructed) batches, merge accumulators across workers, compute once."""

    def __init__(self, model: InceptionI3d | None = None, weights: str | Path | None = None,
                 device: str | torch.device | None = None):
        self.model = model if model is not None else load_i3d(weights or default_i3d_path())
        if device is not None:
            self.model.to(device)
        self.reference = FrechetStats(FEATURE_DIM)
        self.reconstructed = FrechetStats(FEATURE_DIM)

    def update(self, reference_videos: Sequence[np.ndarray], reconstructed_videos: Sequence[np.ndarray]) -> None:
        """Lists of (T, H, W, 3) uint8 videos; pairing is not required, but rFVD feeds pairs."""
        self.update_features(video_features(self.model, reference_videos),
                             video_features(self.model, reconstructed_videos))

    def update_features(self, reference_features: np.ndarray, reconstructed_features: np.ndarray) -> None:
        """(n, 400) I3D logits from video_features, computed elsewhere (another worker, a cache)."""
        self.reference.update(reference_features)
        self.reconstructed.update(reconstructed_features)

    def merge(self, other: FVDAccumulator) -> FVDAccumulator:
        self.reference = self.reference.merge(other.reference)
        self.reconstructed = self.reconstructed.merge(other.reconstructed)
        return self

    def compute(self) -> float:
        return frechet_from_stats(self.reference, self.reconstructed)

    def protocol(self) -> dict[str, Any]:
        """PROTOCOL with the sha256 of the weights actually used and the number of videos on each side."""
        return PROTOCOL | {"weights_sha256": getattr(self.model, "weights_sha256", "unknown"),
                           "videos": {"reference": self.reference.count, "reconstructed": self.reconstructed.count}}


def rfvd(reference_videos: Sequence[np.ndarray], reconstructed_videos: Sequence[np.ndarray],
         model: InceptionI3d | None = None, weights: str | Path | None = None) -> float:
    """rFVD between two lists of (T, H, W, 3) uint8 videos (≥ 2 each; ≥ 401 for a full-rank covariance)."""
    accumulator = FVDAccumulator(model, weights)
    accumulator.update(reference_videos, reconstructed_videos)
    return accumulator.compute()
