"""The training loader: a data stream's samples decoded, resized and patchified off the training thread.

A data stream (train/streams.py) reads `interleave` shard streams at once and takes their samples in turn:
stream index k is sample k // interleave of shard stream k % interleave. Each shard stream is a `ShardStream`
(train/data.py) over its own shards, each streamed and shuffled a window at a time, so consecutive samples, and so every
micro-batch, come from `interleave` different shards (cross-shard mixing). A shuffle buffer would mix more, but
its contents would have to go into every checkpoint; the interleave's state is the stream position alone, so a
resumed run yields exactly the samples that would have followed.

The work on each sample (`prepare`: decode, the resolution draw, resize) runs in `workers` torch DataLoader
processes. Loader worker j reads and prepares shard streams j, j + workers, ... (`workers` divides `interleave`,
so no shard is read twice) and sends their samples in chunks of one shard stream; the training thread puts the
stream back together (stream index k is the next sample of shard stream k % interleave), so it yields the same
samples in the same order on 0 workers (in the training process) or any number that divides the interleave, and
only groups prepared samples into micro-batches (`group_samples`, `pack_samples`).

Why a DataLoader and not Ray Data's streaming iterator, measured (benchmarks/loader.py, the same preparation of
512-px JPEG crops on the same 2 cores): 799 samples/s here against Ray Data's 200, and 0.04 ms against 0.71 ms of
the training thread's time a sample (Ray Data moves every sample through its object store). And Ray Data's
iterator has no mid-epoch position to resume from; the Ray Train workers already own their data streams and their
exact positions (checkpointed per stream).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from atoken.pipeline.storage import Storage
from atoken.preprocess.images import resize_center_crop
from atoken.train.data import ShardInfo, ShardStream, image_member


@dataclass(frozen=True)
class LoaderSettings:
    interleave: int = 1  # shard streams a data stream takes samples from in turn (part of the data's definition)
    workers: int = 0  # loader processes per data stream and task; 0: prepare in the training process
    prefetch: int = 2  # chunks of prepared samples each loader process keeps ahead
    pin_memory: bool = False  # page-locked tensors, for copies to the GPU that do not block


def fitted(settings: LoaderSettings, shards: list[ShardInfo], data_streams: int) -> LoaderSettings:
    """The settings for a task's training shards: a small modality (a few 3D assets, a few hundred video shards
    beside millions of images) interleaves fewer shard streams, so that every shard stream has shards of its own
    where there are enough (else an equal block of the epoch, train/data.py) and at least one sample, with the
    most loader processes up to `workers` that divide its interleave. A function of the data, like the rest."""
    data_streams = max(1, data_streams)
    samples = sum(shard.samples for shard in shards)
    interleave = max(1, min(settings.interleave, samples // data_streams, max(1, len(shards) // data_streams)))
    workers = max((w for w in range(settings.workers + 1) if w == 0 or interleave % w == 0), default=0)
    return dataclasses.replace(settings, interleave=interleave, workers=workers)


def shard_stream_start(position: int, shard_stream: int, interleave: int) -> int:
    """The index, within shard stream `shard_stream`, of its first sample at stream index >= position."""
    first = position + (shard_stream - position) % interleave  # the first stream index >= position it serves
    return first // interleave


class PreparedSamples(IterableDataset):
    """One data stream's prepared samples from `position` on, as (stream index, prepared sample), forever.
    `prepare(sample, draw_key)`: draw_key = (seed, stream, stream index) seeds whatever it draws per sample."""

    def __init__(self, shards: list[ShardInfo], storage: Storage, seed: int, stream: int, data_streams: int,
                 prepare: Callable[[dict, int], Any], position: int, interleave: int = 1, chunk: int = 32):
        self.shards, self.storage, self.seed = shards, storage, seed
        self.stream, self.data_streams, self.interleave = stream, data_streams, interleave
        self.prepare, self.position, self.chunk = prepare, position, chunk
        self.shard_stream(0)  # a stream that cannot be fed says so here, not inside a loader process

    def shard_stream(self, index: int) -> ShardStream:
        # The streams' shard streams split the shards as data_streams x interleave ranks would, a data stream's
        # taking every data_streams-th rank: with fewer shards than ranks (equal contiguous blocks of the epoch,
        # train/data.py) its shard streams' blocks lie apart, in different shards.
        return ShardStream(self.shards, self.storage, self.seed, index * self.data_streams + self.stream,
                           self.data_streams * self.interleave)

    def __iter__(self) -> Iterator[tuple[int, list[Any]]]:
        """(shard stream, its next prepared samples) chunks, this loader worker's shard streams in turn."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = [index for index in range(self.interleave) if index % workers == worker]
        local = {index: shard_stream_start(self.position, index, self.interleave) for index in mine}
        samples = {index: self.shard_stream(index).samples(local[index]) for index in mine}
        while True:
            for index in mine:
                chunk = []
                for _ in range(self.chunk):
                    stream_index = local[index] * self.interleave + index
                    chunk.append(self.prepare(next(samples[index]), (self.seed, self.stream, stream_index)))
                    local[index] += 1
                yield index, one_storage(chunk)


