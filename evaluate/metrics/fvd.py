"""rFVD: Fréchet distance between I3D features of reference and reconstructed videos, under a named preset.

Published rFVD numbers differ by up to ~10% between implementations (spec, evaluation protocols), so each
published protocol is a preset (PRESETS, data rather than code paths) and its protocol() goes with every number:

- `tokenbench` (the default), transcribed from NVlabs/TokenBench @dcbb7d5 token_bench/metrics_cli.py
  `main_fvd` and token_bench/fvd.py `preprocess_single`: each video's first ≤ 300 frames, /255 to float32,
  bilinear resize **without antialiasing** so the short side is 224 and the long side ceil(long · 224 / short),
  centre crop 224² at ((h − 224) // 2, (w − 224) // 2), (x − 0.5) · 2; the whole clip in one I3D pass.
- `stylegan-v`, from universome/stylegan-v src/metrics/metric_main.py `fvd2048_16f`,
  frechet_video_distance.py and metric_utils.py: 2048 clips per side of 16 consecutive frames, videos
  shorter than 16 frames discarded, uint8 frames handed to the detector with rescale=True, resize=True;
  covariance over N (FeatureStats.get_mean_cov), not N − 1.

Features from either preset are the 400 pre-softmax logits averaged over time (`return_features=True`; the
TF-Hub graph's RGB/inception_i3d/Mean:0). Our I3D port carries DeepMind's released weights, not the TF-Hub
weights of the references' torchscript (see i3d.py): pass `TorchscriptI3D` for numbers comparable with
published ones. Statistics are float64 running sums (FrechetStats): videos stream in batches, workers merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from atoken.evaluate.metrics.frechet import FrechetStats, frechet_distance
from atoken.evaluate.metrics.i3d import (
    I3D_SHA256,
    MIN_FRAMES,
    SOURCE,
    InceptionI3d,
    TorchscriptI3D,
    default_i3d_path,
    load_i3d,
)
from atoken.evaluate.metrics.i3d import features as i3d_features

SIZE = 224
FEATURE_DIM = 400
FEATURES = (f"{FEATURE_DIM}-d pre-softmax I3D logits averaged over time (detector return_features=True; the "
            "TF-Hub graph's RGB/inception_i3d/Mean:0, universome/fvd-comparison their_fvd.py)")


@dataclass(frozen=True)
class FVDPreset:
    """One published rFVD protocol. `resize`: "short-side-ceil-crop" (TokenBench) or "square" (StyleGAN-V)."""

    name: str
    reference: str  # repository @ commit and the files it was read from
    max_frames: int  # frames taken from the start of each video
    min_frames: int  # a shorter clip cannot be scored (too_short)
    short_reason: str  # why, with {frames} for the clip's frame count
    frames_rule: str
    resize: str
    resize_rule: str
    range_rule: str
    detector_input: str  # what the reference hands its torchscript: "preprocessed" float or raw "uint8"
    rescale: bool  # the torchscript's own flags, as the reference passes them
    resize_in_detector: bool
    clips_required: int | None  # per side; None: every video of the benchmark
    population_covariance: bool  # covariance over N (StyleGAN-V) rather than N − 1 (TokenBench)
    distance_rule: str
    unverified: str = ""  # what could not be read from the reference, said rather than guessed

    def protocol(self) -> dict[str, Any]:
        """Every field a result needs to be compared: for the protocol tags of each rFVD number."""
        out = {
            "metric": f"rFVD ({self.name} preset)",
            "preset": self.name,
            "reference": self.reference,
            "network": "Kinetics-400 RGB I3D, PyTorch port atoken.evaluate.metrics.i3d: DeepMind's released "
                       "weights, NOT the TF-Hub weights of the references' i3d_torchscript.pt",
            "weights": SOURCE,
            "weights_sha256": I3D_SHA256,
            "frames": self.frames_rule,
            "min_frames": self.min_frames,
            "resize": self.resize_rule,
            "range": self.range_rule,
            "features": FEATURES,
            "feature_dim": FEATURE_DIM,
            "detector_call": f"(B, 3, T, H, W) {self.detector_input}, rescale={self.rescale}, "
                             f"resize={self.resize_in_detector}, return_features=True",
            "clips_required": self.clips_required,
            "covariance": "population (÷ N)" if self.population_covariance else "unbiased (÷ N − 1)",
            "distance": self.distance_rule,
            "implementation": "atoken float64 running sums; Tr((Σ1Σ2)^½) from symmetric eigendecompositions",
        }
        return out | ({"unverified": self.unverified} if self.unverified else {})


PRESETS: dict[str, FVDPreset] = {
    "tokenbench": FVDPreset(
        name="tokenbench",
        reference="NVlabs/TokenBench @dcbb7d5: token_bench/metrics_cli.py (main_fvd), token_bench/fvd.py "
                  "(preprocess_single, StyleGANvFeatureExtractor, FVD)",
        max_frames=300,
        min_frames=MIN_FRAMES,
        short_reason=f"{{frames}} frames: I3D needs at least {MIN_FRAMES} frames (its 2×7×7 VALID pool after 8× "
                     "temporal striding); TokenBench itself has no check",
        frames_rule="first ≤ 300 frames of each video (read_video(...)[:max_n_frame], max_n_frame=300), the "
                    "whole clip in one I3D pass; one clip per video",
        resize="short-side-ceil-crop",
        resize_rule=f"uint8 / 255.0 (float64) → float32; F.interpolate bilinear, align_corners=False, no "
                    f"antialias, to (short {SIZE}, long ceil(long · {SIZE} / short)); centre crop {SIZE}×{SIZE} at "
                    f"((h − {SIZE}) // 2, (w − {SIZE}) // 2)",
        range_rule="[-1, 1] as (x − 0.5) · 2 of x in [0, 1]",
        detector_input="preprocessed float32 in [-1, 1]",
        rescale=False,
        resize_in_detector=False,
        clips_required=None,
        population_covariance=False,
        distance_rule="TokenBench: torchmetrics.image.fid._compute_fid (version unpinned) on float64 sums, "
                      "covariance ÷ (N − 1)",
    ),
    "stylegan-v": FVDPreset(
        name="stylegan-v",
        reference="universome/stylegan-v @1f630af: src/metrics/metric_main.py (fvd2048_16f), "
                  "src/metrics/frechet_video_distance.py, src/metrics/metric_utils.py, src/training/dataset.py",
        max_frames=16,
        min_frames=16,
        short_reason="{frames} frames: StyleGAN-V's rFVD scores 16-frame clips and discards shorter videos "
                     "(discard_short_videos=True)",
        frames_rule="16 consecutive frames from offset 0, subsample_factor 1; one clip per video (StyleGAN-V "
                    "draws a random offset for real videos and 0 for a generator-as-dataset: a reconstruction "
                    "pair needs one window, so 0 on both sides)",
        resize="square",
        resize_rule=f"reference: inside the detector (resize=True). Our port: whole frame to {SIZE}×{SIZE}, "
                    "uint8 / 255.0 → float32, F.interpolate bilinear, align_corners=False, no antialias, no crop",
        range_rule="reference: inside the detector (rescale=True). Our port: [-1, 1] as (x − 0.5) · 2 of x in "
                   "[0, 1] (= 2x/255 − 1, google-research frechet_video_distance.py preprocess)",
        detector_input="uint8",
        rescale=True,
        resize_in_detector=True,
        clips_required=2048,
        population_covariance=True,
        distance_rule="StyleGAN-V: float64 sums of float32 features, covariance ÷ N, scipy.linalg.sqrtm",
        unverified="what the torchscript's rescale=True / resize=True compute is in i3d_torchscript.pt, whose "
                   "code no readable source holds; StyleGAN-V says it matches the TF reference (bilinear to 224², "
                   "2x/255 − 1) 'up to the upsampling operation'. The port's square resize follows that "
                   "reference's shape, with PyTorch's half-pixel sampling",
    ),
}
DEFAULT_PRESET = "tokenbench"
PROTOCOL: dict[str, Any] = PRESETS[DEFAULT_PRESET].protocol()
MAX_FRAMES = PRESETS[DEFAULT_PRESET].max_frames


def get_preset(preset: str | FVDPreset) -> FVDPreset:
    if isinstance(preset, FVDPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown rFVD preset {preset!r}: one of {sorted(PRESETS)}")
    return PRESETS[preset]


def too_short(frames: int | np.ndarray, preset: str | FVDPreset = DEFAULT_PRESET) -> str | None:
    """Why a clip of `frames` frames (a count, or the (T, H, W, 3) clip) cannot be scored; None when it can."""
    preset = get_preset(preset)
    count = frames if isinstance(frames, int) else len(frames)
    return preset.short_reason.format(frames=count) if count < preset.min_frames else None


def resized_size(height: int, width: int, preset: str | FVDPreset = DEFAULT_PRESET) -> tuple[int, int]:
    """(h, w) the frames are resized to before the centre crop. TokenBench's float expression kept as is: its
    ceil can round up a product that is an integer in exact arithmetic, and we do what it does."""
    if get_preset(preset).resize == "square":
        return SIZE, SIZE
    scale = SIZE / min(height, width)
    if height < width:
        return SIZE, math.ceil(width * scale)
    return math.ceil(height * scale), SIZE


def check_video(video: np.ndarray) -> None:
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"rFVD takes (T, H, W, 3) uint8 videos, got {video.shape} {video.dtype}")


def preprocess(video: np.ndarray, preset: str | FVDPreset = DEFAULT_PRESET, chunk: int = 32) -> torch.Tensor:
    """(T, H, W, 3) uint8 → (T', 224, 224, 3) float32 in [-1, 1], T' = min(T, the preset's frames).

    Resized a chunk of frames at a time (a 300-frame 720p clip is 3 GB as float); bilinear works per frame and
    channel, so the values are those of TokenBench's one (C, T, H, W) call (tested value for value)."""
    preset = get_preset(preset)
    check_video(video)
    frames = torch.from_numpy(np.ascontiguousarray(video[: preset.max_frames]))  # (T', H, W, 3)
    size = resized_size(*frames.shape[1:3], preset)
    top, left = (size[0] - SIZE) // 2, (size[1] - SIZE) // 2
    out = torch.empty(frames.shape[0], SIZE, SIZE, 3)
    for start in range(0, frames.shape[0], chunk):
        # metrics_cli: torch.from_numpy(vid / 255.0).float(): the division in float64, then float32.
        x = (frames[start:start + chunk].permute(0, 3, 1, 2).double() / 255.0).float()  # (t, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (t, 3, h, w); antialias off
        x = x[:, :, top:top + SIZE, left:left + SIZE]  # (t, 3, 224, 224)
        out[start:start + chunk] = ((x - 0.5) * 2).permute(0, 2, 3, 1)  # (t, 224, 224, 3)
    return out


def detector_input(video: np.ndarray, preset: str | FVDPreset = DEFAULT_PRESET) -> torch.Tensor:
    """What the reference hands i3d_torchscript.pt for one video: (1, 3, T', H, W)."""
    preset = get_preset(preset)
    if preset.detector_input == "uint8":  # metric_utils: uint8 [batch, t, c, h, w] permuted to [batch, c, t, h, w]
        check_video(video)
        frames = torch.from_numpy(np.ascontiguousarray(video[: preset.max_frames]))  # (T', H, W, 3) uint8
        return frames.permute(3, 0, 1, 2)[None].contiguous()  # (1, 3, T', H, W)
    return preprocess(video, preset).permute(3, 0, 1, 2)[None].contiguous()  # (1, 3, T', 224, 224)


def video_features(model: InceptionI3d | TorchscriptI3D, videos: Sequence[np.ndarray],
                   preset: str | FVDPreset = DEFAULT_PRESET) -> np.ndarray:
    """Each (T, H, W, 3) uint8 video → its 400 I3D features: (N, 400) float64. Videos may differ in T and size;
    a clip too short for the preset raises ValueError with too_short's reason (callers skip it beforehand)."""
    preset = get_preset(preset)
    rows = []
    for video in tqdm(videos, desc=f"rFVD ({preset.name}): I3D", unit="video", leave=False, disable=None):
        check_video(video)
        if reason := too_short(len(video), preset):
            raise ValueError(reason)
        if isinstance(model, TorchscriptI3D):
            row = model(detector_input(video, preset), rescale=preset.rescale, resize=preset.resize_in_detector)
        else:
            row = i3d_features(model, preprocess(video, preset)[None])  # (1, 400)
        rows.append(row.double().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, FEATURE_DIM))


class FVDAccumulator:
    """Streaming rFVD: feed (reference, reconstructed) batches, merge accumulators across workers, compute once."""

    def __init__(self, model: InceptionI3d | TorchscriptI3D | None = None, weights: str | Path | None = None,
                 device: str | torch.device | None = None, preset: str | FVDPreset = DEFAULT_PRESET):
        self.model = model if model is not None else load_i3d(weights or default_i3d_path())
        if device is not None:
            self.model.to(device)
        self.preset = get_preset(preset)
        self.reference = FrechetStats(FEATURE_DIM)
        self.reconstructed = FrechetStats(FEATURE_DIM)

    def update(self, reference_videos: Sequence[np.ndarray], reconstructed_videos: Sequence[np.ndarray]) -> None:
        """Lists of (T, H, W, 3) uint8 videos; pairing is not required, but rFVD feeds pairs."""
        self.update_features(video_features(self.model, reference_videos, self.preset),
                             video_features(self.model, reconstructed_videos, self.preset))

    def update_features(self, reference_features: np.ndarray, reconstructed_features: np.ndarray) -> None:
        """(n, 400) I3D features from video_features, computed elsewhere (another worker, a cache)."""
        self.reference.update(reference_features)
        self.reconstructed.update(reconstructed_features)

    def merge(self, other: FVDAccumulator) -> FVDAccumulator:
        if other.preset != self.preset:
            raise ValueError(f"cannot merge rFVD statistics of presets {self.preset.name} and {other.preset.name}")
        self.reference = self.reference.merge(other.reference)
        self.reconstructed = self.reconstructed.merge(other.reconstructed)
        return self

    def moments(self, stats: FrechetStats) -> tuple[np.ndarray, np.ndarray]:
        mean, covariance = stats.mean_and_covariance()  # ÷ (N − 1)
        if self.preset.population_covariance:  # StyleGAN-V FeatureStats.get_mean_cov: raw_cov / N − μμᵀ
            covariance = covariance * (stats.count - 1) / stats.count
        return mean, covariance

    def compute(self) -> float:
        return frechet_distance(*self.moments(self.reference), *self.moments(self.reconstructed))

    def protocol(self) -> dict[str, Any]:
        """The preset's protocol with the network and weights actually used and the videos on each side."""
        out = self.preset.protocol() | {
            "weights_sha256": getattr(self.model, "weights_sha256", "unknown"),
            "videos": {"reference": self.reference.count, "reconstructed": self.reconstructed.count}}
        if isinstance(self.model, TorchscriptI3D):
            out |= {"network": "StyleGAN-V i3d_torchscript.pt (the references' detector)", "weights": self.model.path}
        if self.preset.clips_required is not None:
            out["meets_clips_required"] = min(self.reference.count, self.reconstructed.count) >= \
                self.preset.clips_required
        return out


def rfvd(reference_videos: Sequence[np.ndarray], reconstructed_videos: Sequence[np.ndarray],
         model: InceptionI3d | TorchscriptI3D | None = None, weights: str | Path | None = None,
         preset: str | FVDPreset = DEFAULT_PRESET) -> float:
    """rFVD between two lists of (T, H, W, 3) uint8 videos (≥ 2 each; ≥ 401 for a full-rank covariance)."""
    accumulator = FVDAccumulator(model, weights, preset=preset)
    accumulator.update(reference_videos, reconstructed_videos)
    return accumulator.compute()
