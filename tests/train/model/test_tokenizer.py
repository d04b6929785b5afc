"""The AToken tokenizer against slow plain paths: SigLIP2 (transformers), per-sample runs, full-mask runs."""

from __future__ import annotations

import pytest
import torch

from atoken.train.losses.semantic import sigmoid_loss
from atoken.train.model.tokenizer import PRESETS, Tokenizer
from atoken.train.model.tokens import (
    IMAGE,
    VIDEO,
    VOXELS,
    pack,
    patchify_image,
    patchify_video,
    split_samples,
    unpatchify,
    voxel_tokens,
)

from helpers import LiveBytes


def tiny(**overrides) -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer.from_preset("tiny", depth=2, width=64, heads=2, mlp_width=128, gaussians_per_voxel=4,
                                 attention_backend="masked", **overrides).eval()


def mixed_samples(generator: torch.Generator):
    """An image, a larger image, a 9-frame video and a 3D asset of 20 voxels: every modality, mixed sizes."""
    image = torch.rand(3, 32, 48, generator=generator) * 2 - 1
    big_image = torch.rand(3, 64, 40, generator=generator) * 2 - 1  # 40 is cropped to 32
    video = torch.rand(9, 3, 32, 32, generator=generator) * 2 - 1
    voxels = torch.randint(0, 64, (20, 3), generator=generator)
    features = torch.rand(20, 768, generator=generator)
    return [patchify_image(image), patchify_image(big_image), patchify_video(video), voxel_tokens(voxels, features)]


def test_patchify_round_trip_and_layouts():
    generator = torch.Generator().manual_seed(1)
    video = torch.rand(9, 3, 40, 50, generator=generator)
    patches, coords, layout = patchify_video(video)
    assert layout.modality == VIDEO and layout.grid == (3, 2, 3) and patches.shape == (18, 3072)
    restored = unpatchify(patches, layout)  # (9, 3, 32, 48): centre crop of 40x50
    assert torch.equal(restored, video[:, :, 4:36, 1:49])
    assert coords[:, 0].max() == 2 and coords[:, 3].eq(0).all()  # z = 0 for video
    image_patches, image_coords, image_layout = patchify_image(video[0])
    assert image_layout.modality == IMAGE and image_coords[:, 0].eq(0).all()
    # frames 1-3 of an image patch are zero padding; frame 0 is laid out (h, w, c) like SigLIP2's patches
    assert image_patches[:, 768:].eq(0).all()
    first = video[0, :, 4:20, 1:17].permute(1, 2, 0).reshape(-1)
    assert torch.equal(image_patches[0, :768], first)
    voxel_patches, voxel_coords, voxel_layout = voxel_tokens(torch.tensor([[1, 2, 3]]), torch.ones(1, 768))
    assert voxel_layout.modality == VOXELS and voxel_coords.tolist() == [[0, 1, 2, 3]]
    assert voxel_patches[0, :768].eq(1).all() and voxel_patches[0, 768:].eq(0).all()


def test_packed_batch_equals_each_sample_alone():
    model = tiny()
    samples = mixed_samples(torch.Generator().manual_seed(2))
    batch = pack(samples)
    with torch.no_grad():
        packed = model.forward_packed(batch, sample=False)
        for index, sample in enumerate(samples):
            alone = model.forward_packed(pack([sample]), sample=False)
            for name in ("hidden", "mean", "patches"):
                torch.testing.assert_close(split_samples(packed[name], batch)[index], alone[name], atol=2e-5, rtol=0)
        gaussians = packed["gaussians"]
        alone = model.forward_packed(pack([samples[3]]), sample=False)["gaussians"]
        torch.testing.assert_close(gaussians["means"], alone["means"], atol=2e-5, rtol=0)
        embeddings = model.embed(batch)
        assert embeddings.shape == (4, 64)
        torch.testing.assert_close(embeddings[2], model.embed(pack([samples[2]]))[0], atol=2e-5, rtol=0)


def test_reconstruction_shapes_for_every_modality():
    model = tiny()
    samples = mixed_samples(torch.Generator().manual_seed(3))
    batch = pack(samples)
    with torch.no_grad():
        out = model.forward_packed(batch)
    per_sample = split_samples(out["patches"], batch)
    shapes = [tuple(unpatchify(p, layout).shape) for p, layout in zip(per_sample[:3], batch.layouts[:3], strict=True)]
    assert shapes == [(1, 3, 32, 48), (1, 3, 64, 32), (9, 3, 32, 32)]
    assert out["gaussians"]["means"].shape == (20 * 4, 3)
    assert out["mean"].shape == (batch.patches.shape[0], 48)