def one_storage(chunk: list[Any]) -> list[Any]:
    """The chunk's frames as views of one tensor: it crosses to the training process as one shared-memory block
    instead of one per sample (each costs the receiver a file descriptor and a mapping)."""
    frames = [getattr(item, "frames", None) for item in chunk]
    if any(f is None for f in frames):
        return chunk
    flat = torch.cat([f.reshape(-1) for f in frames])  # (sum of numel,) uint8
    offset = 0
    for item, f in zip(chunk, frames, strict=True):
        item.frames = flat[offset:offset + f.numel()].view(f.shape)  # (T, 3, H, W), contiguous
        offset += f.numel()
    return chunk


# Samples cross from a loader process in chunks of one shard stream: one message per sample cost the training
# thread 0.35 ms a sample (measured, benchmarks/loader.py), 45% of it at base's projected H100 rate on 512-px
# images; chunks of 32 whose frames share one storage cost it 0.03-0.05 ms. Every chunk of a task holds the same
# number of samples (the task's `chunk_samples`: 32 images, 1 clip or 3D asset), so each round of chunks gives
# every shard stream as many samples as the training thread takes from it, and the buffers stay within a round.


def prepared_samples(dataset: PreparedSamples, settings: LoaderSettings) -> Iterator[tuple[int, Any]]:
    """The dataset's samples in stream order, prepared in `settings.workers` processes (or here, with 0): stream
    index k is the next sample of shard stream k % interleave, whichever process prepared it, so the order does
    not depend on the number of processes or on how their chunks were cut."""
    if settings.workers and dataset.interleave % settings.workers:
        raise ValueError(f"{settings.workers} loader workers cannot share {dataset.interleave} interleaved shard "
                         "streams: loader_workers must divide shard_interleave")
    if settings.workers == 0:
        chunks: Iterator[tuple[int, list[Any]]] = iter(dataset)
    else:
        # forkserver, not fork: the Ray Train worker that owns this loader runs threads (Ray's, gloo's), and a
        # fork copies whatever locks they hold. Workers take turns (DataLoader's order) and each takes its shard
        # streams in turn, with equal chunks, so no shard stream's buffer here holds more than about two.
        chunks = iter(DataLoader(dataset, batch_size=None, num_workers=settings.workers,
                                 prefetch_factor=settings.prefetch, pin_memory=settings.pin_memory,
                                 multiprocessing_context="forkserver"))
    buffers: dict[int, collections.deque] = {index: collections.deque() for index in range(dataset.interleave)}
    stream_index = dataset.position
    while True:
        buffer = buffers[stream_index % dataset.interleave]
        while not buffer:
            index, chunk = next(chunks)
            buffers[index].extend(chunk)
        yield stream_index, buffer.popleft()
        stream_index += 1


