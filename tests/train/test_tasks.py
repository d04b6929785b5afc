"""The curriculum's tasks (train/tasks.py), their data streams and draws (train/streams.py) and frozen networks
(train/frozen.py): the global share of each loss, the packed image path, the 3D render loss's views."""

from __future__ import annotations

import pytest
import torch

from atoken.pipeline.config import LossSection, TrainStageSection
from atoken.pipeline.storage import Storage
from atoken.train.frozen import Frozen
from atoken.train.losses.perceptual import gram_matrix
from atoken.train.losses.render import render_views
from atoken.train.model import Tokenizer
from atoken.train.model.tokens import pack_images
from atoken.train.streams import (
    StreamNoise,
    StreamPart,
    TaskStreams,
    WorldShare,
    part_seed,
    worker_streams,
    world_share,
)
from atoken.train.tasks import ImageBatch, ImageTask, MicroBatch, ObjectTask, build_tasks

from helpers import write_training_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from atoken.train.tasks import TaskShards

    return TaskShards(**write_training_shards(tmp_path_factory.mktemp("tasks"), shards=4, images=4))


def test_streams_are_shared_out_contiguously_and_refuse_an_uneven_split():
    assert [worker_streams(4, rank, 2) for rank in range(2)] == [[0, 1], [2, 3]]
    assert worker_streams(4, 0, 1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="data streams cannot be shared by 3 workers"):
        worker_streams(4, 0, 3)


def test_one_worker_reading_two_streams_sees_what_two_workers_see(shards):
    stage = TrainStageSection(batch_size=2, tasks=["image"])
    tasks = build_tasks(stage, LossSection())
    both = TaskStreams(tasks, shards, Storage(), 0, [0, 1], 2, {})
    rank0 = TaskStreams(tasks, shards, Storage(), 0, [0], 2, {})
    rank1 = TaskStreams(tasks, shards, Storage(), 0, [1], 2, {})
    for _ in range(3):  # past a shard boundary (4 images a shard, 2 a batch)
        merged, parts = both.next("image")
        first, _ = rank0.next("image")
        second, _ = rank1.next("image")
        assert torch.equal(merged.pixels, torch.cat([first.pixels, second.pixels]))
        assert merged.captions == first.captions + second.captions
        assert [(p.stream, p.samples) for p in parts] == [(0, 2), (1, 2)]
    assert both.positions == {"image/0": 6, "image/1": 6} == rank0.positions | rank1.positions
    # Negative control: the streams are different data.
    assert not torch.equal(first.pixels, second.pixels)
    resumed = TaskStreams(tasks, shards, Storage(), 0, [1], 2, {"image/1": 4})
    assert torch.equal(resumed.next("image")[0].pixels, second.pixels)


def test_noise_is_drawn_per_stream_whatever_the_batch_holds():
    parts = [StreamPart(0, 2, 8), StreamPart(1, 3, 12)]
    seeds = [part_seed(0, 0, p.stream, 5, 0) for p in parts]
    mean = torch.zeros(20, 4)
    together = StreamNoise(parts, seeds)(mean)
    alone = [StreamNoise([part], [seed])(torch.zeros(part.tokens, 4)) for part, seed in zip(parts, seeds, strict=True)]
    assert torch.equal(together, torch.cat(alone))
    # Rows per sample when the posterior has one row per image (the convolutional models).
    assert StreamNoise(parts, seeds)(torch.zeros(5, 4, 2, 2)).shape == (5, 4, 2, 2)
    assert not torch.equal(together[:8], StreamNoise(parts, [part_seed(0, 0, 0, 6, 0), seeds[1]])(mean)[:8])
    with pytest.raises(ValueError, match="fits neither"):
        StreamNoise(parts, seeds)(torch.zeros(7, 4))


def test_a_workers_share_rescales_its_mean_to_the_global_one():
    share = WorldShare(["a"] * 5, ["a"] * 2, {"tokens": (2, 5)}, world_size=2)
    # Worker means 1.0 over 2 tokens and 4.0 over 3 tokens: the global mean is 14 / 5; DDP averages the two.
    other = WorldShare(["a"] * 5, ["a"] * 3, {"tokens": (3, 5)}, world_size=2)
    assert (1.0 * share.scale("tokens") + 4.0 * other.scale("tokens")) / 2 == pytest.approx(14 / 5)
    alone = world_share(["a", "b"], {"tokens": 5}, world_size=1)
    assert alone.scale("tokens") == 1.0 and alone.captions == ["a", "b"]


