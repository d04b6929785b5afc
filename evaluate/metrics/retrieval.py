"""Cross-modal retrieval recall R@K (text → image / video and back), by caption identity.

A query counts as a hit at K if any relevant item is among its K most similar gallery items (cosine,
ties broken by gallery order). Relevance is caption identity: the texts are the distinct captions, and an
image is relevant to a text if it carries that caption. With one caption per item and all distinct, this
is the usual R@K of COCO / MSR-VTT retrieval; with repeated captions (class names) it stays well defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

KS = (1, 5, 10)


def recall_at_k(
    queries: torch.Tensor, gallery: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = KS
) -> dict[str, float]:
    """queries (Q, D), gallery (G, D), relevant (Q, G) bool → {"R@1": ..., "R@5": ..., "R@10": ...}."""
    if queries.shape[-1] != gallery.shape[-1]:
        raise ValueError(f"retrieval: queries are {queries.shape[-1]}-d, the gallery {gallery.shape[-1]}-d")
    if relevant.shape != (len(queries), len(gallery)):
        raise ValueError(
            f"retrieval: relevance must be (queries, gallery) = {(len(queries), len(gallery))}, "
            f"got {tuple(relevant.shape)}"
        )
    similarity = F.normalize(queries.double(), dim=-1) @ F.normalize(gallery.double(), dim=-1).T  # (Q, G)
    order = torch.sort(similarity, dim=-1, descending=True, stable=True).indices  # (Q, G)
    hits = torch.gather(relevant.bool(), 1, order)  # (Q, G): relevance in ranked order
    return {f"R@{k}": float(hits[:, :k].any(dim=-1).double().mean()) for k in ks}


def caption_retrieval(
    item_embeddings: torch.Tensor, captions: Sequence[str], text_embeddings_of: callable
) -> tuple[dict[str, float], int]:
    """Items (N, D) with their captions → ({"text_to_item_R@k", "item_to_text_R@k"}, number of distinct texts).

    `text_embeddings_of(list[str]) → (M, D)` embeds the distinct captions (the frozen text encoder)."""
    texts = sorted(set(captions))
    if len(texts) < 2:
        raise ValueError(f"retrieval needs at least 2 distinct captions, got {len(texts)}")
    text_embeddings = text_embeddings_of(texts)  # (M, D)
    relevant = torch.tensor([[caption == text for caption in captions] for text in texts])  # (M, N)
    recall = {f"text_to_item_{k}": v for k, v in recall_at_k(text_embeddings, item_embeddings, relevant).items()}
    recall |= {f"item_to_text_{k}": v for k, v in recall_at_k(item_embeddings, text_embeddings, relevant.T).items()}
    return recall, len(texts)
