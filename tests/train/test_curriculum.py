"""The curriculum's pieces: latent growth between stages, optimizer groups, EMA."""

from __future__ import annotations

import pytest
import torch

from atoken.pipeline.config import ModelSection, TrainStageSection
from atoken.train.checkpoint import grow_state
from atoken.train.model import build_model
from atoken.train.model.tokens import pack_images
from atoken.train.optim import EMA, parameter_groups


def tiny(latent: int):
    torch.manual_seed(latent)
    return build_model(ModelSection(kind="atoken", preset="tiny", patch_size=16, latent_channels=latent,
                                    text_dim=8, gaussians_per_voxel=2, voxel_grid=16))


def test_growing_the_latent_keeps_what_stage_one_learnt():
    small, large = tiny(32), tiny(48)
    state, grown = grow_state(small.state_dict(), large.state_dict())
    large.load_state_dict(state)
    assert set(grown) == {"kl.proj.weight", "kl.proj.bias", "decoder_in.weight"}
    batch = pack_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    with torch.no_grad():
        old, new = small.encode(batch), large.encode(batch)
        # The old channels' posterior is unchanged, mean and logvar alike.
        assert torch.allclose(new["mean"][:, :32], old["mean"], atol=1e-6)
        assert torch.allclose(new["logvar"][:, :32], old["logvar"], atol=1e-6)
        # Whatever the new channels hold, the decoder sees only the old ones until it learns otherwise.
        latent = torch.cat([old["mean"], torch.randn(old["mean"].shape[0], 16)], dim=1)
        assert torch.allclose(large.decode(latent, batch)["patches"], small.decode(old["mean"], batch)["patches"],
                              atol=1e-5)


def test_growth_refuses_to_shrink_or_rename():
    small, large = tiny(32), tiny(48)
    with pytest.raises(ValueError, match="cannot grow"):
        grow_state(large.state_dict(), small.state_dict())
    renamed = {("x." + k if k.startswith("head.") else k): v for k, v in small.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        grow_state(renamed, large.state_dict())


def test_encoder_learns_at_its_scale_and_gains_are_not_decayed():
    model = tiny(32)
    stage = TrainStageSection(lr=1e-3, encoder_lr_scale=0.1, weight_decay=0.1)
    groups = parameter_groups(model, stage)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["encoder.layers.0.self_attn.q_proj.weight"])]["lr_scale"] == 0.1
    assert by_id[id(named["decoder_in.weight"])]["lr_scale"] == 1.0
    assert by_id[id(named["decoder_in.weight"])]["weight_decay"] == 0.1
    assert by_id[id(named["post_layernorm.weight"])]["weight_decay"] == 0.0
    assert by_id[id(named["logits.scale"])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_ema_follows_the_weights_at_its_decay():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.weights["weight"], start + 0.1)