def test_packed_images_pay_every_image_loss_as_the_batch_path_does():
    """Same images, same draws: the packed path's L1, LPIPS, Gram, CLIP-perceptual and sigmoid terms equal the
    batch path's (they went missing from it before)."""
    torch.manual_seed(0)
    model = Tokenizer.from_preset("tiny", latent_channels=8, patch_size=16, text_dim=384)
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    captions = ["a photo of a cat", "a photo of a dog", "a photo of a cat"]
    losses = LossSection(perceptual_resolution=32)
    frozen = Frozen(losses, torch.device("cpu"), need_perceptual=True, need_text=True)
    task = ImageTask(TrainStageSection(batch_size=3), losses)
    parts = [StreamPart(0, 3, 12)]

    def terms(data):
        share = world_share(captions, task.counts(data, parts), 1)
        micro = MicroBatch(data, parts, StreamNoise(parts, [7]), [8], share)
        return task.losses_of(model, micro, frozen)[1]

    batch_terms = terms(ImageBatch(pixels, captions))
    packed = pack_images(pixels)
    packed.captions = captions
    packed_terms = terms(packed)
    for name in ("l1", "lpips", "gram", "clip_perceptual", "sigmoid", "kl", "total"):
        assert torch.allclose(packed_terms[name], batch_terms[name], rtol=1e-4, atol=1e-6), name
    assert float(packed_terms["lpips"].detach()) > 0 and float(packed_terms["gram"].detach()) > 0


def test_gram_and_gaussians_leave_bf16_autocast_in_float32():
    features = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_matrix(features).dtype == torch.float32
    gaussians = {"means": torch.randn(5, 3) * 0.1, "quats": torch.nn.functional.normalize(torch.randn(5, 4), dim=-1),
                 "scales": torch.full((5, 3), 0.05, dtype=torch.bfloat16),
                 "opacities": torch.full((5,), 0.5, dtype=torch.bfloat16),
                 "colors": torch.rand(5, 3).bfloat16()}
    c2w = torch.eye(4)[None].clone()
    c2w[0, 2, 3] = 2.0
    intrinsics = torch.tensor([[[16.0, 0, 8], [0, 16.0, 8], [0, 0, 1]]])
    assert render_views(gaussians, c2w, intrinsics, 16, 16).dtype == torch.float32


def test_frozen_networks_in_bf16_take_float32_inputs_outside_autocast(tmp_path):
    """On GPU the frozen networks are held in bf16 and the understanding and render losses call them from
    float32 code (autocast off): each casts its inputs. Run here on CPU in bf16."""
    from atoken.train.losses.perceptual import PerceptualLosses
    from atoken.train.losses.towers import ImageTower
    from atoken.train.model.text_encoder import TextEncoder

    from helpers import save_tiny_siglip2

    folder = save_tiny_siglip2(tmp_path / "siglip2", width=32, depth=1, heads=2, mlp=64)
    images, outputs = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    tower = ImageTower.from_path(folder, dtype=torch.bfloat16)
    assert torch.isfinite(tower(images).float()).all()
    perceptual = PerceptualLosses(32, vision_tower=str(folder), dtype=torch.bfloat16).to(dtype=torch.bfloat16)
    terms = perceptual(images, outputs)
    assert all(torch.isfinite(value.float()) for value in terms.values())
    text = TextEncoder.from_path(folder, dtype=torch.bfloat16)
    assert text(["a red shoe"]).dtype == torch.float32


def test_the_losses_bf16_towers_leave_the_evaluations_float32_tower_as_it_was(tmp_path, monkeypatch):
    """The frozen Hugging Face model is shared per process (teacher, text and perceptual tower of one folder):
    the training losses' bf16 copy must not turn the evaluation's float32 text tower into bf16 (it was moved in
    place before: nn.Module.to mutates the shared model)."""
    import atoken.train.frozen as frozen_module
    from atoken.train.model.text_encoder import TextEncoder

    from helpers import save_tiny_siglip2

    folder = str(save_tiny_siglip2(tmp_path / "siglip2", width=32, depth=1, heads=2, mlp=64))
    evaluation = TextEncoder.from_path(folder)
    before = evaluation(["a red shoe"])
    monkeypatch.setattr(frozen_module, "frozen_dtype", lambda device, bf16: torch.bfloat16)  # as on a GPU
    losses = LossSection(text_encoder=folder, teacher=folder, vision_tower=folder)
    frozen = Frozen(losses, torch.device("cpu"), need_perceptual=True, need_text=True, bf16=True)

    held = {p.dtype for net in (frozen.text_encoder, frozen.teacher, frozen.perceptual.tower) for p in net.parameters()}
    assert held == {torch.bfloat16}, "the losses hold bf16 copies"
    assert frozen.teacher.model is frozen.perceptual.tower.model is frozen.text_encoder.model.dual, "read once"
    assert {p.dtype for p in evaluation.parameters()} == {torch.float32}
    assert torch.equal(evaluation(["a red shoe"]), before)
    assert not torch.equal(frozen.text_encoder(["a red shoe"]), before), "control: bf16 embeds differently"


