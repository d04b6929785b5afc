"""The frozen networks of the losses, built once per worker: text tower, perceptual network, teacher.

On GPU they are held in bf16 (half the memory; they run under bf16 autocast or cast their inputs); a SigLIP2
folder named as teacher, text tower and CLIP-perceptual tower at once is read once (`frozen_hf_model`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from atoken.pipeline.config import LossSection

# Distinct captions whose embeddings a worker keeps: class names repeat and stay; captions that never repeat
# (file names, Objaverse titles) pass through without growing memory with the samples seen
# (800k × 1152 float32 would be 3.7 GB per GPU).
TEXT_CACHE_SIZE = 8192


def frozen_dtype(device: torch.device, bf16: bool) -> torch.dtype:
    """bf16 on GPU when the stage trains in bf16 (half the memory); float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and bf16 else torch.float32


class Frozen:
    def __init__(self, losses: LossSection, device: torch.device, need_perceptual: bool, need_text: bool,
                 bf16: bool = False):
        from atoken.train.losses.perceptual import PerceptualLosses
        from atoken.train.losses.towers import ImageTower
        from atoken.train.model.text_encoder import TextEncoder

        self.losses = losses
        self.device = device
        dtype = frozen_dtype(device, bf16)
        # Built at their placement, never moved after: the Hugging Face towers are shared per process and
        # placement (frozen_hf_model), and moving one would move the evaluation's copy with it.
        place = str(device), dtype
        self.text_encoder = TextEncoder.from_path(losses.text_encoder, 64, *place) if need_text else None
        self.perceptual = (PerceptualLosses(losses.perceptual_resolution, losses.lpips_backbone,
                                            losses.vision_tower, *place).to(device, dtype)
                           if need_perceptual else None)
        self.teacher = ImageTower.from_path(losses.teacher, *place) if losses.teacher and need_text else None
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def text(self, captions: list[str]) -> torch.Tensor:
        """(S, D) unit text embeddings of this worker's captions (the global batch's are gathered from every
        worker: `WorldShare.gather_rows`), each distinct caption embedded once while it stays in the cache."""
        for caption in dict.fromkeys(captions):
            if caption in self._text_cache:
                self._text_cache.move_to_end(caption)
                continue
            # One caption at a time: padded beside others its embedding moves in the last bits, and which
            # captions share a batch depends on where a run started, so a resumed run would drift.
            self._text_cache[caption] = self.text_encoder([caption])[0]
            if len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
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
