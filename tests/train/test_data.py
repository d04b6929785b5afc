"""train/data.py: the sample stream, its exact resume position and its split across ranks."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from atoken.pipeline.config import LossSection, TrainStageSection
from atoken.pipeline.storage import Storage, StorageError
from atoken.train.data import ShardInfo, ShardStream, decode_image, read_shard
from atoken.train.streams import task_batches
from atoken.train.tasks import ImageTask

SIZE = 8


def png(value: int) -> bytes:
    pixels = np.full((SIZE, SIZE, 3), value, np.uint8)
    pixels[0, 0] = (0, 128, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, sizes: list[int]) -> list[ShardInfo]:
    folder.mkdir(parents=True, exist_ok=True)
    shards, counter = [], 0
    for index, size in enumerate(sizes):
        path = folder / f"train-{index:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(size):
                sink.write({"__key__": f"s{counter:04d}", "png": png(counter % 256), "json": b"{}"})
                counter += 1
        shards.append(ShardInfo(str(path), size))
    return shards


def keys(stream, count: int) -> list[str]:
    return [sample["__key__"] for sample in itertools.islice(stream, count)]


@pytest.fixture
def shards(tmp_path) -> list[ShardInfo]:
    return write_shards(tmp_path / "shards", [5, 3, 4])  # 12 samples an epoch


def test_read_shard_returns_every_sample_in_order(shards):
    samples = read_shard(Storage(), shards[0].uri)
    assert [s["__key__"] for s in samples] == ["s0000", "s0001", "s0002", "s0003", "s0004"]
    assert all(set(s) >= {"__key__", "png", "json"} for s in samples)


def test_a_truncated_shard_raises_storage_error_and_never_ends_early(shards, tmp_path):
    whole = Path(shards[0].uri).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:len(whole) // 2 + 100])  # inside a member
    with pytest.raises(StorageError, match="cannot read shard .*cut.tar after 1 attempts"):
        read_shard(Storage(), str(cut), attempts=1)
    assert len(read_shard(Storage(), shards[0].uri)) == 5, "the control: the whole file reads"


def test_a_shard_cut_at_a_member_boundary_is_caught_by_the_manifest_count(shards, tmp_path):
    """A tar cut between members reads as a shorter archive (tarfile sees its end): the count catches it, in the
    evaluation's reader as in the training stream."""
    import tarfile

    from atoken.train.data import shard_samples

    with tarfile.open(shards[0].uri) as tar:
        fourth = [m for m in tar.getmembers() if m.name.startswith("s0003")][0].offset  # sample 4's first header
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(shards[0].uri).read_bytes()[:fourth])
    assert len(read_shard(Storage(), str(cut))) == 3, "the reader alone takes it for a 3-sample shard"
    with pytest.raises(StorageError, match="cut.tar: 3 samples, the manifest says 5"):
        list(shard_samples(Storage(), str(cut), expected=5))
    with pytest.raises(StorageError, match="cut.tar: 3 samples, the manifest says 5"):
        keys(ShardStream([ShardInfo(str(cut), 5)], Storage(), seed=0).samples(), 5)
    assert len(list(shard_samples(Storage(), shards[0].uri, expected=5))) == 5, "the control: the whole file"


def test_read_shard_of_a_missing_file_raises_storage_error(tmp_path):
    with pytest.raises(StorageError, match="cannot read shard .*missing.tar after 1 attempts"):
        read_shard(Storage(), str(tmp_path / "missing.tar"), attempts=1)


