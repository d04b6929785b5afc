"""The loss terms the curriculum's tasks pay (train/tasks.py), each over this worker's share of the global batch
(`WorldShare`): KL, the understanding terms (distillation or sigmoid, in float32, with the global batch's captions
as negatives), the perceptual terms over images of any sizes, and the packed L1 over real pixel values."""

from __future__ import annotations

import contextlib

import torch

from atoken.pipeline.config import LossSection
from atoken.train.frozen import Frozen
from atoken.train.losses.perceptual import resize_for_features
from atoken.train.losses.semantic import caption_matches, distillation_loss, sigmoid_loss
from atoken.train.model.quantizers import KLHead
from atoken.train.model.tokens import IMAGE, FramePack, PackedBatch, tokens_per_sample, unpatchify
from atoken.train.streams import StreamPart, WorldShare


def full_precision():
    """The understanding and Gram terms in float32 under bf16 autocast: Gram entries differ by ~1e-3 and the
    sigmoid's logits are scaled by e^t up to 100, both below bf16's resolution."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def kl_term(out: dict, share: WorldShare) -> torch.Tensor:
    return KLHead.kl(out["mean"].float(), out["logvar"].float()) * share.scale("tokens")


def combine_terms(rec: dict[str, torch.Tensor], sem: dict[str, torch.Tensor], kl: torch.Tensor, losses: LossSection,
                  rec_weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    reconstruction = sum(rec_weights[name] * value for name, value in rec.items())
    semantic = sum(sem.values()) if sem else kl.new_zeros(())
    total = losses.reconstruction * reconstruction + losses.semantic * semantic + losses.kl * kl
    return total, {**rec, **sem, "kl": kl, "reconstruction": reconstruction, "semantic": semantic, "total": total}


def semantic_terms(out: dict, share: WorldShare, frozen: Frozen, teacher_images: list[torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Distillation against the teacher (images, when there is one) or the sigmoid loss, each over the global
    batch's captions; in float32."""
    embedding = out.get("embedding")
    if embedding is None or frozen.text_encoder is None or len(share.captions) < 2:
        return untouched_logits(out)
    with full_precision():
        embedding = embedding.float()
        # Each worker embeds its own captions; the global batch's are gathered (frozen: no gradient).
        text = share.gather_rows(frozen.text(share.local_captions).float())  # (S_global, D)
        if embedding.shape[-1] != text.shape[-1]:
            raise ValueError(f"the tokenizer embeds to {embedding.shape[-1]} dims, the text encoder to "
                             f"{text.shape[-1]}: set train.model.text_dim: {text.shape[-1]}")
        if teacher_images is not None and frozen.teacher is not None:
            with torch.no_grad():
                teacher = embed_by_size(frozen.teacher, teacher_images).float()  # (S, D)
            first = {caption: index for index, caption in reversed(list(enumerate(share.captions)))}
            distinct = text[sorted(first.values())]  # (C, D): every worker's distinct captions
            loss = distillation_loss(embedding, teacher, distinct, frozen.losses.distillation_temperature,
                                     frozen.teacher.similarity_scale)
            return {"distillation": loss * share.scale("samples") + untouched_logits(out).get("semantic", 0.0)}
        matches = caption_matches(share.local_captions, share.captions)  # (S_local, S_global)
        loss = sigmoid_loss(embedding, text, matches, out["logit_scale"].float(), out["logit_bias"].float())
        return {"sigmoid": loss * share.scale("samples")}


def untouched_logits(out: dict) -> dict[str, torch.Tensor]:
    """A zero that depends on the sigmoid loss's scale and bias when this micro-batch's loss does not use them
    (images with a teacher): every parameter the forward returned then has a gradient in every micro-batch,
    whatever DDP's handling of returned-but-unused outputs (torch 2.13's did not hang without it)."""
    if "logit_scale" not in out:
        return {}
    return {"semantic": 0.0 * (out["logit_scale"] + out["logit_bias"]).sum()}


def embed_by_size(tower, images: list[torch.Tensor]) -> torch.Tensor:
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


def perceptual_terms(frozen: Frozen, targets: list[torch.Tensor], outputs: list[torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """LPIPS, Gram and CLIP-perceptual over images of any sizes: each resized to perceptual_resolution first,
    then one batched call of the frozen network (not one per distinct size)."""
    size = frozen.perceptual.resolution
    target = torch.cat([resize_for_features(image[None], size) for image in targets])  # (B, 3, R, R)
    output = torch.cat([resize_for_features(image[None], size) for image in outputs])  # (B, 3, R, R)
    return frozen.perceptual(target, output)


def perceptual_choice(parts: list[StreamPart], limit: int | None) -> list[int]:
    """The images that pay the perceptual terms: the first `limit` of each stream's share (all when None), so
    the choice does not depend on how streams are spread over workers."""
    chosen, start = [], 0
    for part in parts:
        chosen.extend(range(start, start + (part.samples if limit is None else min(limit, part.samples))))
        start += part.samples
    return chosen


def packed_reconstruction(batch: PackedBatch, out: dict, share: WorldShare) -> torch.Tensor:
    """L1 over the real pixel values of a packed batch (an image's three padding frames are not compared)."""
    error = (out["patches"] - batch.patches).abs()  # (N, 3072)
    frame_values = batch.patches.shape[1] // 4
    real = torch.ones_like(error, dtype=torch.bool)
    real[batch.modality_mask(IMAGE), frame_values:] = False
    # The count from the layouts (host arithmetic): a boolean-indexed mean would wait on the device for it.
    return (error * real).sum() / real_values(batch) * share.scale("values")


def real_values(batch: PackedBatch | FramePack) -> int:
    """Pixel values the packed L1 compares (host arithmetic, no device sync)."""
    per_token = batch.patch_dim
    return sum(count * (per_token // 4 if layout.modality == IMAGE else per_token)
               for count, layout in zip(tokens_per_sample(batch), batch.layouts, strict=True))


def packed_images(batch: PackedBatch, patches: torch.Tensor) -> list[torch.Tensor]:
    """The image samples' (3, H, W) pixels out of packed (N, 3072) patches."""
    images, start = [], 0
    for count, layout in zip(tokens_per_sample(batch), batch.layouts, strict=True):
        if layout.modality == IMAGE:
            images.append(unpatchify(patches[start:start + count], layout)[0])  # (3, H, W)
        start += count
    return images
