"""The curriculum's tasks: where each micro-batch comes from and which loss terms it pays (spec: losses).

    image  reconstruction (L1, LPIPS, Gram, CLIP-perceptual) + understanding (distillation, or sigmoid without a
           teacher)
    video  reconstruction (L1 over real frames) + understanding (sigmoid)
    3d     reconstruction (L1 over voxel features, Gaussian render loss at held-out views) + understanding (sigmoid)

Every task's total is 0.2·L_rec + 1.0·L_sem + 1e-8·L_KL (weights from train.losses).

Data streams, not workers, define the data. A task reads `data_streams` independent streams of shards, each with
its own position; a worker reads its contiguous share of them and concatenates their batches into one
micro-batch. Randomness (the posterior's noise, the rendered views) is drawn per stream from a generator seeded
by (seed, task slot, stream, step). So the global batch of a step, and everything drawn for it, is the same on
1 worker or N: with the losses' global normalisation (`WorldShare`) N workers train to 1 worker's weights, and a
checkpoint resumes exactly on any world size that divides the streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from atoken.pipeline.config import LossSection, TrainStageSection
from atoken.pipeline.storage import Storage
from atoken.train.data import ShardInfo, ShardStream, caption_of, decode_image
from atoken.train.losses.render import composite_views, gaussian_render_loss, render_views, resize_views
from atoken.train.losses.semantic import caption_matches, distillation_loss, sigmoid_loss
from atoken.train.model.quantizers import KLHead
from atoken.train.model.tokens import (
    IMAGE,
    PackedBatch,
    concat_packed,
    pack,
    tokens_per_sample,
    unpatchify,
    voxel_tokens,
)


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

    @property
    def samples(self) -> int:
        return self.pixels.shape[0]


@dataclass
class ObjectBatch:
    packed: PackedBatch  # voxel tokens of every asset
    views: list[dict[str, torch.Tensor]]  # per asset: target (V, H, W, 3) in [0, 1], c2w (V, 4, 4), intrinsics

    def to(self, device: torch.device) -> ObjectBatch:
        return ObjectBatch(self.packed.to(device), [{k: v.to(device) for k, v in view.items()} for view in self.views])

    @property
    def tokens(self) -> int:
        return self.packed.patches.shape[0]

    @property
    def samples(self) -> int:
        return self.packed.num_samples


class Frozen:
    """The frozen networks of the losses, built once per worker: text encoder, perceptual net, teacher."""

    def __init__(self, losses: LossSection, device: torch.device, need_perceptual: bool, need_text: bool,
                 bf16: bool = False):
        from atoken.train.losses.perceptual import PerceptualLosses
        from atoken.train.losses.towers import ImageTower
        from atoken.train.model.text_encoder import TextEncoder

        self.losses = losses
        self.device = device
        # bf16 on GPU (half the memory of every frozen copy; they run under bf16 autocast anyway), float32 on CPU.
        dtype = torch.bfloat16 if device.type == "cuda" and bf16 else torch.float32
        self.text_encoder = TextEncoder.from_path(losses.text_encoder).to(device, dtype) if need_text else None
        self.perceptual = (PerceptualLosses(losses.perceptual_resolution, losses.lpips_backbone,
                                            losses.vision_tower).to(device, dtype) if need_perceptual else None)
        self.teacher = (ImageTower.from_path(losses.teacher).to(device, dtype) if losses.teacher and need_text
                        else None)
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


# -- one micro-batch's place in the global batch --------------------------------------------------------------

@dataclass(frozen=True)
class StreamPart:
    """One data stream's share of a micro-batch: its samples and tokens sit contiguously, in stream order."""
    stream: int
    samples: int
    tokens: int


def batch_samples(batch) -> int:
    return batch.num_samples if isinstance(batch, PackedBatch) else batch.samples


def batch_tokens(batch) -> int:
    return batch.patches.shape[0] if isinstance(batch, PackedBatch) else batch.tokens


@dataclass
class WorldShare:
    """How this worker's micro-batch of a task relates to the step's global one (every worker's together).

    Loss terms are means over samples, tokens or pixel values. Each worker takes its local mean times
    `scale(kind)` = local count · world size / global count, so that the gradients DDP averages equal those of
    the global mean; one worker reading every stream gets scale 1. The understanding losses use every worker's
    captions as negatives (`captions`), as SigLIP gathers them across devices."""
    captions: list[str]  # every worker's captions, in rank order
    local_captions: list[str]
    counts: dict[str, tuple[int, int]]  # kind → (this worker's, all workers')
    world_size: int = 1

    def scale(self, kind: str) -> float:
        local, total = self.counts[kind]
        return local * self.world_size / total if total else 0.0


