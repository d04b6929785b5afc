"""Video PSNR, SSIM and LPIPS in TokenBench's conventions: one number per video, then a mean over videos.

Transcribed from NVlabs/TokenBench @dcbb7d5 token_bench/metrics_cli.py (`PSNR`, `SSIM`, `LPIPS`,
`main_psnr_ssim`, `main_lpips`); each video read with mediapy.read_video as (T, H, W, 3) uint8:

- PSNR: **one MSE over the whole video** (all frames, pixels, channels), then 20·log10(255 / (√MSE + ε)),
  ε = float32 eps: a perfect video gives 186.6 dB (psnr.PSNR_CAP). Not a mean of per-frame PSNRs, which
  weighs an easy frame's 50 dB like a hard frame's 25 dB and is higher on any video whose error varies.
- SSIM: skimage.metrics.structural_similarity per frame on float32 frames (the read is cast with
  .astype(np.float32) since TokenBench commit 9795ebc), data_range=255, channel_axis=-1, default 7×7 uniform
  window; mean over frames.
- LPIPS: lpips.LPIPS(net="vgg") per frame on 2 · (x / 255 − 0.5) as float32, mean over frames.

Each function takes two (T, H, W, 3) uint8 videos and returns that video's number; the suite averages videos.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from atoken.evaluate.metrics.psnr import EPS, PSNR_CAP, psnr_from_mse, squared_error_sum

PSNR_PROTOCOL = (f"video PSNR (TokenBench metrics_cli.PSNR): one MSE over all frames, pixels and channels of the uint8 "
                 f"video, 20·log10(255 / (√MSE + ε)), ε = float32 eps {EPS:.8g} (identical videos: "
                 f"{PSNR_CAP:.2f} dB); exact integer MSE; mean over videos")
SSIM_PROTOCOL = ("video SSIM (TokenBench metrics_cli.SSIM): skimage structural_similarity per frame on float32 frames, "
                 "data_range=255, channel_axis=-1, 7×7 uniform window; mean over frames, then over videos")
LPIPS_PROTOCOL = ("video LPIPS (TokenBench metrics_cli.LPIPS): LPIPS per frame on 2·(x/255 − 0.5) float32, "
                  "mean over frames, then over videos; the network's own protocol says which LPIPS")
PROTOCOLS = {"psnr": PSNR_PROTOCOL, "ssim": SSIM_PROTOCOL, "lpips": LPIPS_PROTOCOL}


def check_pair(reference: np.ndarray, reconstruction: np.ndarray) -> None:
    if reference.shape != reconstruction.shape or reference.ndim != 4 or reference.shape[-1] != 3:
        raise ValueError(f"video metrics take two (T, H, W, 3) videos of one shape, got {reference.shape} "
                         f"and {reconstruction.shape}")
    if reference.dtype != np.uint8 or reconstruction.dtype != np.uint8:
        raise ValueError("video metrics take uint8 videos")


def video_psnr(reference: np.ndarray, reconstruction: np.ndarray, chunk: int = 16) -> float:
    """(T, H, W, 3) uint8 each → PSNR of the video from its one MSE; summed a chunk of frames at a time."""
    check_pair(reference, reconstruction)
    total = sum(squared_error_sum(reference[start:start + chunk], reconstruction[start:start + chunk])
                for start in range(0, len(reference), chunk))
    return psnr_from_mse(total / reference.size)


def video_ssim(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """(T, H, W, 3) uint8 each → the mean over frames of each frame's SSIM, computed in float32 as TokenBench."""
    check_pair(reference, reconstruction)
    scores = [structural_similarity(a.astype(np.float32), b.astype(np.float32), data_range=255.0, channel_axis=-1)
              for a, b in zip(reference, reconstruction, strict=True)]
    return float(np.mean(scores))


def lpips_input(frames: np.ndarray) -> torch.Tensor:
    """(t, H, W, 3) uint8 → (t, 3, H, W) float32 as TokenBench builds it: 2 · (x / 255 − 0.5) in float64, cast."""
    return torch.from_numpy(2 * (frames / 255.0 - 0.5)).to(torch.float32).permute(0, 3, 1, 2)


@torch.no_grad()
def video_lpips(reference: np.ndarray, reconstruction: np.ndarray, network: torch.nn.Module, chunk: int = 8) -> float:
    """(T, H, W, 3) uint8 each → the mean over frames of LPIPS; `network(x, y)` on (B, 3, H, W) in [-1, 1] → (B,)
    (lpips.LPIPS, or the declared PerceptualStandIn). Frames go through in chunks: one value per frame either way."""
    check_pair(reference, reconstruction)
    device = next(network.parameters(), torch.empty(0)).device
    values: list[float] = []
    for start in range(0, len(reference), chunk):
        x = lpips_input(reference[start:start + chunk]).to(device)  # (t, 3, H, W)
        y = lpips_input(reconstruction[start:start + chunk]).to(device)  # (t, 3, H, W)
        values += network(x, y).reshape(-1).tolist()  # (t,)
    return float(np.mean(values))
