"""evaluate/metrics/lpips.py: LPIPS against a formula written here on a random VGG16; the heads; the stand-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data

from atoken.evaluate.metrics.fid import file_sha256
from atoken.evaluate.metrics.lpips import (
    HEADS_SHA256,
    LPIPS,
    STAND_IN_SHA256,
    PerceptualStandIn,
    VGG16Features,
    default_heads_path,
    default_stand_in_path,
    load_heads,
)

# torchvision vgg16().features: (index, out channels) of each conv; a 2x2 max pool follows indices 2, 7, 14, 21.
CONVS = [(0, 64), (2, 64), (5, 128), (7, 128), (10, 256), (12, 256), (14, 256),
         (17, 512), (19, 512), (21, 512), (24, 512), (26, 512), (28, 512)]
POOL_AFTER = {2, 7, 14, 21}  # conv indices whose ReLU is followed by a pool
TAP_AFTER = {2, 7, 14, 21, 28}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def reference_lpips(state: dict[str, torch.Tensor], heads: list[torch.Tensor], x, y) -> torch.Tensor:
    """LPIPS v0.1 written out from the paper and lpips==0.1.4, from raw tensors: no module of the product."""
    def trunk(z):
        z = (z - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(
            1, 3, 1, 1)
        taps = []
        for index, _ in CONVS:
            z = F.relu(F.conv2d(z, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))
            if index in TAP_AFTER:
                taps.append(z)
            if index in POOL_AFTER:
                z = F.max_pool2d(z, 2)
        return taps

    total = torch.zeros(x.shape[0])
    for head, a, b in zip(heads, trunk(x), trunk(y), strict=True):
        a = a / (torch.sqrt((a**2).sum(dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt((b**2).sum(dim=1, keepdim=True)) + 1e-10)
        total += ((a - b) ** 2 * head).sum(dim=1).mean(dim=(1, 2))  # the 1x1 head is a weighted channel sum
    return total


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random VGG16 saved as torchvision's vgg16().state_dict() would be (classifier keys included)."""
    torch.manual_seed(0)
    network = VGG16Features()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):  # He init keeps activations alive through 13 random layers
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.normal_(module.bias, std=0.01)
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture(scope="module")
def metric(vgg_file):
    return LPIPS(vgg_file[0])


def random_pair(seed: int, shape=(2, 3, 48, 40), noise: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator) * 2 - 1
    y = (x + noise * torch.randn(shape, generator=generator)).clamp(-1, 1)
    return x, y


def test_state_dict_names_match_torchvision_vgg16_features():
    names = list(VGG16Features().state_dict())
    assert names == [f"features.{index}.{kind}" for index, _ in CONVS for kind in ("weight", "bias")]


@pytest.mark.parametrize("seed", range(3))
def test_lpips_matches_the_formula_on_random_images(metric, vgg_file, seed):
    x, y = random_pair(seed)
    heads = load_heads(default_heads_path())
    expected = reference_lpips(vgg_file[1], heads, x, y)
    with torch.no_grad():
        value = metric(x, y)
    assert value.shape == (2,)
    assert value.min() > 0.01  # a live random trunk, not a trivially zero distance
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)


def test_identical_images_give_zero_and_the_distance_is_symmetric(metric):
    x, y = random_pair(7)
    with torch.no_grad():
        assert torch.equal(metric(x, x), torch.zeros(2))
        torch.testing.assert_close(metric(x, y), metric(y, x), rtol=1e-6, atol=1e-7)


def test_gradients_reach_the_inputs_only(metric):
    x, y = random_pair(8)
    x.requires_grad_(True)
    metric(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in metric.parameters())


def test_backbone_loads_bare_feature_keys_and_refuses_pickles(vgg_file, tmp_path):
    bare = {key.removeprefix("features."): value for key, value in vgg_file[1].items() if key.startswith("features.")}
    save_file(bare, str(tmp_path / "features.safetensors"))
    x, y = random_pair(9)
    with torch.no_grad():
        torch.testing.assert_close(LPIPS(tmp_path / "features.safetensors")(x, y), LPIPS(vgg_file[0])(x, y))
    with pytest.raises(ValueError, match="safetensors"):
        LPIPS(tmp_path / "vgg16.pth")
    del bare["28.bias"]
    save_file(bare, str(tmp_path / "broken.safetensors"))
    with pytest.raises(RuntimeError, match="features.28.bias"):
        LPIPS(tmp_path / "broken.safetensors")


def test_heads_file_has_the_five_published_layers():
    path = default_heads_path()
    assert file_sha256(path) == HEADS_SHA256
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    assert sorted(state) == [f"lin{layer}.model.1.weight" for layer in range(5)]
    heads = load_heads(path)
    assert [tuple(head.shape) for head in heads] == [(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    assert all(bool((head >= 0).all()) for head in heads)  # lpips clamps the calibrated weights to ≥ 0


def test_protocol_records_files_and_layers(metric, vgg_file):
    assert metric.protocol["backbone_sha256"] == file_sha256(vgg_file[0])
    assert metric.protocol["heads_sha256"] == HEADS_SHA256
    assert metric.protocol["layers"] == ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"]
    assert "[-1, 1]" in metric.protocol["input"]


def test_shapes_are_checked(metric):
    x, _ = random_pair(0)
    with pytest.raises(ValueError, match="one shape"):
        metric(x, x[:, :, :40])
    with pytest.raises(ValueError, match="at least 16"):
        metric(x[:, :, :8, :8], x[:, :, :8, :8])


@pytest.fixture(scope="module")
def stand_in():
    return PerceptualStandIn()


def test_stand_in_declares_itself_and_pins_its_weights(stand_in):
    assert "NOT LPIPS" in PerceptualStandIn.PROTOCOL["metric"]
    assert "NOT LPIPS" in stand_in.protocol["metric"]
    assert file_sha256(default_stand_in_path()) == STAND_IN_SHA256 == stand_in.protocol["weights_sha256"]


def test_stand_in_is_zero_on_identical_images_and_grows_with_noise(stand_in):
    photo = torch.from_numpy(np.ascontiguousarray(data.astronaut()[:128, 192:320])).permute(2, 0, 1)[None]
    photo = photo.float() / 127.5 - 1  # (1, 3, 128, 128) in [-1, 1]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(photo.shape, generator=generator)
    noisy = torch.cat([(photo + sigma * noise).clamp(-1, 1) for sigma in (0.02, 0.1, 0.4)])  # (3, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(stand_in(photo, photo), torch.zeros(1))
        values = stand_in(photo.expand(3, -1, -1, -1), noisy)
    assert bool((values[1:] > values[:-1]).all()) and values[0] > 0, values