def world_share(captions: list[str], counts: dict[str, int], world_size: int) -> WorldShare:
    """One small collective per micro-batch (captions and counts, host objects) when there are several workers."""
    if world_size == 1:
        return WorldShare(list(captions), list(captions), {k: (v, v) for k, v in counts.items()}, 1)
    import torch.distributed as dist

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (list(captions), counts))
    every = [c for rank_captions, _ in gathered for c in rank_captions]
    totals = {kind: (counts[kind], sum(rank_counts[kind] for _, rank_counts in gathered)) for kind in counts}
    return WorldShare(every, list(captions), totals, world_size)


def part_seed(seed: int, slot: int, stream: int, step: int, purpose: int) -> int:
    """A generator seed for one stream's share of one task slot at one step: the same on any worker layout."""
    return int(np.random.SeedSequence([seed, slot, stream, step, purpose]).generate_state(1)[0])


class StreamNoise:
    """ε for the posterior draw: each stream's rows from its own generator (rows are tokens for the tokenizer,
    images for the convolutional models), so the draw is the one a worker reading that stream alone makes."""

    def __init__(self, parts: list[StreamPart], seeds: list[int]):
        self.parts, self.seeds = parts, seeds

    def __call__(self, mean: torch.Tensor) -> torch.Tensor:
        tokens, samples = sum(p.tokens for p in self.parts), sum(p.samples for p in self.parts)
        if mean.shape[0] == tokens:
            rows = [p.tokens for p in self.parts]
        elif mean.shape[0] == samples:
            rows = [p.samples for p in self.parts]
        else:
            raise ValueError(f"a posterior of {mean.shape[0]} rows fits neither {tokens} tokens nor {samples} samples")
        draws = [torch.randn((count, *mean.shape[1:]), generator=_generator(seed, mean.device), device=mean.device,
                             dtype=mean.dtype) for count, seed in zip(rows, self.seeds, strict=True)]
        return torch.cat(draws)  # like mean


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class MicroBatch:
    """What a task's `losses_of` receives: the data, its streams, this step's draws and its global share."""
    data: object  # ImageBatch | PackedBatch | ObjectBatch
    parts: list[StreamPart]
    noise: StreamNoise
    view_seeds: list[int]  # per part: the generator of the 3D task's held-out views
    share: WorldShare


def full_precision():
    """The understanding and Gram terms in float32 under bf16 autocast: Gram entries differ by ~1e-3 and the
    sigmoid's logits are scaled by e^t up to 100, both below bf16's resolution."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


# -- loss terms ---------------------------------------------------------------------------------------------

def _kl(out: dict, share: WorldShare) -> torch.Tensor:
    return KLHead.kl(out["mean"].float(), out["logvar"].float()) * share.scale("tokens")


def _combine(rec: dict[str, torch.Tensor], sem: dict[str, torch.Tensor], kl: torch.Tensor, losses: LossSection,
             rec_weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    reconstruction = sum(rec_weights[name] * value for name, value in rec.items())
    semantic = sum(sem.values()) if sem else kl.new_zeros(())
    total = losses.reconstruction * reconstruction + losses.semantic * semantic + losses.kl * kl
    return total, {**rec, **sem, "kl": kl, "reconstruction": reconstruction, "semantic": semantic, "total": total}


def _semantic(out: dict, share: WorldShare, frozen: Frozen, teacher_images: list[torch.Tensor] | None = None
              ) -> dict[str, torch.Tensor]:
    """Distillation against the teacher (images, when there is one) or the sigmoid loss, each over the global
    batch's captions; in float32."""
    embedding = out.get("embedding")
    if embedding is None or frozen.text_encoder is None or len(share.captions) < 2:
        return _untouched_logits(out)
    with full_precision():
        embedding = embedding.float()
        text_dim = frozen.text(share.captions[:1]).shape[-1]
        if embedding.shape[-1] != text_dim:
            raise ValueError(f"the tokenizer embeds to {embedding.shape[-1]} dims, the text encoder to {text_dim}: "
                             f"set train.model.text_dim: {text_dim}")
        if teacher_images is not None and frozen.teacher is not None:
            with torch.no_grad():
                teacher = _embed_by_size(frozen.teacher, teacher_images).float()  # (S, D)
            distinct = frozen.text(list(dict.fromkeys(share.captions)))  # (C, D): every worker's captions
            loss = distillation_loss(embedding, teacher, distinct, frozen.losses.distillation_temperature,
                                     frozen.teacher.similarity_scale)
            return {"distillation": loss * share.scale("samples") + _untouched_logits(out).get("semantic", 0.0)}
        matches = caption_matches(share.local_captions, share.captions)  # (S_local, S_global)
        loss = sigmoid_loss(embedding, frozen.text(share.captions), matches, out["logit_scale"].float(),
                            out["logit_bias"].float())
        return {"sigmoid": loss * share.scale("samples")}


