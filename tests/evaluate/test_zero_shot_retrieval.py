"""evaluate/metrics/zero_shot.py and retrieval.py against brute-force references written independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atoken.evaluate.metrics.retrieval import caption_retrieval, recall_at_k
from atoken.evaluate.metrics.zero_shot import class_prompts, zero_shot_accuracy


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def brute_force_top_k(embeddings: np.ndarray, labels: list[int], classes: np.ndarray, k: int) -> float:
    """Loops and Python sorting: for each sample, the k classes of highest cosine (ties: lower index first)."""
    hits = 0
    for row, label in zip(embeddings, labels, strict=True):
        scores = [(-cosine(row, c), index) for index, c in enumerate(classes)]
        hits += label in [index for _, index in sorted(scores)[:k]]
    return hits / len(labels)


def brute_force_recall(queries: np.ndarray, gallery: np.ndarray, relevant: np.ndarray, k: int) -> float:
    hits = 0
    for q, row in enumerate(queries):
        ranked = [index for _, index in sorted((-cosine(row, g), index) for index, g in enumerate(gallery))]
        hits += any(relevant[q, index] for index in ranked[:k])
    return hits / len(queries)


@pytest.mark.parametrize("seed", range(4))
def test_zero_shot_accuracy_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    classes = rng.normal(size=(10, 16))
    labels = rng.integers(0, 10, 40).tolist()
    # Embeddings near their class (some far enough to be wrong), at random scales: cosine ignores the norm.
    embeddings = (classes[labels] + rng.normal(scale=1.2, size=(40, 16))) * rng.uniform(0.1, 10, (40, 1))
    got = zero_shot_accuracy(torch.from_numpy(embeddings).float(), labels, torch.from_numpy(classes).float())
    assert got["top1"] == pytest.approx(brute_force_top_k(embeddings, labels, classes, 1), abs=1e-12)
    assert got["top5"] == pytest.approx(brute_force_top_k(embeddings, labels, classes, 5), abs=1e-12)
    assert 0.0 < got["top1"] < 1.0, "the case should hold both hits and misses"


def test_zero_shot_known_case_and_errors():
    classes = torch.eye(3)  # class c is axis c
    embeddings = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 5.0], [0.2, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = zero_shot_accuracy(embeddings, [0, 2, 1, 2], classes)  # the last one is wrong
    assert got == {"top1": 0.75}  # top5 is left out: only 3 classes
    with pytest.raises(ValueError, match="384-d"):
        zero_shot_accuracy(torch.zeros(2, 96), [0, 1], torch.zeros(2, 384))
    with pytest.raises(ValueError, match="index"):
        zero_shot_accuracy(embeddings, [0, 1, 2, 3], classes)
    assert class_prompts(["sandal", "bag"]) == ["a photo of a sandal.", "a photo of a bag."]


@pytest.mark.parametrize("seed", range(4))
def test_recall_at_k_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    queries, gallery = rng.normal(size=(12, 8)), rng.normal(size=(30, 8))
    relevant = rng.random((12, 30)) < 0.08
    got = recall_at_k(torch.from_numpy(queries), torch.from_numpy(gallery), torch.from_numpy(relevant))
    for k in (1, 5, 10):
        assert got[f"R@{k}"] == pytest.approx(brute_force_recall(queries, gallery, relevant, k), abs=1e-12)
    assert got["R@1"] <= got["R@5"] <= got["R@10"]


def test_caption_retrieval_with_repeated_and_unique_captions():
    # Three items: two "cat" pictures near the "cat" text, one "dog" picture nearer "cat" than "dog".
    texts = {"cat": torch.tensor([1.0, 0.0]), "dog": torch.tensor([0.0, 1.0])}
    items = torch.tensor([[1.0, 0.1], [0.9, 0.2], [1.0, 0.5]])
    recall, count = caption_retrieval(items, ["cat", "cat", "dog"], lambda t: torch.stack([texts[x] for x in t]))
    assert count == 2
    # text→item: "cat" finds a cat first; "dog" ranks the dog item first (cosine 0.447 > 0.217, 0.100).
    assert recall["text_to_item_R@1"] == 1.0
    # item→text: the dog item's nearest text is "cat": 2 of 3 right at 1, all within 2 texts.
    assert recall["item_to_text_R@1"] == pytest.approx(2 / 3)
    assert recall["item_to_text_R@5"] == 1.0
    with pytest.raises(ValueError, match="2 distinct captions"):
        caption_retrieval(items, ["cat"] * 3, lambda t: torch.zeros(len(t), 2))
    assert not math.isnan(recall["text_to_item_R@10"])


def test_blocked_recall_with_labels_and_ties_matches_the_dense_stable_sort(monkeypatch):
    """Blocks of 3 queries, labels instead of a dense relevance matrix, and many ties (integer embeddings):
    the same numbers as one stable sort of the whole similarity matrix."""
    import atoken.evaluate.metrics.retrieval as retrieval

    rng = np.random.default_rng(7)
    queries = torch.from_numpy(rng.integers(-1, 2, (11, 3)).astype(np.float64))
    gallery = torch.from_numpy(rng.integers(-1, 2, (40, 3)).astype(np.float64))
    query_labels, gallery_labels = torch.from_numpy(rng.integers(0, 5, 11)), torch.from_numpy(rng.integers(0, 5, 40))
    relevant = query_labels[:, None] == gallery_labels[None, :]
    similarity = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(gallery, dim=-1).T
    order = torch.sort(similarity, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(relevant, 1, order)
    expected = {f"R@{k}": float(ranked[:, :k].any(dim=-1).double().mean()) for k in (1, 5, 10)}
    monkeypatch.setattr(retrieval, "BLOCK_ELEMENTS", 3 * 40)
    got = recall_at_k(queries, gallery, query_labels=query_labels, gallery_labels=gallery_labels)
    assert got == pytest.approx(expected, abs=1e-12)
    assert len(set(similarity.flatten().tolist())) < similarity.numel() / 4, "the data must have ties"
