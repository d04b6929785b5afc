"""One video in, its clips out: decode with PyAV, resample to a frame rate, cut clips, resize, encode.

Frames are resized as images are (preprocess/images.py): square (`resolution`: short side, centre crop) or native
aspect (`max_resolution`: the long side capped, never upscaled, no crop), each side then even, as H.264's 4:2:0
chroma needs (npy clips follow the same rule, so a change of encoding changes nothing else).

A plain function (no Ray): preprocess/job.py maps it. Each clip keeps its timing (start, end, fps) and
its source, so a clip can always be traced back to the seconds of the video it came from. Under a time limit
(videos.decode_timeout_s) the work runs in a child process that is killed past it (ClipProcess, at the end).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
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


def decode_frames(data: bytes | Path, fps: float, max_frames: int, max_pixels: int
                  ) -> tuple[list[np.ndarray], dict]:
    """The frames nearest to each tick of `fps`, as (H, W, 3) uint8, and the source's properties. `data`: the
    video's bytes, or a local file (a large video, spooled: FFmpeg reads it from disk). Unbounded in time: a time
    limit is clip_video's `timeout_s`, which runs this in a process it can kill."""
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
    """A video's clips took longer than its time limit: perhaps a slow worker, so it is tried again on the next
    run."""

    stage = "timeout"


class ClipProcessCrash(ItemError):
    """The clip process died during a video (a crash inside FFmpeg, killed for memory): transient, as a crashed
    Blender is (a video that crashes it on every run is settled after writer.MAX_ATTEMPTS runs)."""

    stage = "crash"


def clip_video(data: bytes | Path, key: str, settings: ClipSettings, timeout_s: float | None = None
               ) -> list[ClipSample]:
    """Cut a video (bytes or a local file) into clips of `clip_frames` frames at `fps`, resized (square or native
    aspect, see the module docstring). `timeout_s`: a hard limit on the whole work (decode, clip, encode), which
    then runs in a clip process killed past it (DecodeTimeout); None: here, unbounded."""
    if timeout_s is None:
        return _clip_here(data, key, settings)
    with _clip_process() as process:
        return process.clip(data, key, settings, timeout_s)


def _clip_here(data: bytes | Path, key: str, settings: ClipSettings) -> list[ClipSample]:
    wanted = (settings.max_clips - 1) * settings.stride_frames + settings.clip_frames
    frames, source = decode_frames(data, settings.fps, wanted, settings.max_pixels)
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


# -- the clip process: a hard time limit --------------------------------------------------------------------
# A decode can stall inside one FFmpeg call (a demuxer that reads forever, av.open on a source that blocks), where
# no Python check runs and no exception can reach it: only ending its process ends it. So under a time limit a
# video's decode, clip and encode run in a child process, killed past the limit. It is started with subprocess
# (fork + exec: safe in a process with threads, as Ray workers are) rather than multiprocessing's spawn, which
# would re-import the parent's main module in it (Ray's default_worker, and Ray with it); it serves one video
# after another and is kept between them, so its start (imports: 0.15-0.19 s) is paid once per worker and after
# each kill, not per video; what a video then pays is its bytes and clips through two pipes, ~1 ms per MB of
# video (under 1.5 % of the work on the built-in clips: benchmarks/bench_decode_limits.py).

CLIP_PROCESS_START_S = 120.0  # for a fresh clip process to import av, numpy and PIL on a loaded node
_SERVE = "import sys; from atoken.preprocess.videos import serve_clips; serve_clips(*map(int, sys.argv[1:]))"