def test_flex_attention_path_matches_masked_path():
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny()
    samples = mixed_samples(torch.Generator().manual_seed(4))
    batch = pack(samples)
    with torch.no_grad():
        masked = model.encode(batch)["hidden"]
        for module in model.modules():
            if hasattr(module, "backend"):
                module.backend = "flex"
        flex = model.encode(batch)["hidden"]
    torch.testing.assert_close(flex, masked, atol=1e-4, rtol=0)


def test_tiled_video_equals_full_block_causal_run():
    model = tiny()
    generator = torch.Generator().manual_seed(5)
    long_video = torch.rand(40, 3, 32, 32, generator=generator) * 2 - 1  # 10 latent frames: 3 tiles
    batch = pack([patchify_video(long_video), patchify_image(long_video[0])])
    with torch.no_grad():
        full = model.encode(batch)
        tiled = model.encode_tiled(batch)
        torch.testing.assert_close(tiled["hidden"], full["hidden"], atol=2e-5, rtol=0)
        decoded = model.decode(full["mean"], batch)["patches"]
        torch.testing.assert_close(model.decode_tiled(full["mean"], batch), decoded, atol=2e-5, rtol=0)
        # causality: changing the last tile's frames leaves earlier tiles' outputs unchanged
        changed = long_video.clone()
        changed[32:] = 0
        other = model.encode(pack([patchify_video(changed), patchify_image(long_video[0])]))["hidden"]
    first_tiles = batch.coords[:, 0] < 8
    first_tiles[batch.sample_ids == 1] = False
    torch.testing.assert_close(other[first_tiles], full["hidden"][first_tiles], atol=1e-6, rtol=0)
    assert not torch.allclose(other[~first_tiles & (batch.sample_ids == 0)],
                              full["hidden"][~first_tiles & (batch.sample_ids == 0)])


def test_fsq_round_trip_through_the_model():
    model = tiny()
    batch = pack(mixed_samples(torch.Generator().manual_seed(6))[:2])
    with torch.no_grad():
        out = model.forward_packed(batch, sample=False, quantize=True)
    codes = out["codes"]
    assert codes.shape == (batch.patches.shape[0], 8) and codes.min() >= 0 and codes.max() < 4096
    torch.testing.assert_close(model.fsq.codes_to_latent(codes), out["latent"])
    with pytest.raises(ValueError, match="FSQ needs"):
        tiny(latent_channels=32).quantize(torch.zeros(2, 32))


def test_save_and_load_give_identical_outputs(tmp_path):
    model = tiny()
    batch = pack(mixed_samples(torch.Generator().manual_seed(7)))
    model.save_pretrained(str(tmp_path / "tok"))
    loaded = Tokenizer.from_pretrained(str(tmp_path / "tok")).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        a, b = model.forward_packed(batch, sample=False), loaded.forward_packed(batch, sample=False)
    assert torch.equal(a["patches"], b["patches"]) and torch.equal(a["gaussians"]["means"], b["gaussians"]["means"])
    assert not list(tmp_path.glob("tok/*.bin")) and not list(tmp_path.glob("tok/*.pt"))


def test_weights_written_before_the_sigmoid_logits_module_load_with_their_values(tmp_path):
    from safetensors.torch import load_file, save_file

    from atoken.pipeline.storage import Storage
    from atoken.train.checkpoint import load_model_weights

    model = tiny()
    with torch.no_grad():
        model.logits.scale.fill_(1.5)
        model.logits.bias.fill_(-3.0)
    model.save_pretrained(str(tmp_path / "tok"))
    weights = tmp_path / "tok" / "model.safetensors"
    old = load_file(weights)
    old["logit_scale"], old["logit_bias"] = old.pop("logits.scale"), old.pop("logits.bias")  # the older names
    save_file(old, weights)
    for loaded in (Tokenizer.from_pretrained(str(tmp_path / "tok")), tiny()):
        if not loaded.logits.scale.item() == 1.5:
            load_model_weights(Storage(), str(weights), loaded)  # a stage starting from an older stage's model
        assert loaded.logits.scale.item() == 1.5 and loaded.logits.bias.item() == -3.0
    assert tiny().logits.scale.item() == pytest.approx(2.302585), "the control: a fresh model's own values"