class Prefetched:
    """A task's micro-batches assembled ahead of the training thread, `depth` of them, in a thread of the training
    process: putting the loader processes' chunks back in stream order and packing them into micro-batches then
    overlaps the step instead of preceding it. The batches and their positions are those of the source, in its
    order (one producer, a FIFO): resume is unchanged. An error of the source is raised by the `next` that would
    have returned the batch it stopped. The thread stops, and closes the source (shutting its loader processes
    down), on `close`, or when this object is garbage-collected: the thread holds the source, never this object.

    Why (benchmarks/loader.py, base on an H100 stand-in): the waits left at [64, 512], 2.3-2.5% of step time at a
    third of the loader processes' capacity, were the training thread assembling its own micro-batches; with them
    assembled here it waits 1.1-1.3%. At [64, 256], where the loader runs near capacity, 2 batches ahead waited
    2.1-2.6% and 4 ahead 0.8-1.4% (a micro-batch of 4,096 image tokens is ~3 MB of uint8 frames)."""

    def __init__(self, source: Iterator, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_fill, args=(source, self._queue, self._stop), daemon=True,
                                        name="atoken-batch-prefetch")
        self._thread.start()

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._queue.put((kind, value))  # every later `next` ends or raises the same way
        if kind == "end":
            raise StopIteration
        raise value

    def close(self) -> None:
        self._stop.set()  # a put waiting on a full queue sees it within 0.1 s and ends the thread
        if threading.current_thread() is not self._thread:  # __del__ may run on it (a cycle collected there)
            self._thread.join()

    def __del__(self) -> None:
        self.close()


def _fill(source: Iterator, slots: queue.Queue, stop: threading.Event) -> None:
    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not put(("item", item)) or stop.is_set():
                return
        put(("end", None))
    except Exception as exc:  # noqa: BLE001 - raised again in the training thread, by its next `next`
        put(("error", exc))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def group_samples(samples: Iterator[tuple[int, Any]], count: int, position: int
                  ) -> Iterator[tuple[list[Any], int]]:
    """Groups of `count` prepared samples, each with the stream position after it."""
    while True:
        group = [next(samples)[1] for _ in range(count)]
        position += count
        yield group, position


def pack_samples(samples: Iterator[tuple[int, Any]], max_tokens: int, position: int,
                 tokens_of: Callable[[Any], int], key_of: Callable[[Any], str]) -> Iterator[tuple[list[Any], int]]:
    """Prepared samples packed greedily, in stream order, into groups of at most `max_tokens` tokens (no padding
    to the largest sample). Yields (group, position after it): resuming from that position yields exactly the
    groups that would have followed."""
    pending: list[Any] = []
    tokens = 0
    for _, item in samples:
        count = tokens_of(item)
        if count > max_tokens:
            raise ValueError(f"sample {key_of(item)} has {count} tokens, more than the {max_tokens}-token budget: "
                             "raise the budget or lower the resolution")
        if tokens + count > max_tokens:
            position += len(pending)
            yield pending, position
            pending, tokens = [], 0
        pending.append(item)
        tokens += count