def test_each_epoch_visits_every_sample_once_in_a_new_order(shards):
    stream = ShardStream(shards, Storage(), seed=3)
    seen = keys(stream.samples(), 36)
    epochs = [seen[0:12], seen[12:24], seen[24:36]]
    everything = sorted(f"s{i:04d}" for i in range(12))
    assert all(sorted(epoch) == everything for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3, "each epoch is shuffled differently"
    assert keys(ShardStream(shards, Storage(), seed=3).samples(), 36) == seen, "same seed, same stream"
    assert keys(ShardStream(shards, Storage(), seed=4).samples(), 36) != seen


@pytest.mark.parametrize("position", [0, 1, 4, 5, 7, 8, 11, 12, 13, 17, 24, 29, 35])
def test_resume_at_a_position_is_the_tail_of_the_stream(shards, position):
    full = keys(ShardStream(shards, Storage(), seed=0).samples(), 48)
    resumed = keys(ShardStream(shards, Storage(), seed=0).samples(position=position), 48 - position)
    assert resumed == full[position:]


def test_resume_skips_finished_shards_without_reading_them(shards, monkeypatch):
    import atoken.train.data as data

    reads: list[str] = []
    real = data.shard_samples
    monkeypatch.setattr(data, "shard_samples", lambda storage, uri: reads.append(uri) or real(storage, uri))
    stream = ShardStream(shards, Storage(), seed=0)
    first_of_epoch_one = stream._epoch_shards(1)
    next(stream.samples(position=12 + first_of_epoch_one[0].samples))
    assert reads == [first_of_epoch_one[1].uri], "epoch 0 and the finished shard of epoch 1 were not read"


def test_ranks_get_disjoint_shards_of_equal_count(tmp_path):
    shards = write_shards(tmp_path / "shards", [3, 3, 3, 3, 3])
    for epoch in range(4):
        per_rank = [ShardStream(shards, Storage(), seed=1, rank=r, world_size=2)._epoch_shards(epoch)
                    for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == 2
        assert not {s.uri for s in per_rank[0]} & {s.uri for s in per_rank[1]}
    streams = [keys(ShardStream(shards, Storage(), seed=1, rank=r, world_size=2).samples(), 6) for r in range(2)]
    assert not set(streams[0]) & set(streams[1])


def test_three_ranks_over_seven_shards_cover_six_per_epoch(tmp_path):
    shards = write_shards(tmp_path / "shards", [2] * 7)
    chosen = [ShardStream(shards, Storage(), seed=0, rank=r, world_size=3)._epoch_shards(0) for r in range(3)]
    uris = [s.uri for rank in chosen for s in rank]
    assert [len(rank) for rank in chosen] == [2, 2, 2] and len(set(uris)) == 6


def test_fewer_shards_than_ranks_share_samples_disjointly_and_resume_exactly(shards):
    # 3 shards of 12 samples over 4 ranks: every rank reads every shard and keeps its 3 of each epoch.
    streams = [ShardStream(shards, Storage(), seed=0, rank=r, world_size=4) for r in range(4)]
    assert not any(stream.split_by_shard for stream in streams)
    for epoch in range(3):
        per_rank = [keys(stream.samples(position=3 * epoch), 3) for stream in streams]
        seen = [key for rank in per_rank for key in rank]
        assert len(seen) == len(set(seen)) == 12, f"epoch {epoch}: the ranks overlap or miss samples"
    # 12 samples over 5 ranks: 2 each an epoch, the last 2 of the epoch's order left out (equal counts).
    five = [keys(ShardStream(shards, Storage(), seed=0, rank=r, world_size=5).samples(), 2) for r in range(5)]
    assert len({key for rank in five for key in rank}) == 10
    full = keys(streams[1].samples(), 9)
    for position in range(9):
        assert keys(streams[1].samples(position=position), 9 - position) == full[position:], position


def counted_reads(monkeypatch) -> list[int]:
    """Patches the shard reader to count the samples read from storage: [read so far]."""
    import atoken.train.data as data

    read = [0]
    real = data.shard_samples

    def counting(storage, uri):
        for sample in real(storage, uri):
            read[0] += 1
            yield sample

    monkeypatch.setattr(data, "shard_samples", counting)
    return read


@pytest.mark.parametrize("bound", ["samples", "bytes"])
def test_a_shard_is_held_a_shuffle_window_at_a_time_in_window_order_and_resumes_exactly(tmp_path, monkeypatch,
                                                                                       bound):
    import atoken.train.data as data

    shards = write_shards(tmp_path / "shards", [10, 7])  # windows of 4: 4 + 4 + 2 and 4 + 3
    if bound == "samples":
        monkeypatch.setattr(data, "SHUFFLE_WINDOW_SAMPLES", 4)
    else:  # every sample is a few hundred bytes: 4 of them reach the bound, 3 do not
        sizes = [data.sample_bytes(sample) for sample in read_shard(Storage(), shards[0].uri)]
        assert 4 * min(sizes) > 3 * max(sizes) + 1, sizes
        monkeypatch.setattr(data, "SHUFFLE_WINDOW_BYTES", 3 * max(sizes) + 1)
    read = counted_reads(monkeypatch)
    stream = ShardStream(shards, Storage(), seed=5)
    held, full = [], []
    for sample in itertools.islice(stream.samples(), 17):
        full.append(sample["__key__"])
        held.append(read[0] - len(full))  # read from storage and not yet given out
    assert max(held) <= 4, f"at most one window held: {held}"
    by_shard = [full[:10], full[10:]] if full[0] < "s0010" else [full[7:], full[:7]]
    for shard_keys, first in zip(by_shard, ("s0000", "s0010"), strict=True):
        number = int(first[1:])
        windows = [shard_keys[i:i + 4] for i in range(0, len(shard_keys), 4)]
        for index, window in enumerate(windows):
            assert sorted(window) == [f"s{number + 4 * index + k:04d}" for k in range(len(window))], windows
    assert any(sorted(w) != w for keys_ in by_shard for w in (keys_[:4], keys_[4:8])), "windows are shuffled"
    for position in range(0, 17, 3):
        assert keys(ShardStream(shards, Storage(), seed=5).samples(position=position), 17 - position) == \
            full[position:], position


def test_a_shard_that_fits_one_window_is_ordered_as_a_whole_read_was_and_held_whole(tmp_path, monkeypatch):
    """The control of the window bound (here the whole shard is held), and the order of a small shard: the
    permutation drawn from (seed, epoch, shard), as when every shard was read whole."""
    shards = write_shards(tmp_path / "shards", [10])
    read = counted_reads(monkeypatch)
    got, held = [], []
    for sample in itertools.islice(ShardStream(shards, Storage(), seed=5).samples(), 10):
        got.append(sample["__key__"])
        held.append(read[0] - len(got))
    assert max(held) == 9
    order = np.random.default_rng([5, 0, 0]).permutation(10)
    assert got == [f"s{i:04d}" for i in order]


def test_a_rank_whose_share_ends_inside_a_shard_closes_that_shards_read(tmp_path, monkeypatch):
    import os

    import atoken.train.data as data

    monkeypatch.setattr(data, "SHUFFLE_WINDOW_SAMPLES", 2)  # windows of 2: the read stays open between them
    shards = write_shards(tmp_path / "shards", [10])  # 1 shard, 2 ranks: rank 0's 5 samples end inside it

    def open_shards() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}").endswith(".tar") for fd in os.listdir("/proc/self/fd"))

    samples = ShardStream(shards, Storage(), seed=0, rank=0, world_size=2).samples()
    first = [next(samples)["__key__"] for _ in range(4)]
    assert open_shards() == 1, "the control: mid-share, the shard is being read"
    first.append(next(samples)["__key__"])  # the share's last sample of epoch 0
    next(samples)  # epoch 1 begins: its first window is read again from the start
    assert len(set(first)) == 5 and open_shards() == 1, "epoch 0's read was closed, only epoch 1's is open"
    samples.close()
    assert open_shards() == 0


def test_fewer_samples_than_ranks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="3 training samples cannot feed 4 data streams"):
        ShardStream(write_shards(tmp_path / "shards", [2, 1]), Storage(), seed=0, rank=0, world_size=4)


