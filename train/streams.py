"""Data streams, not workers, define the data (train.stages[].data_streams).

A task reads `data_streams` independent streams of shards, each with its own position; a worker reads its
contiguous share of them and concatenates their batches into one micro-batch. Randomness (the posterior's
noise, the 3D task's held-out views) is drawn per stream from a generator seeded by (seed, task slot, stream,
step). So the global batch of a step, and everything drawn for it, is the same on 1 worker or N; with the
losses' global normalisation (`WorldShare`), N workers train to 1 worker's weights, and a checkpoint resumes
its data exactly on any world size that divides the streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from atoken.pipeline.storage import Storage
from atoken.train.loader import LoaderSettings, Prefetched, PreparedSamples, fitted, prepared_samples
from atoken.train.model.tokens import FramePack, PackedBatch

if TYPE_CHECKING:
    from atoken.train.tasks import TaskShards


@dataclass(frozen=True)
class StreamPart:
    """One data stream's share of a micro-batch: its samples and tokens sit contiguously, in stream order."""
    stream: int
    samples: int
    tokens: int


def batch_samples(batch) -> int:
    return batch.num_samples if isinstance(batch, PackedBatch | FramePack) else batch.samples


def batch_tokens(batch) -> int:
    if isinstance(batch, FramePack):
        return batch.token_count
    return batch.patches.shape[0] if isinstance(batch, PackedBatch) else batch.tokens


# -- the global batch ----------------------------------------------------------------------------------------

@dataclass
class WorldShare:
    """How this worker's micro-batch of a task relates to the step's global one (every worker's together).

    Loss terms are means over samples, tokens or pixel values. Each worker takes its local mean times
    `scale(kind)` = local count · world size / global count, so that the gradients DDP averages equal those of
    the global mean; one worker reading every stream gets scale 1. The understanding losses use every worker's
    captions as negatives (`captions`, their embeddings through `gather_rows`), as SigLIP gathers them."""
    captions: list[str]  # every worker's captions, in rank order
    local_captions: list[str]
    counts: dict[str, tuple[int, int]]  # kind → (this worker's, all workers')
    world_size: int = 1
    rank_samples: tuple[int, ...] = ()  # every worker's sample count (rows of gather_rows)

    def scale(self, kind: str) -> float:
        local, total = self.counts[kind]
        return local * self.world_size / total if total else 0.0

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """(S_local, D) rows of this worker's samples → (S_global, D), every worker's in rank order; no
        gradient flows back (the frozen text tower's embeddings)."""
        if self.world_size == 1:
            return local
        import torch.distributed as dist

        padded = local.new_zeros(max(self.rank_samples), *local.shape[1:])  # ranks' micro-batches differ in size
        padded[: local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([rows[:count] for rows, count in zip(gathered, self.rank_samples, strict=True)])


def world_share(captions: list[str], counts: dict[str, int], world_size: int, group=None) -> WorldShare:
    """One small collective of host objects per micro-batch when there are several workers (captions and
    counts; `group`: a gloo group, so that it never waits on the GPU)."""
    if world_size == 1:
        return WorldShare(list(captions), list(captions), {k: (v, v) for k, v in counts.items()}, 1,
                          (len(captions),))
    import torch.distributed as dist

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (list(captions), counts), group=group)
    every = [c for rank_captions, _ in gathered for c in rank_captions]
    totals = {kind: (counts[kind], sum(rank_counts[kind] for _, rank_counts in gathered)) for kind in counts}
    return WorldShare(every, list(captions), totals, world_size, tuple(len(c) for c, _ in gathered))


# -- per-stream draws ------------------------------------------------------------------------------------------

def part_seed(seed: int, slot: int, stream: int, step: int, purpose: int) -> int:
    """A generator seed for one stream's share of one task slot at one step: the same on any worker layout."""
    return int(np.random.SeedSequence([seed, slot, stream, step, purpose]).generate_state(1)[0])


