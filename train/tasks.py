"""The curriculum's tasks: where each micro-batch comes from and which loss terms it pays (spec: losses).

    image  reconstruction (L1, LPIPS, Gram, CLIP-perceptual) + understanding (distillation, or sigmoid without a
           teacher)
    video  reconstruction (L1 over real frames) + understanding (sigmoid)
    3d     reconstruction (L1 over voxel features, Gaussian render loss at input views) + understanding (sigmoid)

Every task's total is 0.2·L_rec + 1.0·L_sem + 1e-8·L_KL (weights from train.losses). Micro-batches come from
data streams (train/streams.py): each term is this worker's mean rescaled to the global batch (`WorldShare`),
so the same config trains the same weights on 1 worker or N. The terms themselves: train/losses/terms.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from atoken.pipeline.config import LossSection, TrainStageSection
from atoken.train.data import ShardInfo, caption_of
from atoken.train.frozen import Frozen
from atoken.train.loader import (
    ResolutionSchedule,
    group_samples,
    pack_samples,
    scheduled_frames,
    scheduled_image,
)
from atoken.train.losses.render import composite_views, gaussian_render_loss, render_views, resize_views
from atoken.train.losses.terms import (
    combine_terms,
    full_precision,
    kl_term,
    packed_images,
    packed_reconstruction,
    perceptual_choice,
    perceptual_terms,
    real_values,
    semantic_terms,
)
from atoken.train.model.tokens import (
    FramePack,
    PackedBatch,
    SampleLayout,
    concat_packed,
    frame_layout,
    pack,
    to_device,
    tokens_per_sample,
    voxel_tokens,
)
from atoken.train.streams import (
    StreamNoise,
    StreamPart,
    WorldShare,
    batch_samples,
    batch_tokens,
    part_seed,
    world_share,
)


@dataclass
class TaskShards:
    """The train shards of each modality (empty when the run has no such ingest stage)."""
    image: list[ShardInfo] = field(default_factory=list)
    video: list[ShardInfo] = field(default_factory=list)
    objects: list[ShardInfo] = field(default_factory=list)


@dataclass
class ImageBatch:
    pixels: torch.Tensor  # (B, 3, H, W): float in [-1, 1], or uint8 on the host (made float by `to`)
    captions: list[str]
    patch: int = 16  # the model's patch size: what `tokens` counts in

    def to(self, device: torch.device) -> ImageBatch:
        pixels = to_device(self.pixels, device)
        if pixels.dtype == torch.uint8:  # from the loader: converted where the model runs
            pixels = pixels.float() / 127.5 - 1.0  # (B, 3, H, W)
        return ImageBatch(pixels, self.captions, self.patch)

    @property
    def tokens(self) -> int:
        return self.pixels.shape[0] * (self.pixels.shape[2] // self.patch) * (self.pixels.shape[3] // self.patch)

    @property
    def samples(self) -> int:
        return self.pixels.shape[0]


@dataclass
class ObjectBatch:
    packed: PackedBatch  # voxel tokens of every asset
    # Per asset, its input views only: target (N, H, W, 3) in [0, 1], c2w (N, 4, 4), intrinsics (N, 3, 3).
    views: list[dict[str, torch.Tensor]]

    def to(self, device: torch.device) -> ObjectBatch:
        return ObjectBatch(self.packed.to(device),
                           [{k: to_device(v, device) for k, v in view.items()} for view in self.views])

    @property
    def tokens(self) -> int:
        return self.packed.patches.shape[0]

    @property
    def samples(self) -> int:
        return self.packed.num_samples


@dataclass
class PreparedImage:
    """An image or clip as a loader process leaves it: uint8 frames, cropped to the patch when packed."""
    key: str
    caption: str
    frames: torch.Tensor  # (T, 3, H, W) uint8; T = 1 for an image
    layout: SampleLayout | None  # its tokens' layout (packed); None on the batch path

    @property
    def tokens(self) -> int:
        grid_t, grid_h, grid_w = self.layout.grid
        return grid_t * grid_h * grid_w

    def pin_memory(self) -> PreparedImage:  # DataLoader(pin_memory=True) calls it, on its pinning thread
        return PreparedImage(self.key, self.caption, self.frames.pin_memory(), self.layout)


@dataclass
class PreparedObject:
    """A 3D asset as a loader process leaves it: voxel tokens and input views (target, c2w, intrinsics)."""
    key: str
    caption: str
    tokens: tuple
    views: dict[str, torch.Tensor]


@dataclass
class MicroBatch:
    """What a task's `losses_of` receives: the data, its streams, this step's draws and its global share."""
    data: object  # ImageBatch | PackedBatch | ObjectBatch
    parts: list[StreamPart]
    noise: StreamNoise
    view_seeds: list[int]  # per part: the generator of the views the 3D task's render loss draws
    share: WorldShare


def frame_packs(samples: Iterator[tuple[int, PreparedImage]], max_tokens: int, position: int, patch: int
                ) -> Iterator[tuple[FramePack, int]]:
    """Prepared images and clips packed to `max_tokens`, with the stream position after each pack."""
    for group, after in pack_samples(samples, max_tokens, position, lambda item: item.tokens, lambda item: item.key):
        yield FramePack([item.frames for item in group], [item.layout for item in group],
                        [item.caption for item in group], patch), after


# -- the tasks ---------------------------------------------------------------------------------------------

class ImageTask:
    name = "image"
    chunk_samples = 32  # prepared images per loader message (train/loader.py)

    def __init__(self, stage: TrainStageSection, losses: LossSection, embeds: bool = True, patch: int = 16):
        self.stage, self.losses, self.patch = stage, losses, patch
        self.embeds = embeds  # the AToken tokenizer; the convolutional baselines have no embedding
        self.schedule = ResolutionSchedule.of(stage.image_resolution, patch)

    def prepare(self, sample: dict, draw_key: tuple[int, int, int]) -> PreparedImage:
        """In a loader process: decode and resize to this draw of the stage's schedule (uint8)."""
        frames = scheduled_image(sample, self.schedule, draw_key)[None]  # (1, 3, H, W)
        if not self.stage.max_tokens:
            return PreparedImage(sample["__key__"], caption_of(sample), frames, None)
        frames, layout = frame_layout(frames, self.patch)
        return PreparedImage(sample["__key__"], caption_of(sample), frames, layout)

    def batches(self, samples: Iterator[tuple[int, PreparedImage]], position: int
                ) -> Iterator[tuple[ImageBatch | FramePack, int]]:
        if self.stage.max_tokens:  # variable-size images packed to a token budget
            yield from frame_packs(samples, self.stage.max_tokens, position, self.patch)
            return
        for group, after in group_samples(samples, self.stage.batch_size, position):
            sizes = {tuple(item.frames.shape) for item in group}
            if len(sizes) > 1:
                raise ValueError(f"images of {len(sizes)} sizes in one batch ({group[0].key}, ...): set the stage's "
                                 "image_resolution to one size, or max_tokens to pack them")
            yield ImageBatch(torch.cat([item.frames for item in group]), [item.caption for item in group],
                             self.patch), after

    def merge(self, batches: list) -> ImageBatch | FramePack:
        if isinstance(batches[0], FramePack):
            return FramePack.concat(batches)
        return ImageBatch(torch.cat([b.pixels for b in batches]), [c for b in batches for c in b.captions],
                          batches[0].patch)

    def counts(self, batch, parts: list[StreamPart]) -> dict[str, int]:
        counts = {"samples": batch_samples(batch), "tokens": batch_tokens(batch),
                  "perceptual": len(perceptual_choice(parts, self.losses.perceptual_samples))}
        if isinstance(batch, PackedBatch | FramePack):
            counts["values"] = real_values(batch)
        return counts

    def losses_of(self, model, micro: MicroBatch, frozen: Frozen) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L1, LPIPS, Gram, CLIP-perceptual and distillation (or sigmoid), on image batches and packed images."""
        batch, share = micro.data, micro.share
        weights = {"l1": self.losses.l1, "lpips": self.losses.lpips, "gram": self.losses.gram,
                   "clip_perceptual": self.losses.clip_perceptual}
        # The pooled embedding only when a loss reads it (no text tower: no understanding loss).
        kwargs = {"quantize": self.stage.quantize, "embed": frozen.text_encoder is not None} if self.embeds else {}
        if isinstance(batch, PackedBatch):
            out = model(batch, noise=micro.noise, **kwargs)
            rec = {"l1": packed_reconstruction(batch, out, share)}
            targets, outputs = packed_images(batch, batch.patches), packed_images(batch, out["patches"])
        else:
            out = model(batch.pixels, noise=micro.noise, **kwargs)
            rec = {"l1": (out["reconstruction"] - batch.pixels).abs().mean() * share.scale("samples")}
            targets, outputs = list(batch.pixels), list(out["reconstruction"])
        if frozen.perceptual is not None:
            chosen = perceptual_choice(micro.parts, self.losses.perceptual_samples)
            perceptual = perceptual_terms(frozen, [targets[i] for i in chosen], [outputs[i] for i in chosen])
            rec |= {name: value * share.scale("perceptual") for name, value in perceptual.items()}
        sem = semantic_terms(out, share, frozen, teacher_images=targets)
        return combine_terms(rec, sem, kl_term(out, share), self.losses, weights)


class VideoTask:
    name = "video"
    chunk_samples = 1  # a 512-px 16-frame clip is 12 MiB of uint8 frames

    def __init__(self, stage: TrainStageSection, losses: LossSection, patch: int = 16):
        self.stage, self.losses, self.patch = stage, losses, patch
        self.schedule = ResolutionSchedule.of(stage.video_resolution, patch)

    def prepare(self, sample: dict, draw_key: tuple[int, int, int]) -> PreparedImage:
        """In a loader process: decode the clip (or image) and resize to this draw of the schedule (uint8)."""
        frames, layout = frame_layout(scheduled_frames(sample, self.schedule, draw_key), self.patch)
        return PreparedImage(sample["__key__"], caption_of(sample), frames, layout)

    def batches(self, samples: Iterator[tuple[int, PreparedImage]], position: int
                ) -> Iterator[tuple[FramePack, int]]:
        yield from frame_packs(samples, self.stage.video_max_tokens, position, self.patch)

    def merge(self, batches: list[FramePack]) -> FramePack:
        return FramePack.concat(batches)

    def counts(self, batch: FramePack, parts: list[StreamPart]) -> dict[str, int]:
        return {"samples": batch.num_samples, "tokens": batch_tokens(batch), "values": real_values(batch)}

    def losses_of(self, model, micro: MicroBatch, frozen: Frozen):
        """L1 over the clips' real frames and the sigmoid loss on their captions."""
        out = model(micro.data, quantize=self.stage.quantize, embed=frozen.text_encoder is not None,
                    noise=micro.noise)
        rec = {"l1": packed_reconstruction(micro.data, out, micro.share)}
        sem = semantic_terms(out, micro.share, frozen)
        return combine_terms(rec, sem, kl_term(out, micro.share), self.losses, {"l1": self.losses.l1})


