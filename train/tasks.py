"""The curriculum's tasks: where each micro-batch comes from and which loss terms it pays (spec: losses).

    image  reconstruction (L1, LPIPS, Gram, CLIP-perceptual) + understanding (distillation, or sigmoid without a
           teacher)
    video  reconstruction (L1 over real frames) + understanding (sigmoid)
    3d     reconstruction (L1 over voxel features, Gaussian render loss at held-out views) + understanding (sigmoid)

Every task's total is 0.2·L_rec + 1.0·L_sem + 1e-8·L_KL (weights from train.losses). Each task reads its own
stream of shards with its own position, so a resumed stage sees the same micro-batches of every task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from atoken.pipeline.config import LossSection, TrainStageSection
from atoken.pipeline.storage import Storage
from atoken.train.data import ShardInfo, ShardStream, caption_of, decode_image
from atoken.train.losses.reconstruction import packed_reconstruction_losses
from atoken.train.losses.render import composite_views, gaussian_render_loss, render_views, resize_views
from atoken.train.losses.semantic import caption_matches, distillation_loss, sigmoid_loss
from atoken.train.model.quantizers import KLHead
from atoken.train.model.tokens import PackedBatch, pack, voxel_tokens


@dataclass
class TaskShards:
    """The train shards of each modality (empty when the run has no such ingest stage)."""
    image: list[ShardInfo] = field(default_factory=list)
    video: list[ShardInfo] = field(default_factory=list)
    objects: list[ShardInfo] = field(default_factory=list)


@dataclass
class ImageBatch:
    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    captions: list[str]

    def to(self, device: torch.device) -> ImageBatch:
        return ImageBatch(self.pixels.to(device), self.captions)

    @property
    def tokens(self) -> int:
        return self.pixels.shape[0] * (self.pixels.shape[2] // 16) * (self.pixels.shape[3] // 16)


@dataclass
class ObjectBatch:
    packed: PackedBatch  # voxel tokens of every asset
    views: list[dict[str, torch.Tensor]]  # per asset: target (V, H, W, 3) in [0, 1], c2w (V, 4, 4), intrinsics

    def to(self, device: torch.device) -> ObjectBatch:
        return ObjectBatch(self.packed.to(device), [{k: v.to(device) for k, v in view.items()} for view in self.views])

    @property
    def tokens(self) -> int:
        return self.packed.patches.shape[0]


class Frozen:
    """The frozen networks of the losses, built once per worker: text encoder, perceptual net, teacher."""

    def __init__(self, losses: LossSection, device: torch.device, need_perceptual: bool, need_text: bool):
        from atoken.train.losses.perceptual import PerceptualLosses
        from atoken.train.losses.towers import ImageTower
        from atoken.train.model.text_encoder import TextEncoder

        self.losses = losses
        self.device = device
        self.text_encoder = TextEncoder.from_path(losses.text_encoder).to(device) if need_text else None
        self.perceptual = (PerceptualLosses(losses.perceptual_resolution, losses.lpips_backbone,
                                            losses.vision_tower).to(device) if need_perceptual else None)
        self.teacher = ImageTower.from_path(losses.teacher).to(device) if losses.teacher and need_text else None
        self._text_cache: dict[str, torch.Tensor] = {}

    def text(self, captions: list[str]) -> torch.Tensor:
        """(S, D) unit text embeddings; each distinct caption is embedded once per worker (class names repeat)."""
        for caption in dict.fromkeys(captions):
            if caption not in self._text_cache:
                # One caption at a time: padded beside others its embedding moves in the last bits, and which
                # captions share a batch depends on where a run started, so a resumed run would drift.
                self._text_cache[caption] = self.text_encoder([caption])[0]
        return torch.stack([self._text_cache[c] for c in captions])

    def stand_ins(self) -> dict[str, str]:
        """What in this stage is not the paper's network: written as MLflow tags on the stage's run."""
        tags = {}
        if self.perceptual is not None:
            tags.update({f"stand_in.{k}": v for k, v in self.perceptual.stand_ins.items()})
        if self.text_encoder is not None and self.text_encoder.is_stand_in:
            tags["stand_in.text_encoder"] = f"{self.text_encoder.name} (sentence encoder), not SigLIP2's text tower"
        if self.text_encoder is not None and self.teacher is None:
            tags["stand_in.image_semantic"] = "sigmoid loss on captions: no SigLIP2 teacher for distillation"
        return tags


def _kl(out: dict) -> torch.Tensor:
    return KLHead.kl(out["mean"], out["logvar"])


def _combine(rec: dict[str, torch.Tensor], sem: dict[str, torch.Tensor], kl: torch.Tensor, losses: LossSection,
             rec_weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    reconstruction = sum(rec_weights[name] * value for name, value in rec.items())
    semantic = sum(sem.values()) if sem else kl.new_zeros(())
    total = losses.reconstruction * reconstruction + losses.semantic * semantic + losses.kl * kl
    return total, {**rec, **sem, "kl": kl, "reconstruction": reconstruction, "semantic": semantic, "total": total}


def _semantic(embedding: torch.Tensor | None, captions: list[str], frozen: Frozen, model, teacher_pixels=None
              ) -> dict[str, torch.Tensor]:
    if embedding is None or frozen.text_encoder is None or len(captions) < 2:
        return {}
    text = frozen.text(captions).to(embedding.dtype)  # (S, D)
    if embedding.shape[-1] != text.shape[-1]:
        raise ValueError(f"the tokenizer embeds to {embedding.shape[-1]} dims, the text encoder to {text.shape[-1]}: "
                         f"set train.model.text_dim: {text.shape[-1]}")
    if teacher_pixels is not None and frozen.teacher is not None:
        distinct = list(dict.fromkeys(captions))
        with torch.no_grad():
            teacher = frozen.teacher(teacher_pixels)  # (S, D)
        return {"distillation": distillation_loss(embedding, teacher, frozen.text(distinct).to(embedding.dtype),
                                                  frozen.losses.distillation_temperature,
                                                  frozen.teacher.similarity_scale)}
    return {"sigmoid": sigmoid_loss(embedding, text, caption_matches(captions), model.logit_scale, model.logit_bias)}


def _packed_losses(model, raw_model, batch: PackedBatch, frozen: Frozen, stage: TrainStageSection,
                   losses: LossSection, weights: dict[str, float], embed: bool
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Packed images and clips: L1 over their real patches, the sigmoid loss on their captions, KL."""
    out = model(batch, quantize=stage.quantize, embed=embed)
    rec = packed_reconstruction_losses(batch, out["patches"], out["mean"], out["logvar"])
    rec.pop("kl")
    sem = _semantic(out.get("embedding"), batch.captions or [], frozen, raw_model)
    return _combine(rec, sem, _kl(out), losses, weights)


