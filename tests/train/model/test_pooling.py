"""train/model/pooling.py: the packed MAP head against transformers' SigLIP2 head run per sample."""

from __future__ import annotations

import pytest
import torch
from transformers import Siglip2VisionConfig
from transformers.models.siglip2.modeling_siglip2 import Siglip2MultiheadAttentionPoolingHead

from atoken.train.model.pooling import AttentionPooling

LENGTHS = (5, 9, 1)
WIDTH = 32


@pytest.fixture
def heads():
    torch.manual_seed(0)
    config = Siglip2VisionConfig(hidden_size=WIDTH, num_attention_heads=4, intermediate_size=64, layer_norm_eps=1e-6)
    reference = Siglip2MultiheadAttentionPoolingHead(config).eval()
    # Non-trivial biases and norm affine, so a swapped or missed parameter would show in the output.
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    ours = AttentionPooling(WIDTH, heads=4, mlp_width=64, layer_norm_eps=1e-6).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # strict: the names match one for one
    return reference, ours


def packed(lengths, generator, order=None):
    samples = [torch.randn(n, WIDTH, generator=generator) for n in lengths]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    hidden = torch.cat(samples)
    if order is not None:
        hidden, ids = hidden[order], ids[order]
    return samples, hidden, ids


def test_packed_output_matches_transformers_per_sample(heads):
    reference, ours = heads
    samples, hidden, ids = packed(LENGTHS, torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = ours(hidden, ids, num_samples=len(LENGTHS))  # (3, D)
        expected = torch.cat([reference(sample[None]) for sample in samples])  # (3, D)
    assert pooled.shape == (3, WIDTH)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)


def test_unsorted_sample_ids_give_the_same_result(heads):
    _, ours = heads
    generator = torch.Generator().manual_seed(2)
    _, hidden, ids = packed(LENGTHS, generator)
    order = torch.randperm(len(ids), generator=generator)
    with torch.no_grad():
        expected = ours(hidden, ids, num_samples=3)
        shuffled = ours(hidden[order], ids[order], num_samples=3)
    torch.testing.assert_close(shuffled, expected, rtol=0, atol=1e-6)


def test_samples_never_see_each_other(heads):
    _, ours = heads
    _, hidden, ids = packed(LENGTHS, torch.Generator().manual_seed(3))
    changed = hidden.clone()
    changed[ids == 2] = 1e3 * torch.randn(int((ids == 2).sum()), WIDTH)
    with torch.no_grad():
        before = ours(hidden, ids, num_samples=3)
        after = ours(changed, ids, num_samples=3)
    assert torch.equal(after[:2], before[:2])
    assert not torch.allclose(after[2], before[2])


def test_gradients_stay_within_a_sample(heads):
    _, ours = heads
    _, hidden, ids = packed(LENGTHS, torch.Generator().manual_seed(4))
    hidden.requires_grad_()
    ours(hidden, ids, num_samples=3)[0].sum().backward()
    assert hidden.grad[ids != 0].abs().max() == 0
    assert hidden.grad[ids == 0].abs().max() > 0


def test_an_empty_sample_stays_finite(heads):
    _, ours = heads
    _, hidden, ids = packed(LENGTHS, torch.Generator().manual_seed(5))
    with torch.no_grad():
        pooled = ours(hidden, ids, num_samples=4)  # sample 3 has no tokens
        alone = ours(hidden, ids, num_samples=3)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled[:3], alone, rtol=0, atol=1e-6)
