"""SigLIP2 import: a tiny random SigLIP2 vision model saved by transformers loads into the tokenizer's
encoder and gives the same features (our RoPE off for the comparison)."""

from __future__ import annotations

import pytest
import torch

from atoken.train.model.tokenizer import Tokenizer
from atoken.train.model.tokens import pack, patchify_image

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def siglip2_folder(tmp_path_factory):
    config = transformers.Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=2, num_patches=16, patch_size=16)
    torch.manual_seed(0)
    model = transformers.Siglip2VisionModel(config).eval()
    folder = tmp_path_factory.mktemp("siglip2")
    model.save_pretrained(folder)
    return folder, model


def hf_features(model, image: torch.Tensor):
    """transformers' own naflex input: (h, w, c) patches of one image, padded to 16 positions."""
    _, height, width = image.shape
    rows, cols = height // 16, width // 16
    patches = image.reshape(3, rows, 16, cols, 16).permute(1, 3, 2, 4, 0).reshape(rows * cols, 768)
    pixel_values = torch.zeros(1, 16, 768)
    pixel_values[0, : rows * cols] = patches
    mask = torch.zeros(1, 16, dtype=torch.long)
    mask[0, : rows * cols] = 1
    with torch.no_grad():
        out = model(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[rows, cols]]))
    return out.last_hidden_state[0, : rows * cols], out.pooler_output[0]


@pytest.mark.parametrize("height,width", [(48, 64), (64, 64), (32, 16)])
def test_from_siglip2_matches_transformers(siglip2_folder, height, width):
    folder, reference = siglip2_folder
    tokenizer = Tokenizer.from_siglip2(str(folder), rope=False, attention_backend="masked").eval()
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height + width)) * 2 - 1
    expected_hidden, expected_pooled = hf_features(reference, image)
    batch = pack([patchify_image(image)])
    with torch.no_grad():
        hidden = tokenizer.encode(batch)["hidden"]
        pooled = tokenizer.embed(batch)[0]
    torch.testing.assert_close(hidden, expected_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=0)


def test_from_siglip2_then_rope_changes_features_and_other_frames_start_at_zero(siglip2_folder):
    folder, _ = siglip2_folder
    tokenizer = Tokenizer.from_siglip2(str(folder))
    weight = tokenizer.embeddings.patch_embedding.weight  # (64, 3072)
    assert weight[:, 768:].eq(0).all() and weight[:, :768].abs().sum() > 0
    assert tokenizer.config.width == 64 and tokenizer.config.depth == 2 and tokenizer.config.position_grid == 4


def test_from_siglip2_refuses_non_safetensors(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, '
                                          '"intermediate_size": 8}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Tokenizer.from_siglip2(str(tmp_path))


def test_init_from_loads_siglip2_into_the_configured_model_and_refuses_other_sizes(siglip2_folder):
    """`train.model.init_from`: the curriculum builds the model from its preset, then loads SigLIP2 into it."""
    from atoken.train.model.pretrained import load_siglip2_weights

    folder, _ = siglip2_folder
    expected = Tokenizer.from_siglip2(str(folder)).state_dict()
    torch.manual_seed(1)
    model = Tokenizer(Tokenizer.from_siglip2(str(folder)).config)  # fresh weights, the checkpoint's sizes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_siglip2_weights(model, folder)
    state = model.state_dict()
    assert "encoder.layers.1.mlp.fc2.weight" in loaded and "head.probe" in loaded
    for name in loaded:
        assert torch.equal(state[name], expected[name]), name
    # The decoder keeps its own initialisation (negative control: loading did not overwrite everything).
    assert torch.equal(state["decoder_in.weight"], before["decoder_in.weight"])
    assert not torch.equal(state["encoder.layers.0.mlp.fc1.weight"], before["encoder.layers.0.mlp.fc1.weight"])
    with pytest.raises(ValueError, match="does not fit train.model: width 64 \\(model: 96\\)"):
        load_siglip2_weights(Tokenizer.from_preset("tiny"), folder)