def test_the_caption_cache_stays_bounded_and_keeps_what_repeats(monkeypatch):
    """Captions that never repeat (file names, Objaverse titles) must not grow a worker's memory with the samples
    seen; a class name in every batch stays cached."""
    import atoken.train.frozen as frozen_module

    monkeypatch.setattr(frozen_module, "TEXT_CACHE_SIZE", 4)
    frozen = Frozen(LossSection(), torch.device("cpu"), need_perceptual=False, need_text=True)
    for index in range(20):
        frozen.text(["a photo of a cat", f"file_{index:04d}.png"])
    assert len(frozen._text_cache) == 4 and "a photo of a cat" in frozen._text_cache
    assert torch.equal(frozen.text(["a photo of a cat"])[0], frozen.text_encoder(["a photo of a cat"])[0])


def test_the_3d_render_loss_sees_input_views_only(shards, monkeypatch):
    """Issue 17: what render_3d scores (a sample's eval_views) must stay held out from training too. The task's
    targets and the cameras its Gaussians are rendered at are the sample's input views, never its evaluation
    views, and the task says so (the run's atoken.3d_render_loss tag)."""
    import atoken.train.tasks as tasks_module
    from atoken.preprocess.objects import load_object_sample
    from atoken.train.data import read_shard
    from atoken.train.losses.render import composite_views
    from atoken.train.streams import task_batches

    stage = TrainStageSection(tasks=["3d"], objects_per_batch=2, render_views=4)
    task = ObjectTask(stage, LossSection(render_lpips=0.0))
    batch, _ = next(task_batches(task, shards.objects[:1], Storage(), 0))
    samples = [load_object_sample(sample["npz"]) for sample in read_shard(Storage(), shards.objects[0].uri)]
    assert all(len(arrays["eval_views"]) > 0 for arrays in samples)  # the fixture's samples hold evaluation views
    for view, arrays in zip(batch.views, samples, strict=True):  # one shard, read in order
        assert torch.equal(view["target"], composite_views(arrays["views"]))  # the input views, all of them
        assert torch.equal(view["c2w"], torch.from_numpy(arrays["c2w"]))

    rendered_at = []
    render = tasks_module.render_views

    def spy(gaussians, c2w, *args):
        rendered_at.append(c2w.clone())
        return render(gaussians, c2w, *args)

    monkeypatch.setattr(tasks_module, "render_views", spy)
    torch.manual_seed(0)
    model = Tokenizer.from_preset("tiny", latent_channels=8, patch_size=16, gaussians_per_voxel=2, voxel_grid=16)
    frozen = Frozen(task.losses, torch.device("cpu"), need_perceptual=False, need_text=False)
    parts = [StreamPart(0, batch.samples, batch.tokens)]
    share = world_share(batch.packed.captions, task.counts(batch, parts), 1)
    task.losses_of(model, MicroBatch(batch, parts, StreamNoise(parts, [7]), [8], share), frozen)
    inputs = torch.cat([view["c2w"] for view in batch.views])  # (2 * 4, 4, 4)
    held_out = torch.cat([torch.from_numpy(arrays["eval_c2w"]) for arrays in samples])
    for cameras in rendered_at:
        for camera in cameras:
            assert any(torch.equal(camera, c) for c in inputs)
            assert not any(torch.allclose(camera, c, atol=1e-3) for c in held_out)
    assert len(rendered_at) == 2 and "input views only" in ObjectTask.RENDER_LOSS_VIEWS


def test_an_image_batch_counts_tokens_in_the_models_patch():
    pixels = torch.zeros(2, 3, 32, 48)
    assert ImageBatch(pixels, ["a", "b"]).tokens == 2 * 2 * 3  # 16-px patches, the default
    assert ImageBatch(pixels, ["a", "b"], patch=8).tokens == 2 * 4 * 6
    moved = ImageBatch(pixels.to(torch.uint8), ["a", "b"], patch=8).to(torch.device("cpu"))
    assert moved.patch == 8 and moved.tokens == 48