class ImageTask:
    name = "image"

    def __init__(self, stage: TrainStageSection, losses: LossSection):
        self.stage, self.losses = stage, losses

    def batches(self, stream: ShardStream, position: int) -> Iterator[tuple[ImageBatch | PackedBatch, int]]:
        if self.stage.max_tokens:  # variable-size images packed to a token budget
            yield from stream.packed_batches(self.stage.max_tokens, position=position)
            return
        samples = stream.samples(position)
        while True:
            chunk = [next(samples) for _ in range(self.stage.batch_size)]
            position += len(chunk)
            yield ImageBatch(torch.stack([decode_image(s) for s in chunk]), [caption_of(s) for s in chunk]), position

    def losses_of(self, model, raw_model, batch, frozen: Frozen) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = {"l1": self.losses.l1, "lpips": self.losses.lpips, "gram": self.losses.gram,
                   "clip_perceptual": self.losses.clip_perceptual}
        semantic_model = hasattr(raw_model, "embed")
        if isinstance(batch, PackedBatch):
            return _packed_losses(model, raw_model, batch, frozen, self.stage, self.losses, weights, semantic_model)
        kwargs = {"quantize": self.stage.quantize, "embed": True} if semantic_model else {}
        out = model(batch.pixels, **kwargs)
        rec = {"l1": (out["reconstruction"] - batch.pixels).abs().mean()}
        if frozen.perceptual is not None:
            chosen = slice(0, self.losses.perceptual_samples)  # the whole batch when None
            rec |= frozen.perceptual(batch.pixels[chosen], out["reconstruction"][chosen])
        sem = _semantic(out.get("embedding"), batch.captions, frozen, raw_model, teacher_pixels=batch.pixels)
        return _combine(rec, sem, _kl(out), self.losses, weights)


class VideoTask:
    name = "video"

    def __init__(self, stage: TrainStageSection, losses: LossSection):
        self.stage, self.losses = stage, losses

    def batches(self, stream: ShardStream, position: int) -> Iterator[tuple[PackedBatch, int]]:
        yield from stream.packed_batches(self.stage.video_max_tokens, position=position)

    def losses_of(self, model, raw_model, batch: PackedBatch, frozen: Frozen):
        return _packed_losses(model, raw_model, batch, frozen, self.stage, self.losses, {"l1": self.losses.l1},
                              embed=True)