class ClipProcess:
    """A child process that makes one video's clips at a time (`clip`), killed when a video passes its limit."""

    def __init__(self) -> None:
        to_parent_read, to_parent_write = os.pipe()
        to_child_read, to_child_write = os.pipe()
        # sys.path travels as PYTHONPATH, as multiprocessing's spawn passes it: the child imports atoken from
        # where this process did (a checkout, a Ray runtime_env working_dir).
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        command = [sys.executable, "-c", _SERVE, str(to_child_read), str(to_parent_write), str(os.getpid())]
        self.process = subprocess.Popen(command, pass_fds=(to_child_read, to_parent_write), stdin=subprocess.DEVNULL,
                                        env=environment)
        os.close(to_child_read)
        os.close(to_parent_write)
        self.requests = Connection(to_child_write, readable=False)
        self.results = Connection(to_parent_read, writable=False)
        self.busy = False  # a video sent and its answer not read: the process is in an unknown state
        try:
            started = self.results.poll(CLIP_PROCESS_START_S) and self.results.recv() == "ready"
        except EOFError:
            started = False
        if not started:
            self.close()
            raise RuntimeError(f"the clip process did not start ({self._exit()}; its stderr says why)")

    def clip(self, data: bytes | Path, key: str, settings: ClipSettings, timeout_s: float) -> list[ClipSample]:
        """clip_video's work in the process, within `timeout_s` (counted from the send); past it the process is
        killed and the video fails with DecodeTimeout."""
        deadline = time.monotonic() + timeout_s
        self.busy = True
        try:
            self.requests.send((data, key, settings))
            if not self.results.poll(max(0.0, deadline - time.monotonic())):
                self.close()
                raise DecodeTimeout(f"decoding took longer than {timeout_s:g} s (videos.decode_timeout_s): its "
                                    "process was killed")
            outcome, value = self.results.recv()
        except (EOFError, OSError) as exc:  # the pipe closed under us: the process died
            self.close(grace_s=5.0)  # time to exit on its own, so its exit says how it died
            raise ClipProcessCrash(f"the clip process died during the video ({self._exit()})") from exc
        self.busy = False
        if outcome == "error":
            raise value
        return value

    def idle(self) -> bool:
        """Alive and waiting for a video: fit for the next one."""
        return not self.busy and self.process.poll() is None

    def close(self, grace_s: float = 0.0) -> None:
        """End the process (after `grace_s` for it to exit by itself: it does once its requests pipe closes) and
        reap it, so that nothing of it is left running."""
        self.requests.close()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.results.close()

    def _exit(self) -> str:
        code = self.process.poll()
        if code is None:
            return "still running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def serve_clips(requests_fd: int, results_fd: int, parent_pid: int) -> None:
    """The clip process's loop: (data, key, settings) in; ("clips", [ClipSample]) or ("error", exception) out;
    until the parent closes its end, or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes this
    _die_with(parent_pid)
    requests, results = Connection(requests_fd, writable=False), Connection(results_fd, readable=False)
    results.send("ready")
    while True:
        try:
            data, key, settings = requests.recv()
        except EOFError:
            return
        try:
            answer = ("clips", _clip_here(data, key, settings))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent, which records it
            answer = ("error", _picklable(exc))
        results.send(answer)


def _die_with(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux's PR_SET_PDEATHSIG), even stuck inside
    FFmpeg: a parent killed mid-video (Ray's force-cancel, the OOM killer) never closes its pipe, and this process
    would hang on for ever. (The signal comes when the parent's thread that started it ends: an idle one gone that
    way is replaced by the next video.) Elsewhere only an idle clip process ends with its parent (its pipe
    closes)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent died before the line above


def _picklable(exc: Exception) -> Exception:
    """`exc` if it crosses a pipe whole (ItemError and the built-in errors do), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception whose class pickles badly, however it fails
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# This process's idle clip processes: taken for a video, handed back after it unless it was killed.
_idle: list[ClipProcess] = []
_idle_lock = threading.Lock()


@contextlib.contextmanager
def _clip_process() -> Iterator[ClipProcess]:
    with _idle_lock:
        process = _idle.pop() if _idle else None
    if process is not None and not process.idle():  # died while idle (killed for memory)
        process.close()
        process = None
    process = process or ClipProcess()
    try:
        yield process
    finally:
        if process.idle():
            with _idle_lock:
                _idle.append(process)
        else:
            process.close()


@atexit.register
def _close_idle() -> None:
    while _idle:
        _idle.pop().close(grace_s=1.0)


def _forget_inherited() -> None:
    """In a forked copy of this process: the clip processes are the parent's. Drop them, closing only this
    copy's ends of their pipes (a clip process exits when its parent's ends close, not before)."""
    global _idle_lock
    for process in _idle:
        process.requests.close()
        process.results.close()
    _idle.clear()
    _idle_lock = threading.Lock()  # a lock another thread held at the fork stays held in the copy


os.register_at_fork(after_in_child=_forget_inherited)