def test_a_manifest_count_that_disagrees_with_the_shard_raises(shards):
    wrong = [ShardInfo(shards[0].uri, 6), *shards[1:]]
    stream = ShardStream(wrong, Storage(), seed=0, world_size=1)
    with pytest.raises(StorageError, match="5 samples, the manifest says 6"):
        keys(stream.samples(), 13)


def test_a_shard_with_more_samples_than_its_manifest_says_raises(shards):
    stream = ShardStream([ShardInfo(shards[0].uri, 4), *shards[1:]], Storage(), seed=0, world_size=1)
    with pytest.raises(StorageError, match="more samples than the 4 the manifest says"):
        keys(stream.samples(), 13)


def test_empty_shards_raise_instead_of_looping(tmp_path):
    shards = write_shards(tmp_path / "shards", [0, 0])
    with pytest.raises(ValueError, match="hold no samples"):
        next(ShardStream(shards, Storage(), seed=0).samples())


def test_decode_image_maps_to_minus_one_one():
    tensor = decode_image({"png": png(255)})
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
    assert tensor[:, 1, 1].tolist() == [1.0, 1.0, 1.0]
    assert tensor[:, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1.0, 1.0], abs=1e-6)
    assert decode_image({"png": png(0)})[:, 3, 3].tolist() == [-1.0, -1.0, -1.0]


def test_batches_start_where_their_position_says(shards):
    stream = ShardStream(shards, Storage(), seed=2)
    samples = list(itertools.islice(stream.samples(), 20))

    task = ImageTask(TrainStageSection(batch_size=4), LossSection())
    batches = (batch.to("cpu").pixels for batch, _ in task_batches(task, shards, Storage(), seed=2, position=8))
    first, second = next(batches), next(batches)

    assert first.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(first, torch.stack([decode_image(s) for s in samples[8:12]]))
    assert torch.equal(second, torch.stack([decode_image(s) for s in samples[12:16]]))