class ObjectTask:
    name = "3d"

    def __init__(self, stage: TrainStageSection, losses: LossSection, patch_dim: int = 3072):
        self.stage, self.losses, self.patch_dim = stage, losses, patch_dim

    def batches(self, stream: ShardStream, position: int) -> Iterator[tuple[ObjectBatch, int]]:
        from atoken.preprocess.objects import load_object_sample

        samples = stream.samples(position)
        while True:
            chunk = [next(samples) for _ in range(self.stage.objects_per_batch)]
            position += len(chunk)
            tokens, views = [], []
            for sample in chunk:
                arrays = load_object_sample(sample["npz"])
                if "views" not in arrays:
                    raise ValueError(f"3D sample {sample['__key__']} carries no views: preprocess it with its views "
                                     "kept (the render loss needs them)")
                features = torch.from_numpy(arrays["features"].astype(np.float32))  # (V, 768) in [-1, 1]
                tokens.append(voxel_tokens(torch.from_numpy(arrays["voxels"].astype(np.int64)), features,
                                           self.patch_dim))
                c2w = torch.from_numpy(arrays["c2w"]).float()  # (N, 4, 4)
                intrinsics = torch.from_numpy(arrays["intrinsics"]).float()  # (3, 3): one camera model for all
                target = composite_views(arrays["views"])  # (N, H, W, 3)
                if self.stage.render_size and self.stage.render_size != target.shape[2]:
                    target, intrinsics = resize_views(target, intrinsics, self.stage.render_size)
                views.append({"target": target, "c2w": c2w,
                              "intrinsics": intrinsics.expand(c2w.shape[0], 3, 3).contiguous()})
            packed = pack(tokens)
            packed.captions = [caption_of(s) for s in chunk]
            yield ObjectBatch(packed, views), position

    def losses_of(self, model, raw_model, batch: ObjectBatch, frozen: Frozen):
        out = model(batch.packed, quantize=self.stage.quantize, embed=True)
        feature_values = 768  # a voxel's feature is one 16x16 RGB patch; the rest of its 3072 is padding
        rec = {"l1": (out["patches"][:, :feature_values] - batch.packed.patches[:, :feature_values]).abs().mean()}
        gaussians = out["gaussians"]
        owner = batch.packed.sample_ids[gaussians["token_index"]]  # (M,) asset of each Gaussian
        render_terms: list[dict[str, torch.Tensor]] = []
        render_weights = {"render_l1": self.losses.render_l1, "render_lpips": self.losses.render_lpips,
                          "render_ssim": self.losses.render_ssim}
        for asset, view in enumerate(batch.views):
            count = view["c2w"].shape[0]
            # Held-out views drawn from the torch RNG (checkpointed), so a resumed run draws the same ones.
            chosen = torch.randperm(count)[: min(self.stage.render_views, count)].tolist()
            mine = {k: v[owner == asset] for k, v in gaussians.items() if k != "token_index"}
            target = view["target"][chosen]  # (v, H, W, 3)
            rendered = render_views(mine, view["c2w"][chosen], view["intrinsics"][chosen], target.shape[2],
                                    target.shape[1])
            render_terms.append(gaussian_render_loss(rendered, target, frozen.perceptual, render_weights))
        for name in render_terms[0]:
            rec[name] = torch.stack([terms[name] for terms in render_terms]).mean()
        sem = _semantic(out["embedding"], batch.packed.captions or [], frozen, raw_model)
        return _combine(rec, sem, _kl(out), self.losses, {"l1": self.losses.l1, **render_weights})


def build_tasks(stage: TrainStageSection, losses: LossSection) -> dict[str, object]:
    builders = {"image": ImageTask, "video": VideoTask, "3d": ObjectTask}
    return {name: builders[name](stage, losses) for name in dict.fromkeys(stage.tasks)}


def task_streams(tasks: dict[str, object], shards: TaskShards, storage: Storage, seed: int, rank: int,
                 world_size: int, positions: dict[str, int]) -> dict[str, Iterator]:
    """One batch iterator per task, each from its own saved position."""
    sources = {"image": shards.image, "video": shards.video, "3d": shards.objects}
    streams = {}
    for offset, (name, task) in enumerate(tasks.items()):
        if not sources[name]:
            raise ValueError(f"the {name} task has no training shards (its ingest stage wrote none)")
        # Distinct seeds per task: the same seed would walk two modalities' shards in lockstep.
        stream = ShardStream(sources[name], storage, seed + 1000 * offset, rank, world_size)
        streams[name] = task.batches(stream, positions.get(name, 0))
    return streams
