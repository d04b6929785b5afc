"""Frozen image towers (teacher, CLIP-perceptual) load SigLIP and SigLIP2 folders and embed as transformers does."""

from __future__ import annotations

import pytest
import torch

from atoken.train.losses.towers import ImageTower

transformers = pytest.importorskip("transformers")
VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=16)
TEXT = dict(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def test_siglip_tower_matches_get_image_features(tmp_path):
    torch.manual_seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT,
                                                               vision_config={**VISION, "image_size": 32})).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tower = ImageTower.from_path(tmp_path)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=images)
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert torch.allclose(tower(images), expected, atol=1e-5)
    assert tower.similarity_scale == pytest.approx(float(model.logit_scale.exp()))


def convert_image_to_patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    """transformers' Siglip2ImageProcessor patch cutting, restated (its module imports torchvision)."""
    channels, height, width = image.shape
    cut = image.reshape(channels, height // patch, patch, width // patch, patch).permute(1, 3, 2, 4, 0)
    return cut.reshape((height // patch) * (width // patch), -1)


def test_siglip2_tower_cuts_patches_as_its_image_processor(tmp_path):
    torch.manual_seed(1)
    model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=TEXT,
                                                                 vision_config={**VISION, "num_patches": 16})).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tower = ImageTower.from_path(tmp_path)
    images = torch.rand(2, 3, 48, 32) * 2 - 1  # a 3x2 patch grid
    patches = torch.stack([convert_image_to_patches(image, 16) for image in images])  # (2, 6, 768)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=patches, spatial_shapes=torch.tensor([[3, 2], [3, 2]]),
                                            pixel_attention_mask=torch.ones(2, 6, dtype=torch.long))
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert torch.allclose(tower(images), expected, atol=1e-5)


def test_a_text_model_is_not_an_image_tower(tmp_path):
    transformers.BertModel(transformers.BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32)
                           ).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="image tower"):
        ImageTower.from_path(tmp_path)