# -- the resolution schedule -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolutionSchedule:
    """A stage's image (or frame) size per sample (spec, Table 2: e.g. stage 1 at 64→512 px).

    `low == high`: every sample square at that size (short side resized, centre-cropped), as batches of one size
    need. `low < high`: the long side drawn uniformly in [low, high] per sample, a fixed function of (seed,
    stream, stream index) (`keyed_draw`), so a resumed run draws the same; aspect kept, never upscaled past the sample's
    own size, both sides rounded to multiples of the patch. None (no schedule): the sample's own size."""
    low: int
    high: int
    patch: int = 16

    @classmethod
    def of(cls, value: int | list[int] | None, patch: int = 16) -> ResolutionSchedule | None:
        if value is None:
            return None
        low, high = (value, value) if isinstance(value, int) else value
        return cls(int(low), int(high), patch)

    @property
    def square(self) -> bool:
        return self.low == self.high

    def size(self, width: int, height: int, draw_key: tuple[int, int, int]) -> tuple[int, int]:
        """(width, height) for a sample of that size; draw_key: (seed, stream, stream index)."""
        if self.square:
            return self.low, self.low
        drawn = self.low + keyed_draw(*draw_key) % (self.high - self.low + 1)
        scale = min(drawn, max(width, height)) / max(width, height)
        return self._side(width, scale), self._side(height, scale)

    def _side(self, side: int, scale: float) -> int:
        """side * scale rounded to the patch, never past the source side (rounding up would upscale)."""
        return max(self.patch, min(round(side * scale / self.patch), side // self.patch) * self.patch)


MASK64 = 2**64 - 1


def keyed_draw(*key: int) -> int:
    """A 64-bit integer that is a fixed function of `key` (splitmix64's finaliser, folded over the key): the
    per-sample draws of the schedule. A numpy Generator seeded per sample cost 60 us of the loader's ~1.4 ms per
    256-px JPEG (benchmarks/loader.py); this costs ~2 us."""
    state = 0x9E3779B97F4A7C15
    for part in key:
        state = (state ^ (int(part) & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & MASK64
        state ^= state >> 31
    return state


def scheduled_image(sample: dict, schedule: ResolutionSchedule | None, draw_key: tuple[int, int, int]
                    ) -> torch.Tensor:
    """An image sample → (3, H, W) uint8 at the schedule's size for this draw."""
    member = image_member(sample)
    if member is None:
        raise ValueError(f"sample {sample.get('__key__')} holds no image")
    image = Image.open(io.BytesIO(sample[member]))
    if schedule is not None:
        width, height = schedule.size(*image.size, draw_key)
        if schedule.square:
            image = resize_center_crop(image.convert("RGB"), width)
        elif (width, height) != image.size:
            image.draft("RGB", (width, height))  # JPEG: decode at the smallest DCT scale still >= the target
            # Bicubic, as ingest and the evaluation protocols resize images, so the model is trained on the
            # downsampling it is scored on (antialiased bilinear would save 0.15 of the ~1.3 ms a 256-px draw costs).
            image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if image.mode != "RGB":  # convert() of an RGB image copies it
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W)


def scheduled_frames(sample: dict, schedule: ResolutionSchedule | None, draw_key: tuple[int, int, int]
                     ) -> torch.Tensor:
    """A clip (mp4 or npy) or image sample → (T, 3, H, W) uint8 at the schedule's size for this draw."""
    if image_member(sample) is not None:
        return scheduled_image(sample, schedule, draw_key)[None]
    from atoken.preprocess.videos import decode_clip

    extension = "mp4" if "mp4" in sample else "npy"
    frames = torch.from_numpy(decode_clip(sample[extension], extension)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    if schedule is None:
        return frames
    width, height = schedule.size(frames.shape[3], frames.shape[2], draw_key)
    return resize_frames(frames, width, height, schedule.square)


def resize_frames(frames: torch.Tensor, width: int, height: int, square: bool) -> torch.Tensor:
    """(T, 3, H, W) uint8 → (T, 3, height, width) uint8: antialiased bilinear; `square`: short side to the size,
    then centre-cropped (the batch path's one size)."""
    _, _, source_height, source_width = frames.shape
    if square:
        scale = width / min(source_height, source_width)
        scaled = (max(width, round(source_height * scale)), max(width, round(source_width * scale)))
    else:
        scaled = (height, width)
    if scaled != (source_height, source_width):
        frames = torch.nn.functional.interpolate(frames.float(), size=scaled, mode="bilinear", antialias=True,
                                                 align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    top, left = (frames.shape[2] - height) // 2, (frames.shape[3] - width) // 2
    return frames[:, :, top:top + height, left:left + width]  # (T, 3, height, width)
