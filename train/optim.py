"""The optimizer's pieces of a stage: the learning-rate schedule, AdamW's parameter groups, the EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from atoken.pipeline.config import TrainStageSection

ENCODER_PREFIXES = ("embeddings.", "encoder.", "post_layernorm.")


def learning_rate(step: int, stage: TrainStageSection) -> float:
    """Linear warm-up, then cosine to 10% of the peak (the paper's 3e-4 → 3e-5 shape)."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def parameter_groups(model: torch.nn.Module, stage: TrainStageSection) -> list[dict]:
    """AdamW groups: the encoder at encoder_lr_scale (it starts from SigLIP2); no weight decay on gains, biases
    and the sigmoid loss's scale and bias (vectors and scalars), as is usual for transformers."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        key = (name.startswith(ENCODER_PREFIXES), parameter.dim() >= 2)
        groups.setdefault(key, []).append(parameter)
    return [{"params": params, "lr_scale": stage.encoder_lr_scale if encoder else 1.0,
             "weight_decay": stage.weight_decay if decays else 0.0}
            for (encoder, decays), params in sorted(groups.items())]


class EMA:
    """Exponential moving average of the weights (spec: 0.9999), kept in float32 beside the model. Under FSDP
    the averages are sharded like the weights (DTensors), so no rank holds a whole copy until `full()`."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.weights = {name: tensor.detach().float().clone() for name, tensor in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One fused lerp over every floating tensor (`_foreach_lerp_`), not a Python loop of kernels."""
        current = model.state_dict()
        floating = [name for name, tensor in current.items() if tensor.is_floating_point()]
        averages = [self.weights[name] for name in floating]
        torch._foreach_lerp_(averages, [current[name].float() for name in floating], 1.0 - self.decay)
        for name, tensor in current.items():
            if not tensor.is_floating_point():
                self.weights[name].copy_(tensor)

    def full(self) -> dict[str, torch.Tensor]:
        """Whole tensors on the CPU (a collective under FSDP: every rank calls it)."""
        return {name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()
                for name, tensor in self.weights.items()}