class ObjectTask:
    name = "3d"
    chunk_samples = 1  # an asset's input views are float (16 x 256² x 3: 12 MiB; TRELLIS's 150 x 512²: 470 MiB)
    # Tagged on the training run (atoken.3d_render_loss). The sample's `views` are its input views; its
    # evaluation views (`eval_views`, what render_3d scores) are never read here, so evaluation stays held out.
    RENDER_LOSS_VIEWS = "input views only (the sample's views, which the voxel features come from); never eval_views"

    def __init__(self, stage: TrainStageSection, losses: LossSection, patch_dim: int = 3072):
        self.stage, self.losses, self.patch_dim = stage, losses, patch_dim

    def prepare(self, sample: dict, draw_key: tuple[int, int, int]) -> PreparedObject:
        """In a loader process: the asset's voxel tokens and its input views."""
        from atoken.preprocess.objects import load_object_sample

        arrays = load_object_sample(sample["npz"])
        if "views" not in arrays:
            raise ValueError(f"3D sample {sample['__key__']} carries no views: preprocess it with its views "
                             "kept (the render loss needs them)")
        features = torch.from_numpy(arrays["features"].astype(np.float32))  # (V, 768) in [-1, 1]
        tokens = voxel_tokens(torch.from_numpy(arrays["voxels"].astype(np.int64)), features, self.patch_dim)
        # `views`/`c2w`: the input views. A sample's eval_views/eval_c2w stay unread (RENDER_LOSS_VIEWS).
        c2w = torch.from_numpy(arrays["c2w"]).float()  # (N, 4, 4)
        intrinsics = torch.from_numpy(arrays["intrinsics"]).float()  # (3, 3): one camera model for all
        target = composite_views(arrays["views"])  # (N, H, W, 3)
        if self.stage.render_size and self.stage.render_size != target.shape[2]:
            target, intrinsics = resize_views(target, intrinsics, self.stage.render_size)
        views = {"target": target, "c2w": c2w, "intrinsics": intrinsics.expand(c2w.shape[0], 3, 3).contiguous()}
        return PreparedObject(sample["__key__"], caption_of(sample), tokens, views)

    def batches(self, samples: Iterator[tuple[int, PreparedObject]], position: int
                ) -> Iterator[tuple[ObjectBatch, int]]:
        for group, after in group_samples(samples, self.stage.objects_per_batch, position):
            packed = pack([item.tokens for item in group])
            packed.captions = [item.caption for item in group]
            yield ObjectBatch(packed, [item.views for item in group]), after

    def merge(self, batches: list[ObjectBatch]) -> ObjectBatch:
        return ObjectBatch(concat_packed([b.packed for b in batches]), [v for b in batches for v in b.views])

    def counts(self, batch: ObjectBatch, parts: list[StreamPart]) -> dict[str, int]:
        return {"samples": batch.samples, "tokens": batch.tokens}

    def losses_of(self, model, micro: MicroBatch, frozen: Frozen):
        """L1 over voxel features, the Gaussian render loss at `render_views` of the input views, the sigmoid loss."""
        batch, share = micro.data, micro.share
        out = model(batch.packed, quantize=self.stage.quantize, embed=frozen.text_encoder is not None,
                    noise=micro.noise)
        feature_values = 768  # a voxel's feature is one 16x16 RGB patch; the rest of its 3072 is padding
        l1 = (out["patches"][:, :feature_values] - batch.packed.patches[:, :feature_values]).abs().mean()
        rec = {"l1": l1 * share.scale("tokens")}
        gaussians = out["gaussians"]
        # Gaussians come per token, in token order: an asset's are one slice (host arithmetic, no mask).
        per_token = gaussians["means"].shape[0] // batch.packed.patches.shape[0]
        starts = [0, *itertools.accumulate(count * per_token for count in tokens_per_sample(batch.packed))]
        render_terms: list[dict[str, torch.Tensor]] = []
        render_weights = {"render_l1": self.losses.render_l1, "render_lpips": self.losses.render_lpips,
                          "render_ssim": self.losses.render_ssim}
        asset_parts = [seed for part, seed in zip(micro.parts, micro.view_seeds, strict=True)
                       for _ in range(part.samples)]
        generators: dict[int, torch.Generator] = {}
        for asset, view in enumerate(batch.views):
            count = view["c2w"].shape[0]
            # Input views drawn from the asset's stream generator: the same views on any worker layout, and on
            # a resumed run.
            seed = asset_parts[asset]
            generator = generators.setdefault(seed, torch.Generator().manual_seed(seed))
            chosen = torch.randperm(count, generator=generator)[: min(self.stage.render_views, count)].tolist()
            mine = {k: v[starts[asset]:starts[asset + 1]] for k, v in gaussians.items() if k != "token_index"}
            target = view["target"][chosen]  # (v, H, W, 3)
            with full_precision():
                rendered = render_views(mine, view["c2w"][chosen], view["intrinsics"][chosen], target.shape[2],
                                        target.shape[1])
                render_terms.append(gaussian_render_loss(rendered, target, frozen.perceptual, render_weights))
        for name in render_terms[0]:
            rec[name] = torch.stack([terms[name] for terms in render_terms]).mean() * share.scale("samples")
        sem = semantic_terms(out, share, frozen)
        return combine_terms(rec, sem, kl_term(out, share), self.losses, {"l1": self.losses.l1, **render_weights})


