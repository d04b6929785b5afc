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


# Similarities are computed for a block of queries at a time: (rows, G) float64 stays under ~32 MB, where the
# whole (Q, G) matrix of 50k captions × 50k images would be 20 GB (and a dense relevance list in Python more).
BLOCK_ELEMENTS = 1 << 22


def recall_at_k(
    queries: torch.Tensor, gallery: torch.Tensor, relevant: torch.Tensor | None = None, ks: Sequence[int] = KS, *,
    query_labels: torch.Tensor | None = None, gallery_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """queries (Q, D), gallery (G, D) → {"R@1": ..., "R@5": ..., "R@10": ...}. Relevance is either a (Q, G)
    bool matrix or, in bounded memory, labels: query q is relevant to item g when query_labels[q] ==
    gallery_labels[g]. The K most similar items are taken exactly, ties going to the earlier gallery item, a
    block of queries at a time."""
    if queries.shape[-1] != gallery.shape[-1]:
        raise ValueError(f"retrieval: queries are {queries.shape[-1]}-d, the gallery {gallery.shape[-1]}-d")
    if relevant is not None and relevant.shape != (len(queries), len(gallery)):
        raise ValueError(
            f"retrieval: relevance must be (queries, gallery) = {(len(queries), len(gallery))}, "
            f"got {tuple(relevant.shape)}"
        )
    if relevant is None and (query_labels is None or gallery_labels is None):
        raise ValueError("retrieval: give a relevance matrix or query and gallery labels")
    gallery = F.normalize(gallery.double(), dim=-1)  # (G, D)
    rows = max(1, BLOCK_ELEMENTS // max(1, len(gallery)))
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), rows):
        block = F.normalize(queries[start:start + rows].double(), dim=-1)  # (b, D)
        similarity = block @ gallery.T  # (b, G)
        if relevant is not None:
            relevance = relevant[start:start + rows].bool()  # (b, G)
        else:
            relevance = query_labels[start:start + rows, None] == gallery_labels[None, :]  # (b, G)
        for k in ks:
            kth = torch.topk(similarity, min(k, similarity.shape[1]), dim=-1).values[:, -1:]  # (b, 1)
            above = similarity > kth  # (b, G): certainly in the top k
            tied = similarity == kth  # (b, G): in it by gallery order, as many as there is room for
            room = min(k, similarity.shape[1]) - above.sum(dim=-1, keepdim=True)  # (b, 1)
            taken = above | (tied & (tied.cumsum(dim=-1) <= room))  # (b, G)
            hits[k] += int((taken & relevance).any(dim=-1).sum())
    return {f"R@{k}": hits[k] / len(queries) for k in ks}


def caption_retrieval(
    item_embeddings: torch.Tensor, captions: Sequence[str], text_embeddings_of: callable
) -> tuple[dict[str, float], int]:
    """Items (N, D) with their captions → ({"text_to_item_R@k", "item_to_text_R@k"}, number of distinct texts).

    `text_embeddings_of(list[str]) → (M, D)` embeds the distinct captions (the frozen text encoder), a few
    hundred at a time."""
    texts = sorted(set(captions))
    if len(texts) < 2:
        raise ValueError(f"retrieval needs at least 2 distinct captions, got {len(texts)}")
    text_embeddings = torch.cat([text_embeddings_of(texts[start:start + 256])
                                 for start in range(0, len(texts), 256)])  # (M, D)
    index = {text: i for i, text in enumerate(texts)}
    caption_ids = torch.tensor([index[caption] for caption in captions])  # (N,)
    text_ids = torch.arange(len(texts))  # (M,)
    recall = {f"text_to_item_{k}": v for k, v in recall_at_k(
        text_embeddings, item_embeddings, query_labels=text_ids, gallery_labels=caption_ids).items()}
    recall |= {f"item_to_text_{k}": v for k, v in recall_at_k(
        item_embeddings, text_embeddings, query_labels=caption_ids, gallery_labels=text_ids).items()}
    return recall, len(texts)
