"""The 3D reconstruction term (spec "3D output"): decoded Gaussians rendered at input views of the asset (never
its evaluation views, which evaluate/metrics/render3d.py scores), compared with Blender's renders: L1 1.0 +
LPIPS 0.2 + (1 − SSIM) 0.2.

Cameras come from the preprocessed sample (preprocess/objects.py): c2w in Blender's OpenGL camera frame
(y up, looking down −z) and pinhole intrinsics in pixels; gsplat wants world-to-camera in OpenCV's frame.
"""

from __future__ import annotations

import numpy as np
import torch

from atoken.train.losses.ssim import ssim
from atoken.train.model.gaussians import render_gaussians

OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
BACKGROUND = (1.0, 1.0, 1.0)  # renders are composited over white before comparison


def viewmats_from_blender(c2w: torch.Tensor) -> torch.Tensor:
    """(V, 4, 4) camera-to-world, OpenGL camera frame → (V, 4, 4) world-to-camera, OpenCV camera frame."""
    return OPENGL_TO_OPENCV.to(c2w) @ torch.linalg.inv(c2w)


def composite_views(rgba: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(V, H, W, 4) uint8 RGBA → (V, H, W, 3) float in [0, 1] over the white background."""
    views = torch.as_tensor(np.asarray(rgba)).float() / 255.0
    alpha = views[..., 3:]
    return views[..., :3] * alpha + (1.0 - alpha) * torch.tensor(BACKGROUND)


def resize_views(views: torch.Tensor, intrinsics: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, 3) square views and their (3, 3) pinhole → (N, size, size, 3) (area-averaged) and the matching
    intrinsics: focal lengths and principal point scale with the image, pixel centres stay at +0.5."""
    scale = size / views.shape[2]
    resized = torch.nn.functional.interpolate(views.permute(0, 3, 1, 2), size=(size, size), mode="area")
    scaled = intrinsics.clone()
    scaled[:2] *= scale
    return resized.permute(0, 2, 3, 1), scaled


def render_views(gaussians: dict[str, torch.Tensor], c2w: torch.Tensor, intrinsics: torch.Tensor, width: int,
                 height: int) -> torch.Tensor:
    """One asset's Gaussians → (V, H, W, 3) renders in [0, 1] at the given cameras. Every parameter reaches the
    rasteriser in float32: under bf16 autocast the heads give colours, scales and opacities in bf16 beside
    float32 means and quaternions, which gsplat's kernels do not accept mixed."""
    g = {name: value.float() for name, value in gaussians.items()}
    rgb, _ = render_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                              viewmats_from_blender(c2w.float()), intrinsics.float(), width, height, BACKGROUND)
    return rgb


def gaussian_render_loss(rendered: torch.Tensor, target: torch.Tensor, perceptual, weights: dict[str, float]
                         ) -> dict[str, torch.Tensor]:
    """rendered, target (V, H, W, 3) in [0, 1] → {render_l1, render_lpips, render_ssim (as 1 − SSIM)}."""
    rendered_chw, target_chw = rendered.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)  # (V, 3, H, W)
    terms = {"render_l1": (rendered - target).abs().mean(),
             "render_ssim": 1.0 - ssim(rendered_chw, target_chw, data_range=1.0).mean()}
    if weights.get("render_lpips", 0.0) > 0:
        terms["render_lpips"] = perceptual(target_chw * 2 - 1, rendered_chw * 2 - 1, terms=("lpips",))["lpips"]
    return terms
