"""evaluate/metrics/render3d.py: camera conventions against the preprocessing's own poses, the metric against
the renderer called directly, and only ever on a sample's evaluation views (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atoken.evaluate.metrics.psnr import PSNR_CAP, psnr_uint8
from atoken.evaluate.metrics.render3d import (
    composite_on_white,
    frames_protocol,
    render_metrics,
    render_views,
    unscorable,
    viewmats_from_c2w,
)
from atoken.preprocess.render import RenderSettings, camera_poses, eval_camera_poses, intrinsics
from atoken.train.model.gaussians import render_gaussians_reference

pytest.importorskip("gsplat")
SETTINGS = RenderSettings(views=8, eval_views=4, resolution=32)
OFFSET = (0.1, 0.2)


def test_viewmats_put_the_origin_ahead_and_world_up_on_image_up():
    poses = camera_poses(SETTINGS, (0.3, 0.7))  # Blender/OpenGL camera-to-world, cameras looking at the origin
    viewmats = viewmats_from_c2w(poses).double().numpy()
    K = intrinsics(SETTINGS)
    for pose, viewmat in zip(poses, viewmats, strict=True):
        origin = viewmat @ np.array([0.0, 0.0, 0.0, 1.0])
        np.testing.assert_allclose(origin[:3], [0.0, 0.0, SETTINGS.radius], atol=1e-6)  # OpenCV: +z ahead
        # A point a little above the origin along the camera's up axis lands above the image centre (smaller v).
        above = viewmat @ np.append(0.1 * pose[:3, 1], 1.0)
        v = K[1, 1] * above[1] / above[2] + K[1, 2]
        assert v < K[1, 2]


def gaussians(color: float) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(0)
    count = 40
    return {
        "means": (torch.rand(count, 3, generator=rng) - 0.5) * 0.6,
        "quats": torch.nn.functional.normalize(torch.randn(count, 4, generator=rng), dim=-1),
        "scales": torch.full((count, 3), 0.06),
        "opacities": torch.full((count,), 0.8),
        "colors": torch.rand(count, 3, generator=rng) * 0.5 + color,
    }


def opaque_renders(gaussians: dict[str, torch.Tensor], poses: np.ndarray) -> np.ndarray:
    rgb = render_views(gaussians, poses, intrinsics(SETTINGS), (SETTINGS.resolution,) * 2)  # (V, H, W, 3)
    return np.concatenate([rgb, np.full(rgb.shape[:3] + (1,), 255, np.uint8)], axis=-1)  # (V, H, W, 4)


def sample_rendered_from(truth: dict[str, torch.Tensor], inputs_from: dict | None = None) -> dict[str, np.ndarray]:
    """A 3D sample as preprocessing stores it: its evaluation views are renders of `truth` (opaque RGBA), its input
    views renders of `inputs_from` (default: the truth too)."""
    poses, eval_poses = camera_poses(SETTINGS, OFFSET), eval_camera_poses(SETTINGS, OFFSET)
    return {
        "voxels": np.zeros((1, 3), np.int64),
        "features": np.zeros((1, 768), np.float16),
        "views": opaque_renders(inputs_from or truth, poses),
        "c2w": poses.astype(np.float32),
        "intrinsics": intrinsics(SETTINGS).astype(np.float32),
        "eval_views": opaque_renders(truth, eval_poses),
        "eval_c2w": eval_poses.astype(np.float32),
    }


def test_gaussians_equal_to_the_truth_score_perfectly():
    truth = gaussians(0.2)
    rows = render_metrics(lambda voxels, features: truth, sample_rendered_from(truth), held_out_views=[1, 3])
    assert [r["view"] for r in rows] == [1, 3]
    assert all(r["psnr"] == PSNR_CAP and r["ssim"] == pytest.approx(1.0) for r in rows)  # TokenBench's eps


def test_only_the_evaluation_views_are_scored():
    """Issue 17: 3D PSNR was measured on the views the voxel features came from. Gaussians equal to the truth the
    evaluation views show score perfectly however unlike it the input views are: the inputs are never read."""
    truth, other = gaussians(0.2), gaussians(0.6)
    sample = sample_rendered_from(truth, inputs_from=other)
    rows = render_metrics(lambda voxels, features: truth, sample)  # None: every evaluation view
    assert [r["view"] for r in rows] == [0, 1, 2, 3]
    assert all(r["psnr"] == PSNR_CAP for r in rows)
    # Negative control: the input views show something else, so scoring them would not be perfect.
    assert psnr_uint8(composite_on_white(sample["views"][0]), opaque_renders(truth, sample["c2w"][:1])[0, ..., :3]) < 40
    assert "never an input view" in frames_protocol([r["view"] for r in rows], 4)


def test_scores_equal_the_renderer_called_directly():
    truth, decoded = gaussians(0.2), gaussians(0.45)
    sample = sample_rendered_from(truth)
    rows = render_metrics(lambda voxels, features: decoded, sample, held_out_views=[0, 2])
    assert [r["view"] for r in rows] == [0, 2]
    poses = eval_camera_poses(SETTINGS, OFFSET)
    # The renderer directly, with the OpenGL → OpenCV conversion written out here: flip y and z, invert.
    viewmats = torch.from_numpy(np.linalg.inv(poses[[0, 2]] @ np.diag([1.0, -1, -1, 1]))).float()
    ks = torch.from_numpy(intrinsics(SETTINGS)).float().expand(2, 3, 3)
    rgb, _ = render_gaussians_reference(
        decoded["means"],
        decoded["quats"],
        decoded["scales"],
        decoded["opacities"],
        decoded["colors"],
        viewmats,
        ks,
        32,
        32,
    )
    direct = (rgb.clamp(0, 1) * 255).round().byte().numpy()
    for row, reference, output in zip(rows, sample["eval_views"][[0, 2], ..., :3], direct, strict=True):
        assert row["psnr"] == pytest.approx(psnr_uint8(reference, output), abs=1e-9)
        assert row["psnr"] < 40


def test_refuses_samples_without_views_and_composites_over_white():
    with pytest.raises(ValueError, match="views"):
        render_metrics(lambda v, f: {}, {"voxels": np.zeros((1, 3)), "features": np.zeros((1, 768))}, [0])
    rgba = np.array([[[[0, 0, 0, 0], [200, 100, 0, 255], [0, 0, 0, 128]]]], np.uint8)
    assert composite_on_white(rgba).tolist() == [[[[255, 255, 255], [200, 100, 0], [127, 127, 127]]]]


def test_samples_without_evaluation_views_are_never_scored_on_their_input_views():
    """A sample ingested before issue 17 holds input views only: it is refused with the reason the suite skips
    render_3d for, never scored on its inputs; an index outside the evaluation views is refused in one line."""
    truth = gaussians(0.2)
    sample = sample_rendered_from(truth)
    old = {name: array for name, array in sample.items() if not name.startswith("eval_")}
    reason = unscorable(old)
    assert reason == "samples carry no held-out evaluation views (re-ingest 3D, objects.eval_views > 0)"
    with pytest.raises(ValueError, match="no held-out evaluation views"):
        render_metrics(lambda v, f: truth, old, held_out_views=[3])
    empty = {**sample, "eval_views": sample["eval_views"][:0], "eval_c2w": sample["eval_c2w"][:0]}
    assert unscorable(empty) == reason and unscorable(sample) is None
    with pytest.raises(ValueError, match=r"\[7\] do not pick among a sample's 4 evaluation views") as refused:
        render_metrics(lambda v, f: truth, sample, held_out_views=[3, 7])  # 7: an input view's old index
    assert "\n" not in str(refused.value)
