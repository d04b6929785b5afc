"""Streaming training samples from WebDataset shards in storage, with an exact resume position.

The stream is an endless sequence of epochs. Epoch e visits this rank's shards in an order drawn
from (seed, e). A shard is read as a stream, one shuffle window at a time: its samples, in the order
ingest wrote them (by key hash, so a window already mixes the data set's folders and classes), are cut
into consecutive windows of at most SHUFFLE_WINDOW_SAMPLES samples or SHUFFLE_WINDOW_BYTES bytes, and
each window's samples are taken in an order drawn from (seed, e, shard). A shard stream holds one window,
never the whole shard (a base shard of 1000 1024-px JPEGs is ~250 MB; 8 interleaved shard streams per
data stream held 2 GB). Because shard sizes are known from the manifest, a position (samples consumed so
far) maps straight to (epoch, shard, offset): a resumed run skips finished shards without reading them
and sees exactly the samples it would have seen; a shard whose samples fit one window is taken in the
same order as when shards were read whole.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from atoken.pipeline.storage import Storage, StorageError, register_webdataset_opener


@dataclass(frozen=True)
class ShardInfo:
    uri: str
    samples: int


def _every_shard(urls):
    return urls


# A shuffle window: what a shard stream holds at once. Bytes bound it for large samples (clips, 3D assets),
# samples for small ones; both are facts of the shard's bytes, so the windows, and the order, are the same on
# every read and every resume.
SHUFFLE_WINDOW_SAMPLES = 1024
SHUFFLE_WINDOW_BYTES = 64 * 2**20


def shard_samples(storage: Storage, uri: str, attempts: int = 3, expected: int | None = None) -> Iterator[dict]:
    """One shard's samples in order, streamed: one sample held at a time. A read that fails (the storage reader
    has already resumed cut bodies by byte range) is opened again and the samples already yielded are passed
    over, up to `attempts` tries in a row that bring no new sample. A tar cut inside a member raises; one cut at a
    member's boundary reads as a shorter archive, which `expected` (the manifest's count) catches at its end."""
    register_webdataset_opener(storage)
    done, failures = 0, 0  # samples yielded; tries in a row without a new sample
    while True:
        try:
            # One named shard: the stream already chose it for this rank, so webdataset must not split the
            # (one-element) shard list again across torch.distributed ranks or loader workers.
            dataset = wds.WebDataset(uri, shardshuffle=False, empty_check=False, nodesplitter=_every_shard,
                                     workersplitter=_every_shard)
            for sample in itertools.islice(dataset, done, None):
                failures = 0
                done += 1
                yield sample
            if expected is not None and done != expected:
                raise StorageError(f"{uri}: {done} samples, the manifest says {expected}")
            return
        except (OSError, StorageError, ValueError, tarfile.TarError) as exc:  # TarError: a truncated tar
            failures += 1
            if failures == attempts:
                # webdataset appends its stream and URL to the exception's args: the first is the message.
                reason = exc.args[0] if exc.args else exc
                raise StorageError(f"cannot read shard {uri} after {attempts} attempts: {reason}") from exc
            time.sleep(0.5 * failures)


def read_shard(storage: Storage, uri: str, attempts: int = 3) -> list[dict]:
    """Every sample of one shard, in order (a shard's worth in memory: for a few samples, not for training)."""
    return list(shard_samples(storage, uri, attempts=attempts))


def sample_bytes(sample: dict) -> int:
    return sum(len(value) for value in sample.values() if isinstance(value, bytes))


def shuffle_windows(samples: Iterator[dict], expected: int, uri: str, first: int, last: int,
                    rng: np.random.Generator) -> Iterator[dict]:
    """Samples `first` to `last` (exclusive) of a shard in shuffle-window order, from its samples in order. Every
    window from the shard's start is read and draws its order from `rng`, those before `first`'s too (one window
    held at a time), so a window's order does not depend on where reading began. Where it reads to the shard's
    end, checks that the shard holds the `expected` samples the manifest says."""
    start = 0  # the shard index of the window's first sample
    while start < last:
        window: list[dict] = []
        held = 0
        full = False
        for sample in samples:
            window.append(sample)
            held += sample_bytes(sample)
            full = len(window) == SHUFFLE_WINDOW_SAMPLES or held >= SHUFFLE_WINDOW_BYTES
            if full:
                break
        end = start + len(window)
        if not full and end < expected:  # the shard ended inside the window
            raise StorageError(f"{uri}: {end} samples, the manifest says {expected}")
        if end > expected or (end == expected and next(samples, None) is not None):
            raise StorageError(f"{uri}: more samples than the {expected} the manifest says")
        order = rng.permutation(len(window))
        for index in range(max(first, start), min(last, end)):
            yield window[order[index - start]]
        start = end


def caption_of(sample: dict) -> str:
    """The sample's caption (class name, file name or the user's caption column); its key when it has none."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return meta.get("caption") or sample["__key__"]


def decode_media(sample: dict) -> torch.Tensor:
    """An image sample → (1, 3, H, W); a clip sample (mp4 or npy) → (T, 3, H, W); values in [-1, 1]."""
    if image_member(sample) is not None:
        return decode_image(sample)[None]
    from atoken.preprocess.videos import decode_clip

    extension = "mp4" if "mp4" in sample else "npy"
    frames = torch.from_numpy(decode_clip(sample[extension], extension)).float()  # (T, H, W, 3)
    return frames.permute(0, 3, 1, 2) / 127.5 - 1.0  # (T, 3, H, W)


# The image encodings a shard may hold (ingest.encoding: png lossless; jpg or webp at a stated quality).
IMAGE_MEMBERS = ("png", "jpg", "webp")


def image_member(sample: dict) -> str | None:
    """The extension of the sample's image, or None for a clip or a 3D asset."""
    return next((extension for extension in IMAGE_MEMBERS if extension in sample), None)


def decode_image(sample: dict) -> torch.Tensor:
    """PNG, JPEG or WebP bytes → (3, H, W) float in [-1, 1]."""
    member = image_member(sample)
    if member is None:
        raise ValueError(f"sample {sample.get('__key__')} holds no image ({', '.join(IMAGE_MEMBERS)})")
    array = np.asarray(Image.open(io.BytesIO(sample[member])).convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


class ShardStream:
    """One rank's endless sample stream. With at least as many shards as ranks, each rank reads its own shards;
    with fewer (a small data set, or a split whose hashed parts left some empty), each rank takes an equal
    contiguous block of the epoch's samples across the shards, so the ranks still see disjoint samples of equal
    count and read only the shards their blocks span."""

    def __init__(self, shards: list[ShardInfo], storage: Storage, seed: int, rank: int = 0, world_size: int = 1):
        self.shards = shards
        self.storage = storage
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.split_by_shard = len(shards) >= world_size
        if not self.split_by_shard and sum(s.samples for s in shards) < world_size:
            raise ValueError(f"{sum(s.samples for s in shards)} training samples cannot feed {world_size} data streams "
                             "(data_streams x shard_interleave): ingest more, or lower them")

    def _epoch_shards(self, epoch: int) -> list[ShardInfo]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        if not self.split_by_shard:
            return [self.shards[i] for i in order]
        # Every rank takes the same number of shards so no worker waits on another at an epoch's end.
        per_rank = len(self.shards) // self.world_size
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [self.shards[i] for i in mine]

    def samples(self, position: int = 0) -> Iterator[dict]:
        """Samples from `position` on (0 = the start of epoch 0), forever."""
        # This rank's k-th sample of an epoch is sample first + k of the epoch's shards in order: with shards to
        # spare, of its own shards (first = 0); with fewer shards than ranks, of every shard, in an equal contiguous
        # block per rank, so that a rank reads the one or two shards its block spans, not all of them (512 streams
        # over 150 video shards would otherwise read each shard 512 times an epoch).
        epoch = 0
        while True:
            shards = self._epoch_shards(epoch)
            total = sum(s.samples for s in shards)
            epoch_size = total if self.split_by_shard else total // self.world_size
            if epoch_size == 0:
                raise ValueError("the training shards hold no samples")
            if position >= epoch_size:
                position -= epoch_size
                epoch += 1
                continue
            first = 0 if self.split_by_shard else self.rank * epoch_size
            start, end = first + position, first + epoch_size  # this rank's, of the epoch's
            base = 0  # the epoch index of the shard's first sample
            for index, shard in enumerate(shards):
                shard_end = base + shard.samples
                if shard_end <= start or base >= end:  # finished, or past this rank's share: not read
                    base = shard_end
                    continue
                reader = shard_samples(self.storage, shard.uri)
                try:
                    yield from shuffle_windows(reader, shard.samples, shard.uri, max(start, base) - base,
                                               min(shard_end, end) - base,
                                               np.random.default_rng([self.seed, epoch, index]))
                finally:
                    reader.close()  # the shard's open read, when this rank's share ends inside it
                base = shard_end
            position = 0
            epoch += 1
