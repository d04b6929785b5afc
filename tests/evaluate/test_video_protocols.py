"""evaluate/metrics/video.py: TokenBench's video PSNR / SSIM / LPIPS against a transcription of its code on real
clip pairs, PSNR on a pair computed by hand, the cap on identical clips."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity as ssim

from atoken.evaluate.metrics import video
from atoken.evaluate.metrics.psnr import EPS, PSNR_CAP, psnr_uint8

# --- NVlabs/TokenBench @dcbb7d5 token_bench/metrics_cli.py, quoted (docstrings shortened, `args.device` → cpu) ---
_FLOAT32_EPS = np.finfo(np.float32).eps
_UINT8_MAX_F = float(np.iinfo(np.uint8).max)


def PSNR(input0: np.ndarray, input1: np.ndarray) -> float:  # noqa: N802 - the reference's name
    assert input0.shape == input1.shape, "inputs should have the same shape"
    mse = ((input0 - input1) ** 2).mean()
    psnr = 20 * np.log10(_UINT8_MAX_F / (np.sqrt(mse) + _FLOAT32_EPS))
    return psnr.item()


def SSIM(input0: np.ndarray, input1: np.ndarray) -> float:  # noqa: N802
    assert input0.shape == input1.shape, "inputs should have the same shape"
    if input0.ndim == 3:
        input0, input1 = np.array([input0]), np.array([input1])
    ssim_values = []

    def compute_ssim(pair):
        one_image0, one_image1 = pair
        return ssim(one_image0, one_image1, data_range=_UINT8_MAX_F, multichannel=True, channel_axis=-1)

    with ThreadPoolExecutor() as executor:
        ssim_values = list(executor.map(compute_ssim, zip(input0, input1)))  # noqa: B905 - quoted
    return np.mean(ssim_values)


def LPIPS(input0: np.ndarray, input1: np.ndarray, loss_fn_vgg: Callable) -> float:  # noqa: N802
    assert input0.shape == input1.shape, "inputs should have the same shape"
    if input0.ndim == 3:
        input0, input1 = np.array([input0]), np.array([input1])

    # computing LPIPS needs to normalize input to [-1,1].
    input0 = torch.from_numpy(2 * (input0 / _UINT8_MAX_F - 0.5)).to(torch.float32)
    input1 = torch.from_numpy(2 * (input1 / _UINT8_MAX_F - 0.5)).to(torch.float32)

    input0 = input0.permute(0, 3, 1, 2)  # N, C, H, W
    input1 = input1.permute(0, 3, 1, 2)  # N, C, H, W

    # average LPIPS over all frames
    results = []
    for one_input0, one_input1 in zip(input0, input1):  # noqa: B905 - quoted
        fm0 = one_input0.unsqueeze(0)
        fm1 = one_input1.unsqueeze(0)
        res = loss_fn_vgg(fm0, fm1).item()
        results.append(res)

    return np.mean(results)


# main_psnr_ssim reads each video as `read_video(file).astype(np.float32)` (commit 9795ebc); main_lpips as uint8.
# ------------------------------------------------------------------------------------------------------------


def blurred(clip: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(clip.astype(np.float32), sigma=(0, sigma, sigma, 0)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pairs(decode_clip):
    """Real (reference, reconstruction) pairs: carphone pristine against its 7 kB compression, and bikes blurred."""
    pristine = decode_clip("carphone_pristine.mp4", 0, 12)
    bikes = decode_clip("bikes.mp4", 96, 6)
    return {"compressed": (pristine, decode_clip("carphone_distorted.mp4", 0, 12)),
            "blurred": (bikes, blurred(bikes, 1.5))}


@pytest.mark.parametrize("kind", ["compressed", "blurred"])
def test_video_psnr_matches_tokenbench_on_real_clips(pairs, kind):
    reference, reconstruction = pairs[kind]
    theirs = PSNR(reference.astype(np.float32), reconstruction.astype(np.float32))
    # Ours takes the exact integer MSE; TokenBench's float32 mean rounds it: well under a thousandth of a dB.
    assert video.video_psnr(reference, reconstruction, chunk=5) == pytest.approx(theirs, abs=1e-4)
    per_frame = float(np.mean([psnr_uint8(a, b) for a, b in zip(reference, reconstruction, strict=True)]))
    assert per_frame > video.video_psnr(reference, reconstruction)  # the mean of per-frame PSNRs overstates


def test_video_psnr_of_a_pair_computed_by_hand():
    reference = np.full((2, 8, 8, 3), 100, np.uint8)
    reconstruction = reference.copy()
    reconstruction[0] += 1  # frame 0: MSE 1 (48.13 dB alone)
    reconstruction[1] -= 3  # frame 1: MSE 9 (38.59 dB alone)
    # One MSE over the video: (1 + 9) / 2 = 5 → 20·log10(255 / (√5 + ε)) = 41.14 dB, not the 43.36 dB mean.
    expected = 20 * math.log10(255 / (math.sqrt(5) + EPS))
    assert video.video_psnr(reference, reconstruction) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(41.1411, abs=1e-4)


def test_identical_clips_give_tokenbench_cap_and_the_mean_stays_finite(pairs):
    reference, reconstruction = pairs["compressed"]
    assert video.video_psnr(reference, reference.copy()) == PSNR_CAP
    assert PSNR_CAP == pytest.approx(PSNR(reference.astype(np.float32), reference.astype(np.float32)), abs=1e-4)
    scores = [video.video_psnr(reference, reference.copy()), video.video_psnr(reference, reconstruction)]
    assert math.isfinite(float(np.mean(scores)))


@pytest.mark.parametrize("kind", ["compressed", "blurred"])
def test_video_ssim_equals_tokenbench_on_real_clips(pairs, kind):
    reference, reconstruction = pairs[kind]
    theirs = SSIM(reference.astype(np.float32), reconstruction.astype(np.float32))
    assert video.video_ssim(reference, reconstruction) == theirs  # the same skimage calls in float32, same mean
    assert video.video_ssim(reference, reference.copy()) == pytest.approx(1.0, abs=1e-6)


def test_video_lpips_equals_tokenbench_per_frame_mean(pairs):
    """With the declared stand-in as the network (VGG16 weights do not install offline): what is under test is
    TokenBench's input scaling and per-frame mean, not the network."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from atoken.evaluate.metrics.lpips import PerceptualStandIn

    network = PerceptualStandIn()
    reference, reconstruction = pairs["compressed"]
    reference, reconstruction = reference[:5], reconstruction[:5]
    theirs = LPIPS(reference, reconstruction, network)
    # Frames in chunks of 2 (batched convolutions), against TokenBench's one frame per call.
    assert video.video_lpips(reference, reconstruction, network, chunk=2) == pytest.approx(theirs, rel=1e-5)
    assert video.video_lpips(reference, reference.copy(), network) == pytest.approx(0.0, abs=1e-7)
    assert torch.equal(video.lpips_input(reference), torch.from_numpy(2 * (reference / 255.0 - 0.5)).float()
                       .permute(0, 3, 1, 2))


def test_video_metrics_refuse_other_shapes_and_dtypes():
    clip = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="one shape"):
        video.video_psnr(clip, clip[:3])
    with pytest.raises(ValueError, match="uint8"):
        video.video_ssim(clip.astype(np.float32), clip.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        video.video_psnr(clip[0], clip[0])


def test_protocols_name_tokenbench_conventions():
    assert set(video.PROTOCOLS) == {"psnr", "ssim", "lpips"}
    assert "one MSE over all frames" in video.PSNR_PROTOCOL and "186.60 dB" in video.PSNR_PROTOCOL
    assert "float32" in video.SSIM_PROTOCOL and "mean over frames" in video.SSIM_PROTOCOL
    assert "per frame" in video.LPIPS_PROTOCOL