def test_gradients_reach_every_trainable_parameter():
    model = tiny().train()
    batch = pack(mixed_samples(torch.Generator().manual_seed(8)))
    out = model.forward_packed(batch, quantize=True)
    gaussians = out["gaussians"]
    loss = out["patches"].abs().mean() + out["mean"].pow(2).mean() + out["logvar"].mean()
    loss = loss + sum(value.float().mean() for key, value in gaussians.items() if key != "token_index")
    embedding = model.embed(batch)  # (S, width)
    text = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(9))
    # The sigmoid loss is what trains the learnable logit scale and bias.
    loss = loss + sigmoid_loss(embedding, text, torch.eye(len(embedding), dtype=torch.bool), model.logits.scale,
                               model.logits.bias)
    loss.backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # The position table only reaches these samples' grids; every other parameter must learn.
    assert silent == [], silent


def test_image_forward_keeps_the_pipeline_contract():
    model = tiny()
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    out = model(pixels, sample=False)
    assert out["reconstruction"].shape == pixels.shape
    assert out["mean"].shape == (3 * 4, 48)


def test_preset_table_shapes():
    assert PRESETS["so400m"] == dict(width=1152, depth=27, heads=16, mlp_width=4304)
    assert PRESETS["base"] == dict(width=768, depth=12, heads=12, mlp_width=3072)
    with pytest.raises(ValueError, match="unknown preset"):
        Tokenizer.from_preset("huge")


def tiled_working_memory(model: Tokenizer, latent_frames: int, tile_latent_frames: int) -> int:
    """Peak bytes created during `encode_tiled`, beyond what its outputs hold at the end."""
    model.config.tile_latent_frames = tile_latent_frames
    batch = pack([patchify_video(torch.zeros(latent_frames * 4, 3, 128, 128))])
    with LiveBytes() as tracker:
        out = model.encode_tiled(batch)
    held_at_end = sum(t.untyped_storage().nbytes() for t in out.values())
    return tracker.peak - held_at_end


def test_tiled_memory_grows_with_tile_size_not_video_length():
    model = tiny(cache_tiles=1)
    short = tiled_working_memory(model, latent_frames=8, tile_latent_frames=2)
    long = tiled_working_memory(model, latent_frames=32, tile_latent_frames=2)
    bigger_tiles = tiled_working_memory(model, latent_frames=8, tile_latent_frames=8)
    assert long < 1.25 * short, (short, long)  # 4x the video, about the same working memory
    assert bigger_tiles > 2 * short, (short, bigger_tiles)  # 4x the tile, much more
    # and the windowed tiled run still equals the full run under the same (windowed) mask
    model.config.tile_latent_frames = 2
    batch = pack([patchify_video(torch.rand(24, 3, 32, 32) * 2 - 1)])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_tiled(batch)["hidden"], model.encode(batch)["hidden"],
                                   atol=2e-5, rtol=0)


def test_vectorised_image_packing_equals_per_image_patchify():
    from atoken.train.model.tokens import pack_images, unpack_images

    images = torch.rand(3, 3, 40, 36, generator=torch.Generator().manual_seed(9))
    fast, slow = pack_images(images), pack([patchify_image(image) for image in images])
    assert torch.equal(fast.patches, slow.patches) and torch.equal(fast.coords, slow.coords)
    assert torch.equal(fast.sample_ids, slow.sample_ids) and fast.layouts == slow.layouts
    assert torch.equal(unpack_images(fast.patches, fast), images[:, :, 4:36, 2:34])


def test_activation_checkpointing_gives_the_same_gradients():
    """train.stages[].activation_checkpointing recomputes each block in backward: same loss, same gradients."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    calls = []

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Tokenizer.from_preset("tiny", latent_channels=8, patch_size=16)
        model.encoder.checkpointing = model.decoder.checkpointing = checkpointing
        model.decoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(checkpointing))
        out = model(images, sample=False)
        (out["reconstruction"] - images).abs().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert calls == [False, True, True]  # recomputed in backward (negative control: once without)
    assert plain.keys() == recomputed.keys() and any(name.startswith("encoder.") for name in plain)
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], atol=1e-6), name