def _untouched_logits(out: dict) -> dict[str, torch.Tensor]:
    """A zero that depends on the sigmoid loss's scale and bias when this micro-batch's loss does not use them:
    DDP saw them among the forward's outputs and waits for their gradients (zero ones, then)."""
    if "logit_scale" not in out:
        return {}
    return {"semantic": 0.0 * (out["logit_scale"] + out["logit_bias"]).sum()}


def _embed_by_size(tower, images: list[torch.Tensor]) -> torch.Tensor:
    """images: (3, H, W) each, of any sizes → (S, D), one tower call per distinct size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    out: list[torch.Tensor | None] = [None] * len(images)
    for indices in groups.values():
        embedded = tower(torch.stack([images[i] for i in indices]))  # (g, D)
        for row, index in enumerate(indices):
            out[index] = embedded[row]
    return torch.stack(out)


def _perceptual(frozen: Frozen, targets: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """LPIPS, Gram and CLIP-perceptual over images of any sizes (each resized to perceptual_resolution by the
    network): per-size batch means, weighted by their share of the images."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(targets):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    terms: dict[str, torch.Tensor] = {}
    for indices in groups.values():
        target = torch.stack([targets[i] for i in indices])  # (g, 3, H, W)
        output = torch.stack([outputs[i] for i in indices])
        group_terms = frozen.perceptual(target, output)
        for name, value in group_terms.items():
            terms[name] = terms.get(name, 0.0) + value * (len(indices) / len(targets))
    return terms


def _perceptual_choice(parts: list[StreamPart], limit: int | None) -> list[int]:
    """The images that pay the perceptual terms: the first `limit` of each stream's share (all when None), so
    the choice does not depend on how streams are spread over workers."""
    chosen, start = [], 0
    for part in parts:
        chosen.extend(range(start, start + (part.samples if limit is None else min(limit, part.samples))))
        start += part.samples
    return chosen


def _packed_reconstruction(batch: PackedBatch, out: dict, share: WorldShare) -> torch.Tensor:
    """L1 over the real pixel values of a packed batch (an image's three padding frames are not compared)."""
    error = (out["patches"] - batch.patches).abs()  # (N, 3072)
    frame_values = batch.patches.shape[1] // 4
    real = torch.ones_like(error, dtype=torch.bool)
    real[batch.modality_mask(IMAGE), frame_values:] = False
    return error[real].mean() * share.scale("values")


