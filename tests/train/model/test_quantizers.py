"""train/model/quantizers.py: the KL head against torch.distributions, FSQ's grid, codes and gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from atoken.train.model.quantizers import FSQ, KLHead


def test_kl_head_shapes_and_logvar_clamp():
    head = KLHead(width=16, latent_channels=4)
    with torch.no_grad():
        head.proj.bias[4:] = 100.0  # push logvar far above the clamp
    mean, logvar = head(torch.randn(10, 16))
    assert mean.shape == logvar.shape == (10, 4)
    assert torch.all(logvar <= 20.0) and torch.all(logvar >= -30.0)
    assert torch.all(logvar == 20.0)


def test_kl_is_zero_for_the_prior():
    zeros = torch.zeros(7, 5)
    assert KLHead.kl(zeros, zeros).item() == 0.0


def test_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 32, generator=generator, dtype=torch.float64) * 2
    logvar = torch.randn(64, 32, generator=generator, dtype=torch.float64) * 3
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(KLHead.kl(mean, logvar), expected, rtol=1e-12, atol=1e-12)


def test_sample_has_the_posterior_mean_and_std():
    n = 200_000
    mean = torch.tensor([[-2.0, 0.0, 3.0]]).expand(n, 3)
    logvar = torch.log(torch.tensor([[0.25, 1.0, 4.0]])).expand(n, 3)
    z = KLHead.sample(mean, logvar, generator=torch.Generator().manual_seed(1))  # (n, 3)
    # Standard errors are std/sqrt(n) ≤ 0.0045 for the mean: 0.02 is over 4 of them.
    torch.testing.assert_close(z.mean(0), torch.tensor([-2.0, 0.0, 3.0]), rtol=0, atol=0.02)
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 1.0, 2.0]), rtol=0.01, atol=0)
    # Seeded: the same generator state gives the same draw.
    again = KLHead.sample(mean, logvar, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, again)


def test_sample_passes_gradients_to_mean_and_logvar():
    mean = torch.zeros(4, 3, requires_grad=True)
    logvar = torch.zeros(4, 3, requires_grad=True)
    KLHead.sample(mean, logvar, generator=torch.Generator().manual_seed(2)).sum().backward()
    assert torch.equal(mean.grad, torch.ones(4, 3))
    assert logvar.grad.abs().sum() > 0


@pytest.fixture
def fsq():
    return FSQ()


def test_fsq_has_no_parameters_and_no_state(fsq):
    assert list(fsq.parameters()) == []
    assert fsq.state_dict() == {}
    assert fsq.codebook_size == 4096


def test_fsq_codes_are_in_range_and_invert_exactly(fsq):
    latent = torch.randn(5000, 48, generator=torch.Generator().manual_seed(3)) * 2
    quantized, codes = fsq(latent)
    assert quantized.shape == (5000, 48) and codes.shape == (5000, 8) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 4096
    assert torch.equal(fsq.codes_to_latent(codes), quantized)


def test_fsq_values_lie_on_the_symmetric_level_grid(fsq):
    latent = torch.randn(2000, 48, generator=torch.Generator().manual_seed(4)) * 3
    quantized, _ = fsq(latent)
    grid = torch.tensor([-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0], dtype=torch.float64)
    distance = (quantized.double()[..., None] - grid).abs()  # (N, C, 4)
    assert distance.min(-1).values.max() < 1e-7  # every value is a grid point (up to float32 rounding of 1/3)
    assert quantized.min() == -1.0 and quantized.max() == 1.0
    # Each value is the grid point nearest to tanh(latent).
    nearest = (torch.tanh(latent.double())[..., None] - grid).abs().argmin(-1)
    assert torch.equal(distance.argmin(-1), nearest)


def test_fsq_every_code_of_a_group_is_reachable(fsq):
    grid = torch.tensor([-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0])
    # All 4**6 level combinations, as latents placed on the grid (atanh of a point just inside ±1).
    combos = torch.tensor(list(itertools.product(range(4), repeat=6)))  # (4096, 6)
    latent_group = torch.atanh(grid[combos].clamp(-0.999, 0.999))  # (4096, 6)
    latent = latent_group.repeat(1, 8)  # (4096, 48): every group sees every combination
    _, codes = fsq(latent)
    for group in range(8):
        assert torch.equal(codes[:, group].sort().values, torch.arange(4096))


def test_fsq_codes_to_latent_round_trips_every_code(fsq):
    codes = torch.arange(4096).unsqueeze(1).repeat(1, 8)  # (4096, 8)
    latent = fsq.codes_to_latent(codes)
    _, again = fsq(latent)
    assert torch.equal(again, codes)


def test_fsq_is_idempotent_on_quantized_inputs(fsq):
    latent = torch.randn(3000, 48, generator=torch.Generator().manual_seed(5)) * 2
    quantized, codes = fsq(latent)
    requantized, recodes = fsq(quantized)
    assert torch.equal(requantized, quantized)
    assert torch.equal(recodes, codes)


def test_fsq_rounding_has_identity_gradient(fsq):
    latent = torch.randn(64, 48, generator=torch.Generator().manual_seed(6))
    # Straight through the rounding: d quantized / d bounded is the identity.
    bounded = fsq.bound(latent.view(64, 8, 6)).detach().requires_grad_()
    fsq.round_to_levels(bounded)[0].sum().backward()
    assert torch.equal(bounded.grad, torch.ones_like(bounded))
    # End to end the gradient is the bound's own, 1 - tanh², so the encoder is pulled back into range.
    latent.requires_grad_()
    fsq(latent)[0].sum().backward()
    torch.testing.assert_close(latent.grad, 1 - torch.tanh(latent.detach()) ** 2)


def test_fsq_rejects_a_mismatched_layout():
    with pytest.raises(ValueError, match="channels"):
        FSQ(channels=32, groups=8, levels=(4, 4, 4, 4, 4, 4))
