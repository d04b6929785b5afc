"""train/loader.py: samples prepared in loader processes, in stream order; cross-shard mixing; the resolution
schedule; exact resume on any number of loader workers."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from atoken.pipeline.config import ConfigError, LossSection, TrainStageSection, load_config
from atoken.pipeline.storage import Storage
from atoken.train.data import ShardInfo
from atoken.train.loader import (
    LoaderSettings,
    Prefetched,
    PreparedSamples,
    ResolutionSchedule,
    prepared_samples,
    shard_stream_start,
)
from atoken.train.streams import task_batches
from atoken.train.tasks import ImageTask

CLASSES = 8


def photo(width: int, height: int, seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def class_shards(folder: Path, per_class: int = 8, sizes=((48, 32),)) -> list[ShardInfo]:
    """One shard a class, in class order: what a positional ingest of a class-per-folder set writes."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for label in range(CLASSES):
        path = folder / f"train-{label:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in range(per_class):
                width, height = sizes[index % len(sizes)]
                sink.write({"__key__": f"c{label}_{index:02d}", "png": photo(width, height, 100 * label + index),
                            "json": json.dumps({"caption": f"class {label}"}).encode()})
        shards.append(ShardInfo(str(path), per_class))
    return shards


def stream_keys(shards, count: int, position: int = 0, interleave: int = 1, workers: int = 0,
                stream: int = 0, data_streams: int = 1) -> list[str]:
    prepare = ImageTask(TrainStageSection(), LossSection()).prepare  # what a loader process runs (importable)
    samples = PreparedSamples(shards, Storage(), 7, stream, data_streams, prepare, position, interleave)
    loader = prepared_samples(samples, LoaderSettings(interleave=interleave, workers=workers, prefetch=2))
    taken = list(itertools.islice(loader, count))
    assert [index for index, _ in taken] == list(range(position, position + count))
    return [item.key for _, item in taken]


@pytest.fixture
def shards(tmp_path) -> list[ShardInfo]:
    return class_shards(tmp_path / "shards")


def test_shard_stream_start_is_the_first_index_the_shard_stream_serves():
    for position, interleave in itertools.product(range(13), (1, 2, 3, 4)):
        for shard_stream in range(interleave):
            first = next(k for k in itertools.count(position) if k % interleave == shard_stream)
            assert shard_stream_start(position, shard_stream, interleave) == first // interleave


def test_loader_workers_yield_the_stream_in_order_and_resume_exactly(shards):
    """The same samples in the same order with the samples prepared here or in 2 or 4 loader processes, and a
    stream resumed at any position with N loader workers continues the uninterrupted one exactly."""
    straight = stream_keys(shards, 80, interleave=4)  # past one epoch (64 samples)
    assert len(set(straight[:64])) == 64  # an epoch is every sample once
    assert stream_keys(shards, 80, interleave=4, workers=2) == straight
    assert stream_keys(shards, 80, interleave=4, workers=4) == straight
    for position in (1, 7, 62):
        assert stream_keys(shards, 80 - position, position, interleave=4, workers=2) == straight[position:]
    assert stream_keys(shards, 80, interleave=2) != straight  # the interleave is part of the data


def test_loader_workers_must_divide_the_interleave(shards):
    with pytest.raises(ValueError, match="must divide shard_interleave"):
        stream_keys(shards, 4, interleave=3, workers=2)


def test_streams_share_nothing_and_cover_the_epoch(shards):
    per_stream = [stream_keys(shards, 24, interleave=3, stream=s, data_streams=2) for s in range(2)]
    assert not set(per_stream[0]) & set(per_stream[1])


def test_interleaved_shards_mix_classes_in_every_micro_batch(shards):
    """One shard a class (a positional ingest of a class-per-folder set): one shard at a time gives micro-batches
    of one class (the negative control); four interleaved shards give four classes in every micro-batch."""
    task = ImageTask(TrainStageSection(batch_size=8), LossSection())

    def classes_per_batch(interleave: int) -> list[int]:
        batches = task_batches(task, shards, Storage(), seed=3, loader=LoaderSettings(interleave=interleave))
        return [len({caption for caption in batch.captions}) for batch, _ in itertools.islice(batches, 6)]

    assert set(classes_per_batch(1)) == {1}
    assert min(classes_per_batch(4)) >= 4