def real_values(batch: PackedBatch) -> int:
    """Pixel values the packed L1 compares (host arithmetic, no device sync)."""
    per_token = batch.patches.shape[1]
    return sum(count * (per_token // 4 if layout.modality == IMAGE else per_token)
               for count, layout in zip(tokens_per_sample(batch), batch.layouts, strict=True))


def _packed_images(batch: PackedBatch, patches: torch.Tensor) -> list[torch.Tensor]:
    """The image samples' (3, H, W) pixels out of packed (N, 3072) patches."""
    images, start = [], 0
    for count, layout in zip(tokens_per_sample(batch), batch.layouts, strict=True):
        if layout.modality == IMAGE:
            images.append(unpatchify(patches[start:start + count], layout)[0])  # (3, H, W)
        start += count
    return images


# -- the tasks ---------------------------------------------------------------------------------------------

class ImageTask:
    name = "image"

    def __init__(self, stage: TrainStageSection, losses: LossSection, embeds: bool = True):
        self.stage, self.losses = stage, losses
        self.embeds = embeds  # the AToken tokenizer; the convolutional baselines have no embedding

    def batches(self, stream: ShardStream, position: int) -> Iterator[tuple[ImageBatch | PackedBatch, int]]:
        if self.stage.max_tokens:  # variable-size images packed to a token budget
            yield from stream.packed_batches(self.stage.max_tokens, position=position)
            return
        samples = stream.samples(position)
        while True:
            chunk = [next(samples) for _ in range(self.stage.batch_size)]
            position += len(chunk)
            yield ImageBatch(torch.stack([decode_image(s) for s in chunk]), [caption_of(s) for s in chunk]), position

    def merge(self, batches: list) -> ImageBatch | PackedBatch:
        if isinstance(batches[0], PackedBatch):
            return concat_packed(batches)
        return ImageBatch(torch.cat([b.pixels for b in batches]), [c for b in batches for c in b.captions])

    def counts(self, batch, parts: list[StreamPart]) -> dict[str, int]:
        counts = {"samples": batch_samples(batch), "tokens": batch_tokens(batch),
                  "perceptual": len(_perceptual_choice(parts, self.losses.perceptual_samples))}
        if isinstance(batch, PackedBatch):
            counts["values"] = real_values(batch)
        return counts

    def losses_of(self, model, micro: MicroBatch, frozen: Frozen) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L1, LPIPS, Gram, CLIP-perceptual and distillation (or sigmoid), on image batches and packed images."""
        batch, share = micro.data, micro.share
        weights = {"l1": self.losses.l1, "lpips": self.losses.lpips, "gram": self.losses.gram,
                   "clip_perceptual": self.losses.clip_perceptual}
        kwargs = {"quantize": self.stage.quantize, "embed": True} if self.embeds else {}
        if isinstance(batch, PackedBatch):
            out = model(batch, noise=micro.noise, **kwargs)
            rec = {"l1": _packed_reconstruction(batch, out, share)}
            targets, outputs = _packed_images(batch, batch.patches), _packed_images(batch, out["patches"])
        else:
            out = model(batch.pixels, noise=micro.noise, **kwargs)
            rec = {"l1": (out["reconstruction"] - batch.pixels).abs().mean() * share.scale("samples")}
            targets, outputs = list(batch.pixels), list(out["reconstruction"])
        if frozen.perceptual is not None:
            chosen = _perceptual_choice(micro.parts, self.losses.perceptual_samples)
            perceptual = _perceptual(frozen, [targets[i] for i in chosen], [outputs[i] for i in chosen])
            rec |= {name: value * share.scale("perceptual") for name, value in perceptual.items()}
        sem = _semantic(out, share, frozen, teacher_images=targets)
        return _combine(rec, sem, _kl(out, share), self.losses, weights)


class VideoTask:
    name = "video"

    def __init__(self, stage: TrainStageSection, losses: LossSection):
        self.stage, self.losses = stage, losses

    def batches(self, stream: ShardStream, position: int) -> Iterator[tuple[PackedBatch, int]]:
        yield from stream.packed_batches(self.stage.video_max_tokens, position=position)

    def merge(self, batches: list[PackedBatch]) -> PackedBatch:
        return concat_packed(batches)

    def counts(self, batch: PackedBatch, parts: list[StreamPart]) -> dict[str, int]:
        return {"samples": batch.num_samples, "tokens": batch_tokens(batch), "values": real_values(batch)}

    def losses_of(self, model, micro: MicroBatch, frozen: Frozen):
        """L1 over the clips' real frames and the sigmoid loss on their captions."""
        out = model(micro.data, quantize=self.stage.quantize, embed=True, noise=micro.noise)
        rec = {"l1": _packed_reconstruction(micro.data, out, micro.share)}
        sem = _semantic(out, micro.share, frozen)
        return _combine(rec, sem, _kl(out, micro.share), self.losses, {"l1": self.losses.l1})


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

    def merge(self, batches: list[ObjectBatch]) -> ObjectBatch:
        return ObjectBatch(concat_packed([b.packed for b in batches]), [v for b in batches for v in b.views])

    def counts(self, batch: ObjectBatch, parts: list[StreamPart]) -> dict[str, int]:
        return {"samples": batch.samples, "tokens": batch.tokens}

    def losses_of(self, model, micro: MicroBatch, frozen: Frozen):
        """L1 over voxel features, the Gaussian render loss at held-out views, the sigmoid loss."""
        batch, share = micro.data, micro.share
        out = model(batch.packed, quantize=self.stage.quantize, embed=True, noise=micro.noise)
        feature_values = 768  # a voxel's feature is one 16x16 RGB patch; the rest of its 3072 is padding
        l1 = (out["patches"][:, :feature_values] - batch.packed.patches[:, :feature_values]).abs().mean()
        rec = {"l1": l1 * share.scale("tokens")}
        gaussians = out["gaussians"]
        owner = batch.packed.sample_ids[gaussians["token_index"]]  # (M,) asset of each Gaussian
        render_terms: list[dict[str, torch.Tensor]] = []
        render_weights = {"render_l1": self.losses.render_l1, "render_lpips": self.losses.render_lpips,
                          "render_ssim": self.losses.render_ssim}
        asset_parts = [seed for part, seed in zip(micro.parts, micro.view_seeds, strict=True)
                       for _ in range(part.samples)]
        generators: dict[int, torch.Generator] = {}
        for asset, view in enumerate(batch.views):
            count = view["c2w"].shape[0]
            # Held-out views from the asset's stream generator: the same views on any worker layout, and on
            # a resumed run.
            seed = asset_parts[asset]
            generator = generators.setdefault(seed, torch.Generator().manual_seed(seed))
            chosen = torch.randperm(count, generator=generator)[: min(self.stage.render_views, count)].tolist()
            mine = {k: v[owner == asset] for k, v in gaussians.items() if k != "token_index"}
            target = view["target"][chosen]  # (v, H, W, 3)
            with full_precision():
                rendered = render_views(mine, view["c2w"][chosen], view["intrinsics"][chosen], target.shape[2],
                                        target.shape[1])
                render_terms.append(gaussian_render_loss(rendered, target, frozen.perceptual, render_weights))
        for name in render_terms[0]:
            rec[name] = torch.stack([terms[name] for terms in render_terms]).mean() * share.scale("samples")
        sem = _semantic(out, share, frozen)
        return _combine(rec, sem, _kl(out, share), self.losses, {"l1": self.losses.l1, **render_weights})


def build_tasks(stage: TrainStageSection, losses: LossSection, embeds: bool = True) -> dict[str, object]:
    """One task per distinct name of the stage's round-robin; `embeds`: the model has an understanding head."""
    tasks: dict[str, object] = {}
    for name in dict.fromkeys(stage.tasks):
        if name == "image":
            tasks[name] = ImageTask(stage, losses, embeds)
        else:
            tasks[name] = {"video": VideoTask, "3d": ObjectTask}[name](stage, losses)
    return tasks


# -- data streams ------------------------------------------------------------------------------------------

def stream_key(task: str, stream: int) -> str:
    return f"{task}/{stream}"


def worker_streams(data_streams: int, rank: int, world_size: int) -> list[int]:
    """The contiguous streams a worker reads (rank order = stream order, so the global batch is the same)."""
    if data_streams % world_size:
        raise ValueError(f"{data_streams} data streams cannot be shared by {world_size} workers: set "
                         f"train.stages[].data_streams to a multiple of num_workers")
    per_worker = data_streams // world_size
    return list(range(rank * per_worker, (rank + 1) * per_worker))


class TaskStreams:
    """Every task's streams on this worker: `next(task)` gives one micro-batch (its streams' batches merged)
    and advances their positions, keyed `task/stream` (world-size independent)."""

    def __init__(self, tasks: dict[str, object], shards: TaskShards, storage: Storage, seed: int, streams: list[int],
                 data_streams: int, positions: dict[str, int]):
        sources = {"image": shards.image, "video": shards.video, "3d": shards.objects}
        self.tasks, self.streams = tasks, streams
        self.positions = {stream_key(name, s): positions.get(stream_key(name, s), 0) for name in tasks for s in streams}
        self.iterators: dict[str, Iterator] = {}
        for offset, (name, task) in enumerate(tasks.items()):
            if not sources[name]:
                raise ValueError(f"the {name} task has no training shards (its ingest stage wrote none)")
            for stream in streams:
                # Distinct seeds per task: the same seed would walk two modalities' shards in lockstep.
                source = ShardStream(sources[name], storage, seed + 1000 * offset, stream, data_streams)
                key = stream_key(name, stream)
                self.iterators[key] = task.batches(source, self.positions[key])

    def next(self, name: str) -> tuple[object, list[StreamPart]]:
        batches, parts = [], []
        for stream in self.streams:
            key = stream_key(name, stream)
            batch, self.positions[key] = next(self.iterators[key])
            batches.append(batch)
            parts.append(StreamPart(stream, batch_samples(batch), batch_tokens(batch)))
        merged = batches[0] if len(batches) == 1 else self.tasks[name].merge(batches)
        return merged, parts


def micro_batch(task, batch, parts: list[StreamPart], seed: int, slot: int, step: int, world_size: int,
                device: torch.device) -> MicroBatch:
    """The micro-batch of one task slot at one step, on the device, with its draws and its global share."""
    captions = batch.captions if isinstance(batch, ImageBatch) else (
        (batch.packed if isinstance(batch, ObjectBatch) else batch).captions or [])
    share = world_share(captions, task.counts(batch, parts), world_size)
    noise = StreamNoise(parts, [part_seed(seed, slot, p.stream, step, 0) for p in parts])
    return MicroBatch(batch.to(device), parts, noise, [part_seed(seed, slot, p.stream, step, 1) for p in parts],
                      share)
