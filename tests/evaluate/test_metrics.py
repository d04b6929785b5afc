"""evaluate/metrics/: PSNR (TokenBench's capped convention) and SSIM against scikit-image and known cases;
evaluate/reconstruction.to_uint8."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from atoken.evaluate.metrics.psnr import EPS, PSNR_CAP, psnr_uint8
from atoken.evaluate.metrics.ssim import ssim_uint8
from atoken.evaluate.reconstruction import to_uint8

ASTRONAUT = Path(importlib.util.find_spec("skimage").origin).parent / "data" / "astronaut.png"


def random_pair(seed: int, shape=(32, 32, 3), noise: float = 20.0):
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 256, shape, dtype=np.uint8)
    noisy = np.clip(reference.astype(np.float64) + rng.normal(0, noise, shape), 0, 255).astype(np.uint8)
    return reference, noisy


@pytest.mark.parametrize("seed", range(5))
def test_psnr_matches_scikit_image_on_random_images(seed):
    reference, noisy = random_pair(seed, shape=(24 + seed, 40, 3), noise=5.0 + 10 * seed)
    expected = peak_signal_noise_ratio(reference, noisy, data_range=255)
    # TokenBench's ε moves a finite PSNR by 20·log10(1 + ε/√MSE) ≈ 1.04e-6/√MSE dB: here MSE ≥ 20, so < 3e-7 dB.
    assert psnr_uint8(reference, noisy) == pytest.approx(expected, abs=3e-7)
    mse = np.mean((reference.astype(np.float64) - noisy) ** 2)
    assert psnr_uint8(reference, noisy) == pytest.approx(20 * math.log10(255 / (math.sqrt(mse) + EPS)), rel=1e-13)


def test_psnr_known_case_constant_error_of_one():
    reference = np.full((16, 16, 3), 100, np.uint8)
    # MSE = 1, so PSNR = 20 log10(255 / (1 + ε)) = 48.1308 dB (ε shaves 1.04e-6 dB), whatever the sign of the error.
    assert psnr_uint8(reference, reference + 1) == pytest.approx(20 * math.log10(255 / (1 + EPS)), abs=1e-12)
    assert psnr_uint8(reference, reference - 1) == pytest.approx(48.1308, abs=1e-4)


def test_psnr_does_not_wrap_around_uint8():
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    assert psnr_uint8(black, white) == pytest.approx(0.0, abs=1e-8)  # MSE = 255^2; ε: −4e-9 dB
    assert psnr_uint8(white, black) == pytest.approx(0.0, abs=1e-8)


def test_psnr_of_identical_images_is_tokenbench_cap_and_means_stay_finite():
    reference, noisy = random_pair(0)
    # TokenBench: 20 * np.log10(_UINT8_MAX_F / (np.sqrt(mse) + _FLOAT32_EPS)) with mse = 0.
    assert psnr_uint8(reference, reference.copy()) == PSNR_CAP == pytest.approx(20 * math.log10(255 / 1.1920929e-07))
    assert PSNR_CAP == pytest.approx(186.6046, abs=1e-4)
    scores = [psnr_uint8(reference, reference.copy()), psnr_uint8(reference, noisy)]
    assert math.isfinite(float(np.mean(scores)))


def test_psnr_refuses_other_shapes_and_dtypes():
    reference, noisy = random_pair(0)
    with pytest.raises(ValueError):
        psnr_uint8(reference, noisy[:-1])
    with pytest.raises(ValueError):
        psnr_uint8(reference.astype(np.float32), noisy.astype(np.float32))


def test_ssim_identical_is_one():
    reference, _ = random_pair(1)
    assert ssim_uint8(reference, reference.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_falls_as_noise_grows():
    photo = np.asarray(Image.open(ASTRONAUT).convert("RGB").resize((64, 64)))
    rng = np.random.default_rng(0)
    scores = []
    for sigma in (2, 8, 32):
        noisy = np.clip(photo + rng.normal(0, sigma, photo.shape), 0, 255).astype(np.uint8)
        scores.append(ssim_uint8(photo, noisy))
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0


@pytest.mark.parametrize("seed", range(3))
def test_ssim_matches_a_direct_scikit_image_call(seed):
    reference, noisy = random_pair(seed, shape=(32, 48, 3))
    expected = structural_similarity(reference, noisy, channel_axis=-1, data_range=255, win_size=7)
    assert ssim_uint8(reference, noisy) == pytest.approx(expected, rel=1e-12)
    # ...and the convention matters: a different window gives a different number.
    assert ssim_uint8(reference, noisy) != pytest.approx(
        structural_similarity(reference, noisy, channel_axis=-1, data_range=255, win_size=11), rel=1e-6)


def test_ssim_refuses_other_shapes():
    reference, noisy = random_pair(0)
    with pytest.raises(ValueError):
        ssim_uint8(reference, noisy[:, :-1])


def test_to_uint8_maps_the_range_ends_and_layout():
    # Channel c of pixel (0, w) is pixels[c, 0, w].
    pixels = torch.tensor([[[-1.0, 1.0]], [[-2.0, 3.0]], [[0.0, 1 / 127.5 - 1.0]]])  # (3, H=1, W=2)
    out = to_uint8(pixels)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)  # (H, W, 3)
    # -1 → 0, 1 → 255, out of range clamps, 0 → 127.5 rounds (half to even) to 128, one step above -1 → 1.
    assert out[0, 0].tolist() == [0, 0, 128]
    assert out[0, 1].tolist() == [255, 255, 1]


def test_to_uint8_inverts_decode_of_every_value():
    values = torch.arange(256, dtype=torch.float32)
    pixels = (values / 127.5 - 1.0).reshape(1, 16, 16).expand(3, 16, 16)  # what train.data.decode_image makes
    assert to_uint8(pixels)[..., 0].reshape(-1).tolist() == list(range(256))
