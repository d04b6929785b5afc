"""Zero-shot classification: a sample's pooled embedding against its class names' prompts, embedded by the
frozen text encoder (CLIP's protocol): the class whose prompt is nearest in cosine similarity wins."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PROMPT = "a photo of a {}."  # CLIP's single ImageNet template; prompt ensembles differ and are a protocol field


def class_prompts(class_names: Sequence[str], template: str = PROMPT) -> list[str]:
    return [template.format(name) for name in class_names]


def check_dims(embeddings: torch.Tensor, text_embeddings: torch.Tensor, what: str = "tokenizer") -> None:
    if embeddings.shape[-1] != text_embeddings.shape[-1]:
        raise ValueError(
            f"{what} embeddings are {embeddings.shape[-1]}-d but the text encoder's are "
            f"{text_embeddings.shape[-1]}-d: the pooled head must project into the text space"
        )


def zero_shot_predictions(embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """embeddings (N, D), class_embeddings (C, D) → (N, C) class indices sorted by cosine similarity, best first
    (ties keep the lower class index)."""
    check_dims(embeddings, class_embeddings)
    similarity = F.normalize(embeddings.double(), dim=-1) @ F.normalize(class_embeddings.double(), dim=-1).T  # (N, C)
    return torch.sort(similarity, dim=-1, descending=True, stable=True).indices


def zero_shot_accuracy(
    embeddings: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    class_embeddings: torch.Tensor,
    top: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy for each k ≤ the number of classes: {"top1": ..., "top5": ...}."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)  # (N,)
    if len(labels) != len(embeddings) or len(labels) == 0:
        raise ValueError(f"zero-shot needs one label per embedding, got {len(labels)} labels, {len(embeddings)} rows")
    if labels.min() < 0 or labels.max() >= len(class_embeddings):
        raise ValueError(f"zero-shot labels must index the {len(class_embeddings)} classes")
    ranked = zero_shot_predictions(embeddings, class_embeddings)  # (N, C)
    return {
        f"top{k}": float((ranked[:, :k] == labels[:, None]).any(dim=-1).double().mean())
        for k in top
        if k <= len(class_embeddings)
    }