def build_tasks(stage: TrainStageSection, losses: LossSection, embeds: bool = True, patch: int = 16
                ) -> dict[str, object]:
    """One task per distinct name of the stage's round-robin; `embeds`: the model has an understanding head;
    `patch`: the model's patch size (packed samples are cut into it)."""
    tasks: dict[str, object] = {}
    for name in dict.fromkeys(stage.tasks):
        if name == "image":
            tasks[name] = ImageTask(stage, losses, embeds, patch)
        elif name == "video":
            tasks[name] = VideoTask(stage, losses, patch)
        else:
            tasks[name] = ObjectTask(stage, losses)
    return tasks


def micro_batch(task, batch, parts: list[StreamPart], seed: int, slot: int, step: int, world_size: int,
                device: torch.device, group=None) -> MicroBatch:
    """The micro-batch of one task slot at one step, on the device, with its draws and its global share
    (`group`: the gloo group its host-object collective runs on)."""
    captions = batch.captions if isinstance(batch, ImageBatch) else (
        (batch.packed if isinstance(batch, ObjectBatch) else batch).captions or [])
    share = world_share(captions, task.counts(batch, parts), world_size, group)
    noise = StreamNoise(parts, [part_seed(seed, slot, p.stream, step, 0) for p in parts])
    return MicroBatch(batch.to(device), parts, noise, [part_seed(seed, slot, p.stream, step, 1) for p in parts],
                      share)
