"""Token-budget packing of images and clips from shards: budget kept, nothing padded, exact resume."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from atoken.pipeline.config import LossSection, TrainStageSection
from atoken.pipeline.storage import Storage
from atoken.train.data import ShardInfo
from atoken.train.streams import task_batches
from atoken.train.tasks import VideoTask


def packed(shards, seed: int, max_tokens: int, position: int = 0):
    """The video task's packed batches (it packs images and clips alike) of one stream."""
    task = VideoTask(TrainStageSection(tasks=["video"], video_max_tokens=max_tokens), LossSection())
    return ((batch.to("cpu"), after) for batch, after in task_batches(task, shards, Storage(), seed,
                                                                      position=position))


def png(height: int, width: int, seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_clip(frames: int, size: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8))
    return buffer.getvalue()


@pytest.fixture
def mixed_shards(tmp_path) -> list[ShardInfo]:
    """Two shards of images (32-64 px) and 8-frame clips: 4 to 32 tokens each."""
    shards = []
    for shard in range(2):
        path = tmp_path / f"train-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in range(6):
                key = f"s{shard}_{index}"
                if index % 3 == 2:
                    sink.write({"__key__": key, "npy": npy_clip(8, 32, index), "json": b"{}"})
                else:
                    sink.write({"__key__": key, "png": png(32 + 16 * (index % 2), 64, index), "json": b"{}"})
        shards.append(ShardInfo(str(path), 6))
    return shards


def test_packed_batches_keep_the_budget_and_every_sample_once(mixed_shards):
    batches = list(itertools.islice(packed(mixed_shards, 3, max_tokens=40), 6))
    assert all(batch.patches.shape[0] <= 40 for batch, _ in batches)
    # no padding: each sample's tokens are exactly its grid, images 2x4 or 3x4, clips 2x2x2
    sizes = [int(n) for batch, _ in batches for n in batch.sample_ids.bincount()]
    assert set(sizes) <= {8, 12} and 8 in sizes
    modalities = {layout.modality for batch, _ in batches for layout in batch.layouts}
    assert modalities == {"image", "video"}
    positions = [position for _, position in batches]
    assert positions == list(itertools.accumulate(batch.num_samples for batch, _ in batches))
    # one epoch is 2 x (8 + 12 + 8 + 12 + 8 + 8) = 112 tokens: the batches before position 12 hold at most that
    first_epoch = [batch for batch, position in batches if position <= 12]
    assert sum(batch.patches.shape[0] for batch in first_epoch) <= 112


def test_packed_batches_resume_exactly(mixed_shards):
    straight = list(itertools.islice(packed(mixed_shards, 5, max_tokens=40), 8))
    _, position = straight[2]
    resumed = list(itertools.islice(packed(mixed_shards, 5, max_tokens=40, position=position), 5))
    for (a, _), (b, _) in zip(straight[3:], resumed, strict=True):
        assert np.array_equal(a.patches.numpy(), b.patches.numpy())
        assert a.layouts == b.layouts


def test_a_sample_larger_than_the_budget_is_a_clear_error(mixed_shards):
    with pytest.raises(ValueError, match="more than the 6-token budget"):
        next(packed(mixed_shards, 0, max_tokens=6))


def test_a_frame_pack_patchifies_to_the_packed_batch_of_the_float_frames():
    """The loader ships uint8 frames and patchifies where the model runs: the batch is value for value the one
    `pack(patchify_video(float frames))` makes, temporal padding and centre crop included."""
    from atoken.train.model.tokens import FramePack, frame_layout, pack, patchify_video

    rng = np.random.default_rng(0)
    clips = [torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
             for shape in [(1, 3, 40, 56), (6, 3, 32, 48), (4, 3, 17, 33)]]  # an image, 6 frames (padded), cropped
    cropped = [frame_layout(clip) for clip in clips]
    frames = FramePack([c for c, _ in cropped], [layout for _, layout in cropped], ["a", "b", "c"])
    reference = pack([patchify_video(clip.float() / 127.5 - 1.0) for clip in clips])
    batch = frames.to("cpu")
    assert torch.equal(batch.patches, reference.patches) and torch.equal(batch.coords, reference.coords)
    assert torch.equal(batch.sample_ids, reference.sample_ids) and batch.layouts == reference.layouts
    assert frames.token_count == batch.patches.shape[0] and batch.captions == ["a", "b", "c"]
    both = FramePack.concat([frames, frames]).to("cpu")
    assert both.num_samples == 6 and torch.equal(both.patches[: batch.patches.shape[0]], batch.patches)