class StreamNoise:
    """ε for the posterior draw: each stream's rows from its own generator (rows are tokens of a packed batch,
    or evenly split per image: tokens for the tokenizer on image batches, images for the convolutional models),
    so the draw is the one a worker reading that stream alone makes."""

    def __init__(self, parts: list[StreamPart], seeds: list[int]):
        self.parts, self.seeds = parts, seeds

    def __call__(self, mean: torch.Tensor) -> torch.Tensor:
        tokens, samples = sum(p.tokens for p in self.parts), sum(p.samples for p in self.parts)
        if mean.shape[0] == tokens:
            rows = [p.tokens for p in self.parts]
        elif mean.shape[0] % samples == 0:  # images of one size: the same rows per image
            rows = [p.samples * (mean.shape[0] // samples) for p in self.parts]
        else:
            raise ValueError(f"a posterior of {mean.shape[0]} rows fits neither {tokens} tokens nor {samples} samples")
        draws = [torch.randn((count, *mean.shape[1:]), generator=_generator(seed, mean.device), device=mean.device,
                             dtype=mean.dtype) for count, seed in zip(rows, self.seeds, strict=True)]
        return torch.cat(draws)  # like mean


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# -- the streams -------------------------------------------------------------------------------------------

def stream_key(task: str, stream: int) -> str:
    return f"{task}/{stream}"


def worker_streams(data_streams: int, rank: int, world_size: int) -> list[int]:
    """The contiguous streams a worker reads (rank order = stream order, so the global batch is the same)."""
    if data_streams % world_size:
        raise ValueError(f"{data_streams} data streams cannot be shared by {world_size} workers: set "
                         f"train.stages[].data_streams to a multiple of num_workers")
    per_worker = data_streams // world_size
    return list(range(rank * per_worker, (rank + 1) * per_worker))


def loader_settings(stage, device: torch.device) -> LoaderSettings:
    """The stage's loader; tensors pinned when they go to a GPU."""
    return LoaderSettings(stage.shard_interleave, stage.loader_workers, stage.loader_prefetch,
                          pin_memory=device.type == "cuda" and stage.loader_workers > 0)


def task_batches(task, shards: list, storage: Storage, seed: int, stream: int = 0, data_streams: int = 1,
                 position: int = 0, loader: LoaderSettings | None = None) -> Iterator[tuple[object, int]]:
    """One data stream's micro-batches of a task, from `position` on, each with the position after it."""
    loader = fitted(loader or LoaderSettings(), shards, data_streams)
    samples = PreparedSamples(shards, storage, seed, stream, data_streams, task.prepare, position, loader.interleave,
                              task.chunk_samples)
    batches = task.batches(prepared_samples(samples, loader), position)
    # With loader processes, the training thread only takes assembled micro-batches (0 processes: everything
    # stays in the training thread, as the tests' reference).
    return Prefetched(batches) if loader.workers else batches


class TaskStreams:
    """Every task's streams on this worker: `next(task)` gives one micro-batch (its streams' batches merged)
    and advances their positions, keyed `task/stream` (world-size independent)."""

    def __init__(self, tasks: dict[str, object], shards: TaskShards, storage: Storage, seed: int,
                 streams: list[int], data_streams: int, positions: dict[str, int],
                 loader: LoaderSettings | None = None):
        sources = {"image": shards.image, "video": shards.video, "3d": shards.objects}
        loader = loader or LoaderSettings()
        self.tasks, self.streams = tasks, streams
        self.positions = {stream_key(name, s): positions.get(stream_key(name, s), 0) for name in tasks for s in streams}
        self.iterators: dict[str, Iterator] = {}
        for offset, (name, task) in enumerate(tasks.items()):
            if not sources[name]:
                raise ValueError(f"the {name} task has no training shards (its ingest stage wrote none)")
            for stream in streams:
                key = stream_key(name, stream)
                # Distinct seeds per task: the same seed would walk two modalities' shards in lockstep.
                self.iterators[key] = task_batches(task, sources[name], storage, seed + 1000 * offset, stream,
                                                   data_streams, self.positions[key], loader)

    def close(self) -> None:
        """Stops the streams' batch threads and loader processes (garbage collection does it too)."""
        for iterator in self.iterators.values():
            if isinstance(iterator, Prefetched):
                iterator.close()

    def next(self, name: str) -> tuple[object, list[StreamPart]]:
        batches, parts = [], []
        for stream in self.streams:
            key = stream_key(name, stream)
            batch, self.positions[key] = next(self.iterators[key])
            batches.append(batch)
            parts.append(StreamPart(stream, batch_samples(batch), batch_tokens(batch)))
        merged = batches[0] if len(batches) == 1 else self.tasks[name].merge(batches)
        return merged, parts


