"""3D reconstruction metrics: the decoded Gaussians rendered at held-out views, scored against the stored renders.

Held out means held out from the voxel features (issue 17): every sample of `atoken preprocess 3d` keeps its
input views (`views`, `c2w`: what the features were cut from, and what the training render loss sees) apart
from its evaluation views (`eval_views`, `eval_c2w`: rendered at cameras no input view shares, never voxelised),
and only the evaluation views are scored here; `held_out_views` picks among them by index, and an input view
cannot be named at all. Samples ingested before that carry no evaluation views and are not scored (`unscorable`).

The arrays are preprocess/objects.py `load_object_sample`'s: RGBA uint8 renders (E, H, W, 4), camera-to-world
matrices in Blender's OpenGL camera frame (x right, y up, looking down -z) and (3, 3) pinhole intrinsics in
pixels, shared by every view. The renderer (train/model/gaussians.py) takes world-to-camera matrices in OpenCV's
frame (y down, +z forward), so each pose is flipped on its y and z axes and inverted. Ground truth is the RGBA
render composited over white, the renderer's background.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from atoken.evaluate.metrics.psnr import psnr_uint8
from atoken.evaluate.metrics.ssim import ssim_uint8

RENDERER = "atoken.train.model.gaussians.render_gaussians (gsplat on CUDA, its reference splatter on CPU), white"
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
# The protocol's `views` field: what the scored views are.
HELD_OUT = (
    "each sample's evaluation views (eval_views, eval_c2w): rendered at ingest at cameras no input view shares, "
    "held out from the voxel features and from the training render loss"
)


def unscorable(sample: dict) -> str | None:
    """Why a sample (load_object_sample's arrays) cannot be scored on held-out views, in one line; None: it can."""
    if "views" not in sample:
        return "samples carry no views (preprocess 3D with views kept)"
    if len(sample.get("eval_views", ())) == 0:
        return "samples carry no held-out evaluation views (re-ingest 3D, objects.eval_views > 0)"
    return None


def frames_protocol(scored_views: Iterable[int], eval_views: int) -> str:
    """The protocol's `frames` field: which evaluation views were scored, of how many each sample has."""
    return f"evaluation views {sorted(set(scored_views))} of {eval_views} per sample (never an input view)"


def viewmats_from_c2w(c2w: np.ndarray) -> torch.Tensor:
    """(V, 4, 4) OpenGL camera-to-world → (V, 4, 4) OpenCV world-to-camera, float32."""
    return torch.from_numpy(np.linalg.inv(np.asarray(c2w, dtype=np.float64) @ OPENGL_TO_OPENCV)).float()


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(..., H, W, 4) uint8 → (..., H, W, 3) uint8, as the renderer's white background would show it."""
    rgb, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255.0
    return np.round(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def render_views(
    gaussians: dict[str, torch.Tensor],
    c2w: np.ndarray,
    intrinsics: np.ndarray,
    size: tuple[int, int],
    render: Callable | None = None,
) -> np.ndarray:
    """Gaussians (GaussianHead's dict) at V cameras → (V, H, W, 3) uint8 renders over white."""
    if render is None:
        from atoken.train.model.gaussians import render_gaussians as render
    viewmats = viewmats_from_c2w(c2w)  # (V, 4, 4)
    ks = torch.from_numpy(np.broadcast_to(np.asarray(intrinsics, dtype=np.float32), (len(viewmats), 3, 3)).copy())
    height, width = size
    with torch.no_grad():
        rgb, _ = render(
            gaussians["means"],
            gaussians["quats"],
            gaussians["scales"],
            gaussians["opacities"],
            gaussians["colors"],
            viewmats,
            ks,
            width,
            height,
        )  # (V, H, W, 3) in [0, 1]
    return (rgb.clamp(0, 1) * 255.0).round().byte().cpu().numpy()


def render_metrics(
    decode_gaussians: Callable[[np.ndarray, np.ndarray], dict[str, torch.Tensor]],
    sample: dict,
    held_out_views: Sequence[int] | None = None,
    perceptual: torch.nn.Module | None = None,
    render: Callable | None = None,
) -> list[dict[str, float]]:
    """One asset (load_object_sample's arrays) → per scored evaluation view {"view" (its index among the
    evaluation views), "psnr", "ssim"[, "perceptual"]}. `held_out_views`: which evaluation views; None: all."""
    reason = unscorable(sample)
    if reason is not None:
        raise ValueError(f"3D metrics: {reason}")
    count = len(sample["eval_views"])
    views = list(range(count)) if held_out_views is None else list(held_out_views)
    outside = [v for v in views if not 0 <= v < count]
    if outside or not views:
        raise ValueError(
            f"evaluate.held_out_views: {outside or views} do not pick among a sample's {count} evaluation views "
            "(indices from 0; input views are never scored)"
        )
    truth = composite_on_white(sample["eval_views"][views])  # (v, H, W, 3)
    gaussians = decode_gaussians(sample["voxels"], sample["features"])
    cameras = sample["eval_c2w"][views]  # (v, 4, 4)
    renders = render_views(gaussians, cameras, sample["intrinsics"], truth.shape[1:3], render)  # (v, H, W, 3)
    rows = []
    for view, reference, output in zip(views, truth, renders, strict=True):
        row = {"view": view, "psnr": psnr_uint8(reference, output), "ssim": ssim_uint8(reference, output)}
        if perceptual is not None:
            device = next(perceptual.parameters(), torch.empty(0)).device
            pair = [torch.from_numpy(x).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1.0
                    for x in (reference, output)]
            row["perceptual"] = float(perceptual(*pair)[0])
        rows.append(row)
    return rows