def test_a_class_per_folder_ingest_mixes_classes_in_a_micro_batch(tmp_path):
    """Through the real ingest: items land in parts by the hash of their key, so even one shard at a time mixes
    the folders' classes."""
    import ray

    from atoken.pipeline.config import IngestSection, SourceSection
    from atoken.pipeline.stages import _shards
    from atoken.preprocess.job import run_image_job

    root = tmp_path / "classes"
    for label in range(4):
        (root / f"class{label}").mkdir(parents=True)
        for index in range(10):
            pixels = np.full((24, 24, 3), 50 * label + index, np.uint8)  # the class is in the grey level
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            (root / f"class{label}" / f"{index:02d}.png").write_bytes(buffer.getvalue())
    section = IngestSection(sources=[SourceSection(kind="folder", path=str(root))], resolution=16,
                            samples_per_shard=10, val_every=100, parallelism=2)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        run_image_job(section, Storage(), str(tmp_path / "out"), progress=False)
    finally:
        ray.shutdown()
    train = _shards(Storage(), str(tmp_path / "out"), "train")
    assert len(train) >= 2
    task = ImageTask(TrainStageSection(batch_size=8), LossSection())
    batches = list(itertools.islice(task_batches(task, train, Storage(), seed=0), 4))
    grey = [batch.pixels.float().mean(dim=(1, 2, 3)).tolist() for batch, _ in batches]  # per image, uint8
    classes = [{int(level // 50) for level in levels} for levels in grey]
    assert all(len(c) >= 2 for c in classes), classes


def test_the_resolution_schedule_keeps_aspect_rounds_to_patches_and_never_upscales():
    schedule = ResolutionSchedule(64, 512)
    sizes = [schedule.size(1000, 400, (0, 0, index)) for index in range(200)]
    assert len(set(sizes)) > 10  # drawn per sample
    for width, height in sizes:
        assert width % 16 == 0 and height % 16 == 0
        assert 64 - 8 <= width <= 512 + 8
        assert abs(width / height - 2.5) <= 2.5 * (8 / height + 8 / width) + 1e-9  # aspect within the rounding
    assert sizes == [schedule.size(1000, 400, (0, 0, index)) for index in range(200)]  # the same draws again
    assert sizes != [schedule.size(1000, 400, (1, 0, index)) for index in range(200)]  # another seed
    assert all(max(schedule.size(100, 60, (0, 0, index))) <= 96 for index in range(100))  # never past 100 px
    assert ResolutionSchedule(32, 32).size(100, 60, (0, 0, 0)) == (32, 32)
    # The long side is drawn over the whole range, evenly: each quarter of [64, 512] holds about a quarter.
    long_sides = [max(ResolutionSchedule(64, 512, patch=1).size(4000, 4000, (7, 3, index))) for index in range(4000)]
    quarters = np.histogram(long_sides, bins=4, range=(64, 513))[0]
    assert min(long_sides) == 64 and max(long_sides) == 512 and all(850 < q < 1150 for q in quarters), quarters


def test_packed_images_follow_the_schedule_and_resume_with_the_same_draws(tmp_path):
    shards = class_shards(tmp_path / "shards", sizes=((200, 80), (96, 128)))
    stage = TrainStageSection(max_tokens=256, image_resolution=[32, 160])
    task = ImageTask(stage, LossSection())
    loader = LoaderSettings(interleave=2, workers=2, prefetch=2)
    straight = [(batch.to("cpu"), after)
                for batch, after in itertools.islice(task_batches(task, shards, Storage(), seed=1, loader=loader), 8)]
    grids = {layout.grid[1:] for batch, _ in straight for layout in batch.layouts}
    assert len(grids) > 3  # sizes drawn per sample, not one per batch
    for batch, _ in straight:
        assert batch.patches.shape[0] <= 256
    _, position = straight[3]
    resumed = [(batch.to("cpu"), after) for batch, after in itertools.islice(
        task_batches(task, shards, Storage(), seed=1, position=position, loader=LoaderSettings(interleave=2)), 4)]
    for (a, after_a), (b, after_b) in zip(straight[4:], resumed, strict=True):
        assert torch.equal(a.patches, b.patches) and a.layouts == b.layouts and after_a == after_b


def test_images_of_several_sizes_in_one_batch_need_a_size_or_packing(tmp_path):
    shards = class_shards(tmp_path / "shards", sizes=((48, 32), (32, 32)))
    task = ImageTask(TrainStageSection(batch_size=4), LossSection())
    with pytest.raises(ValueError, match="set the stage's image_resolution"):
        next(task_batches(task, shards, Storage(), seed=0))
    square = ImageTask(TrainStageSection(batch_size=4, image_resolution=32), LossSection())
    batch, _ = next(task_batches(square, shards, Storage(), seed=0))
    assert batch.pixels.shape == (4, 3, 32, 32) and batch.pixels.dtype == torch.uint8  # float on the device
    assert batch.to("cpu").pixels.dtype == torch.float32


def test_the_schedule_and_loader_are_validated_naming_the_field(tmp_path):
    def load(stage: str):
        path = tmp_path / "config.yaml"
        path.write_text(f"train:\n  model: {{kind: atoken, preset: tiny, patch_size: 16}}\n  stages:\n    - {stage}\n"
                        "ingest:\n  resolution: 64\n")
        return load_config(path)

    config = load("{name: s1, max_tokens: 512, image_resolution: [64, 256], shard_interleave: 4, loader_workers: 2}")
    assert config.train.stages[0].image_resolution == [64, 256]
    for stage, field in [("{name: s1, image_resolution: [64, 256]}", "image_resolution"),
                         ("{name: s1, max_tokens: 512, image_resolution: [256, 64]}", "image_resolution"),
                         ("{name: s1, shard_interleave: 3, loader_workers: 2}", "loader_workers")]:
        with pytest.raises(ConfigError, match=rf"train\.stages\[0\]\.{field}"):
            load(stage)


def test_a_small_modality_interleaves_fewer_shard_streams():
    """Two 3D assets, or 150 video shards, beside a large image set: the stage's interleave and loader processes
    shrink for that task so that every shard stream keeps shards (or a sample) of its own, and the loader
    processes still divide the interleave."""
    from atoken.train.loader import fitted

    def shards(count: int, samples: int) -> list[ShardInfo]:
        return [ShardInfo(f"s{index}", samples) for index in range(count)]

    settings = LoaderSettings(interleave=8, workers=4)
    assert fitted(settings, shards(2000, 500), 64) == settings
    assert fitted(settings, shards(150, 64), 64) == LoaderSettings(interleave=2, workers=2)
    assert fitted(settings, shards(2, 1), 2) == LoaderSettings(interleave=1, workers=1)
    assert fitted(settings, shards(12, 1), 2) == LoaderSettings(interleave=6, workers=3)
    assert fitted(LoaderSettings(interleave=8, workers=0), shards(4, 1), 2).workers == 0


def test_with_fewer_shards_than_shard_streams_a_streams_shard_streams_read_different_shards(shards):
    """8 shard streams (4 data streams x 2) over the 8 one-class shards minus two: equal blocks of the epoch. A data
    stream's two shard streams take blocks far apart, so its micro-batches still mix shards."""
    six = shards[:6]
    samples = PreparedSamples(six, Storage(), 0, 0, 4, ImageTask(TrainStageSection(), LossSection()).prepare, 0, 2)
    classes = [{key.split("_")[0] for key in keys(samples.shard_stream(index).samples(), 6)} for index in range(2)]
    assert len(classes[0] | classes[1]) >= 2 and not classes[0] & classes[1], classes


def test_the_training_thread_buffers_at_most_a_round_of_chunks(tmp_path):
    """Images of two sizes in four interleaved shard streams: the chunks taken stay within one round (interleave
    chunks) of what was consumed, however long the stream runs."""
    shards = class_shards(tmp_path / "shards", sizes=((48, 32), (96, 64)))
    task = ImageTask(TrainStageSection(), LossSection())
    taken = []

    class Counted(PreparedSamples):
        def __iter__(self):
            for chunk in super().__iter__():
                taken.append(len(chunk[1]))
                yield chunk

    samples = Counted(shards, Storage(), 0, 0, 1, task.prepare, 0, 4, chunk=4)
    stream = prepared_samples(samples, LoaderSettings(interleave=4))
    for consumed in range(1, 401):
        next(stream)
        assert sum(taken) - consumed <= 4 * 4, (consumed, sum(taken))


def keys(stream, count: int) -> list[str]:
    return [sample["__key__"] for sample in itertools.islice(stream, count)]


def test_prefetched_batches_are_the_sources_in_order_and_its_error_comes_where_it_stopped():
    def source():
        yield from range(5)
        raise OSError("shard cut")

    batches = Prefetched(source(), depth=2)
    assert [next(batches) for _ in range(5)] == list(range(5))
    for _ in range(2):  # the error, and again on the next call: never a silent end
        with pytest.raises(OSError, match="shard cut"):
            next(batches)
    assert list(Prefetched(iter(range(7)), depth=3)) == list(range(7))


def test_prefetched_batches_stop_their_thread_and_close_the_source_when_dropped():
    import gc
    import threading
    import time

    closed = threading.Event()

    def endless():
        try:
            yield from itertools.count()
        finally:
            closed.set()  # a generator's finally: where a loader's DataLoader would shut its processes down

    batches = Prefetched(endless(), depth=2)
    assert next(batches) == 0
    thread = batches._thread
    time.sleep(0.2)
    assert thread.is_alive() and not closed.is_set(), "the control: running ahead, blocked on a full queue"
    del batches
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive() and closed.is_set()
