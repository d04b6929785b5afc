"""3D reconstruction metrics: the decoded Gaussians rendered at held-out views, scored against the stored renders.

The views are what `atoken preprocess 3d` keeps in each sample (preprocess/objects.py `load_object_sample`):
RGBA uint8 renders (V, H, W, 4), camera-to-world matrices in Blender's OpenGL camera frame (x right, y up,
looking down -z) and pinhole intrinsics in pixels. The renderer (train/model/gaussians.py) takes
world-to-camera matrices in OpenCV's frame (y down, +z forward), so each pose is flipped on its y and z axes
and inverted. Ground truth is the RGBA render composited over white, the renderer's background.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from atoken.evaluate.metrics.psnr import psnr_uint8
from atoken.evaluate.metrics.ssim import ssim_uint8

RENDERER = "atoken.train.model.gaussians.render_gaussians (gsplat on CUDA, its reference splatter on CPU), white"
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


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
    held_out_views: Sequence[int],
    perceptual: torch.nn.Module | None = None,
    render: Callable | None = None,
) -> list[dict[str, float]]:
    """One asset (load_object_sample's arrays) → per held-out view {"view", "psnr", "ssim"[, "perceptual"]}."""
    missing = [name for name in ("voxels", "features", "views", "c2w", "intrinsics") if name not in sample]
    if missing:
        raise ValueError(
            f"3D metrics need the stored views: the sample lacks {', '.join(missing)} (preprocess with views kept)"
        )
    views = [v for v in held_out_views if v < len(sample["views"])]
    if not views:
        raise ValueError(
            f"3D metrics: none of the held-out views {list(held_out_views)} exists in a sample of "
            f"{len(sample['views'])} views"
        )
    truth = composite_on_white(sample["views"][views])  # (v, H, W, 3)
    intrinsics = sample["intrinsics"]
    intrinsics = intrinsics[views] if np.asarray(intrinsics).ndim == 3 else intrinsics
    gaussians = decode_gaussians(sample["voxels"], sample["features"])
    renders = render_views(gaussians, sample["c2w"][views], intrinsics, truth.shape[1:3], render)  # (v, H, W, 3)
    rows = []
    for view, reference, output in zip(views, truth, renders, strict=True):
        row = {"view": view, "psnr": psnr_uint8(reference, output), "ssim": ssim_uint8(reference, output)}
        if perceptual is not None:
            pair = [torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1.0 for x in (reference, output)]
            row["perceptual"] = float(perceptual(*pair)[0])
        rows.append(row)
    return rows
