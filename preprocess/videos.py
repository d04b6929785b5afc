"""One video in, its clips out: decode with PyAV, resample to a frame rate, cut clips, resize, encode.

Frames are resized as images are (preprocess/images.py): square (`resolution`: short side, centre crop) or native
aspect (`max_resolution`: the long side capped, never upscaled, no crop), each side then even, as H.264's 4:2:0
chroma needs (npy clips follow the same rule, so a change of encoding changes nothing else).

A plain function (no Ray): preprocess/job.py maps it. Each clip keeps its timing (start, end, fps) and
its source, so a clip can always be traced back to the seconds of the video it came from.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from atoken.preprocess.images import ItemError, capped_size, resize_center_crop


@dataclass(frozen=True)
class ClipSettings:
    clip_frames: int = 16  # frames per clip (the tokenizer's temporal tile is 16)
    stride_frames: int = 16  # frames between clip starts, at the output rate (= clip_frames: no overlap)
    fps: float = 8.0  # output frame rate; frames are picked by timestamp, never interpolated
    resolution: int | None = 64  # square: short side resized to it, centre-cropped; None: native (max_resolution)
    max_clips: int = 8  # per video, from its start
    encoding: str = "mp4"  # mp4 (H.264) or npy (raw uint8 frames, lossless)
    max_pixels: int = 3840 * 2160
    max_resolution: int | None = None  # native aspect: the long side capped at it (resolution None)


@dataclass(frozen=True)
class ClipSample:
    key: str
    data: bytes
    extension: str  # "mp4" or "npy"
    meta: dict[str, Any]


def decode_frames(data: bytes | Path, fps: float, max_frames: int, max_pixels: int,
                  timeout_s: float | None = None) -> tuple[list[np.ndarray], dict]:
    """The frames nearest to each tick of `fps`, as (H, W, 3) uint8, and the source's properties. `data`: the
    video's bytes, or a local file (a large video, spooled: FFmpeg reads it from disk). Decoding that takes
    longer than `timeout_s` stops with an ItemError of stage "timeout" (checked between frames)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        container = av.open(str(data) if isinstance(data, Path) else io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds for bad bytes; all mean "not a video"
        raise ItemError(f"cannot open video: {type(exc).__name__}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ItemError("no video stream")
        stream = container.streams.video[0]
        if stream.width * stream.height > max_pixels:
            raise ItemError(f"{stream.width}x{stream.height} exceeds the {max_pixels}-pixel cap")
        source = {"source_fps": float(stream.average_rate or 0), "source_width": stream.width,
                  "source_height": stream.height, "codec": stream.codec_context.name}
        frames: list[np.ndarray] = []
        next_tick = 0.0
        try:
            for frame in container.decode(stream):
                if deadline is not None and time.monotonic() > deadline:
                    raise DecodeTimeout(f"decoding took longer than {timeout_s:.0f} s (videos.decode_timeout_s)")
                if frame.time is None:
                    continue
                if frame.time + 1e-6 >= next_tick:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    next_tick += 1.0 / fps
                    if len(frames) >= max_frames:
                        break
        except av.error.FFmpegError as exc:
            if not frames:
                raise ItemError(f"no decodable frames: {type(exc).__name__}: {exc}") from exc
            source["truncated"] = True  # a damaged tail: keep what decoded before it
    if not frames:
        raise ItemError("no decodable frames")
    return frames, source


class DecodeTimeout(ItemError):
    """Decoding ran past its time limit: perhaps a slow worker, so it is tried again on the next run."""

    stage = "timeout"


def clip_video(data: bytes | Path, key: str, settings: ClipSettings, timeout_s: float | None = None
               ) -> list[ClipSample]:
    """Cut a video (bytes or a local file) into clips of `clip_frames` frames at `fps`, resized (square or native
    aspect, see the module docstring)."""
    wanted = (settings.max_clips - 1) * settings.stride_frames + settings.clip_frames
    frames, source = decode_frames(data, settings.fps, wanted, settings.max_pixels, timeout_s)
    if len(frames) < settings.clip_frames:
        raise ItemError(f"only {len(frames)} frames at {settings.fps} fps, a clip needs {settings.clip_frames}")
    resize = frame_resizer(frames[0].shape[1], frames[0].shape[0], settings)
    clips = []
    for index, start in enumerate(range(0, len(frames) - settings.clip_frames + 1, settings.stride_frames)):
        if index >= settings.max_clips:
            break
        array = np.stack([np.asarray(resize(Image.fromarray(f))) for f in
                          frames[start:start + settings.clip_frames]])  # (T, H, W, 3) uint8
        payload = encode_clip(array, settings.fps) if settings.encoding == "mp4" else _npy(array)
        meta = {
            **source,
            "key": f"{key}_c{index:04d}",
            "source_key": key,
            "clip_index": index,
            "start_seconds": start / settings.fps,
            "end_seconds": (start + settings.clip_frames) / settings.fps,
            "fps": settings.fps,
            "frames": settings.clip_frames,
            "width": array.shape[2],
            "height": array.shape[1],
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        clips.append(ClipSample(meta["key"], payload, settings.encoding, meta))
    return clips


def frame_resizer(width: int, height: int, settings: ClipSettings) -> Callable[[Image.Image], Image.Image]:
    """The resize of every frame of a (width x height) video: square crop at `resolution`, or native aspect with
    the long side capped at `max_resolution` and both sides even (never upscaled; an odd side loses one pixel)."""
    if settings.resolution is not None:
        return lambda image: resize_center_crop(image, settings.resolution)
    size = capped_size(width, height, settings.max_resolution, "long", multiple=2)
    if size == (width, height):
        return lambda image: image
    if capped_size(width, height, settings.max_resolution, "long") == (width, height):
        # Within the cap: no resampling, only the odd row or column dropped (from the bottom and right).
        return lambda image: image.crop((0, 0, *size))
    return lambda image: image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


# x264 settings that make a clip's bytes a function of its frames alone (issue 15): x264's output depends on its
# thread count (1, 2 and 4 threads give three different streams at 128-256 px), and with MB-tree on it reads
# uninitialised memory at some sizes (the quickstart's 64 px, and 192 px): the same frames encoded twice in one
# process gave up to five different streams, decoding up to 22 grey levels apart, and MALLOC_PERTURB_ changed
# them. One thread also fits the job: every Ray task is granted one CPU. MB-tree off costs bytes, not quality:
# the quickstart's clips +20 % bytes at 64 px (34.9 → 35.4 dB PSNR), +5 % at 256 px (39.24 → 39.26 dB).
X264_PARAMS = "threads=1:mbtree=0"


def encode_clip(frames: np.ndarray, fps: float) -> bytes:
    """(T, H, W, 3) uint8 → an H.264 MP4 in memory (yuv420p, CRF 18: visually lossless, ~10x smaller); the same
    frames give the same bytes (X264_PARAMS)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "x264-params": X264_PARAMS}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_clip(data: bytes, extension: str) -> np.ndarray:
    """A clip's bytes → (T, H, W, 3) uint8."""
    if extension == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
