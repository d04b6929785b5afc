"""Metric cost per 1,000 images (or clips) on this machine's CPU cores, for each metric of the evaluation suite.

    OMP_NUM_THREADS=2 python benchmarks/bench_metrics.py --out benchmarks/results/metrics-cpu.json

Each metric runs on real photos (scikit-image's, resized to the quickstart's 64 px and to 256 px, the spec's
rFID size) against a perturbed copy, in batches of 32 as the suite calls it, after one warm-up call; the
time per item is the median of `--rounds` rounds, scaled to 1,000 items. One-off costs (loading a network,
the 2048-d Fréchet distance, embedding the class prompts) are reported apart: they do not grow with the
set. rFVD is per clip of 16 frames (I3D resizes every clip to 224 px, so the clip's own size barely matters).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = Path(importlib.util.find_spec("skimage").origin).parent / "data"


def photos(size: int, count: int) -> np.ndarray:
    files = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))
    images = [np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize((size, size))) for i in range(count)]
    return np.stack(images)  # (N, size, size, 3) uint8


def perturbed(images: np.ndarray, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 8, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def timed(function, rounds: int) -> float:
    function()  # warm-up: lazy inits, allocator
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def per_thousand(seconds: float, items: int) -> float:
    return round(seconds / items * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from atoken.evaluate.metrics import fid, psnr, ssim
    from atoken.evaluate.metrics.frechet import FrechetStats, frechet_from_stats
    from atoken.evaluate.metrics.fvd import video_features
    from atoken.evaluate.metrics.i3d import default_i3d_path, load_i3d
    from atoken.evaluate.metrics.lpips import PerceptualStandIn
    from atoken.evaluate.metrics.zero_shot import class_prompts, zero_shot_accuracy
    from atoken.evaluate.suite import perceptual_distances
    from atoken.preprocess.sources import FASHION_MNIST_CLASSES
    from atoken.train.model.text_encoder import TextEncoder

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, dict] = {}
    one_off: dict[str, float] = {}
    n = args.batch
    for size in (64, 256):
        reference = photos(size, n)
        output = perturbed(reference)
        pairs = list(zip(reference, output, strict=True))
        row: dict[str, float] = {}
        row["psnr"] = per_thousand(timed(lambda p=pairs: [psnr.psnr_uint8(a, b) for a, b in p], args.rounds), n)
        row["ssim"] = per_thousand(timed(lambda p=pairs: [ssim.ssim_uint8(a, b) for a, b in p], args.rounds), n)
        started = time.perf_counter()
        stand_in = PerceptualStandIn()
        one_off["perceptual_stand_in_load"] = round(time.perf_counter() - started, 3)
        with torch.no_grad():
            row["perceptual_stand_in"] = per_thousand(
                timed(lambda p=pairs, s=stand_in: perceptual_distances(s, p), args.rounds), n
            )
        started = time.perf_counter()
        inception = fid.InceptionFeatures()
        one_off["inception_load"] = round(time.perf_counter() - started, 3)
        row["rfid_features"] = per_thousand(timed(lambda r=reference, net=inception: net.features(r), args.rounds), n)
        results[f"{size}px"] = row

    rng = np.random.default_rng(0)
    a, b = FrechetStats(fid.FEATURE_DIM), FrechetStats(fid.FEATURE_DIM)
    a.update(rng.normal(size=(64, fid.FEATURE_DIM)))
    b.update(rng.normal(size=(64, fid.FEATURE_DIM)))
    one_off["frechet_distance_2048d"] = round(timed(lambda: frechet_from_stats(a, b), 1), 3)

    started = time.perf_counter()
    i3d = load_i3d(default_i3d_path())
    one_off["i3d_load"] = round(time.perf_counter() - started, 3)
    clips = [np.ascontiguousarray(np.stack([frame] * 16)) for frame in photos(64, args.clips)]  # (16, 64, 64, 3)
    with torch.no_grad():
        clip_seconds = timed(lambda: video_features(i3d, clips), args.rounds)
    results["rfvd_features_per_1k_clips"] = {"16 frames, 64 px": per_thousand(clip_seconds, args.clips)}

    started = time.perf_counter()
    text = TextEncoder.from_path()
    one_off["text_encoder_load"] = round(time.perf_counter() - started, 3)
    prompts = class_prompts(FASHION_MNIST_CLASSES)
    one_off["embed_10_class_prompts"] = round(timed(lambda: text(prompts), args.rounds), 4)
    classes = text(prompts)
    embeddings = torch.randn(1000, classes.shape[1])
    labels = rng.integers(0, 10, 1000)
    results["zero_shot_per_1k_images"] = {
        "classification given embeddings": round(
            timed(lambda: zero_shot_accuracy(embeddings, labels, classes), args.rounds), 4
        ),
        "note": "the tokenizer's pooled embeddings are the model's cost (its encoder), not the metric's",
    }

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    report = {
        "command": "OMP_NUM_THREADS=2 python benchmarks/bench_metrics.py --out benchmarks/results/metrics-cpu.json",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch threads {torch.get_num_threads()}, "
        "no GPU; shared with other jobs",
        # 1/5/15-minute load averages: above 2 on this 2-core machine, other jobs share the cores and every
        # number below is inflated by roughly load / 2.
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "commit": commit,
        "unit": "seconds per 1,000 images (pairs of reference + reconstruction), batches of "
        f"{args.batch}, median of {args.rounds} rounds",
        "per_1k_images": {k: v for k, v in results.items() if k.endswith("px")},
        "rfvd_per_1k_clips": results["rfvd_features_per_1k_clips"],
        "zero_shot": results["zero_shot_per_1k_images"],
        "one_off_seconds": one_off,
        "notes": [
            "rFID features are for one side; the suite extracts the reference and the reconstruction, so "
            "rFID costs twice the row's number per 1k pairs, plus the one-off Fréchet distance.",
            "rFVD: per clip, both sides likewise (2x).",
        ],
    }
    text_out = json.dumps(report, indent=2)
    print(text_out)
    if args.out:
        Path(args.out).write_text(text_out + "\n")


if __name__ == "__main__":
    main()
