"""train/model/conv_vae.py: the evaluation's conventional baseline keeps the image contract at 16x compression."""

from __future__ import annotations

import pytest
import torch

from atoken.pipeline.config import ModelSection
from atoken.train.model import ConvVAE, build_model


def test_sixteen_times_compression_and_the_image_contract():
    model = build_model(ModelSection(kind="conv_vae", hidden_channels=8, latent_channels=32))
    assert isinstance(model, ConvVAE)
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    out = model(pixels, sample=False)
    assert out["mean"].shape == (2, 32, 4, 3) and out["logvar"].shape == (2, 32, 4, 3)
    assert out["reconstruction"].shape == pixels.shape
    torch.testing.assert_close(out["reconstruction"], model.decode(model.encode(pixels)[0]))
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(torch.zeros(1, 3, 40, 64))


def test_it_learns_an_image_in_a_few_steps():
    torch.manual_seed(0)
    model = ConvVAE(hidden_channels=8, latent_channels=16)
    target = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (model(target, sample=False)["reconstruction"] - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
