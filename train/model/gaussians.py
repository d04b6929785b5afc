"""The 3D output of the tokenizer: Gaussians per voxel (TRELLIS SLAT style) and a splatting renderer for them.

Each occupied voxel's decoder token becomes G Gaussians near that voxel (spec "3D output": 32 per voxel, each
xyz offset 3 + colour 3 + scale 3 + rotation 4 + opacity 1). `render_gaussians` draws them to held-out views for
the render loss: on CUDA with gsplat's fused rasteriser, on CPU with `render_gaussians_reference`, a plain
PyTorch renderer that follows gsplat's conventions so that the two agree (the GPU test compares them).

Conventions (all gsplat's): quaternions are (w, x, y, z); `viewmats` are world-to-camera in the OpenCV camera
frame (x right, y down, +z forward); `Ks` are pinhole intrinsics in pixels; pixel (i, j) has its centre at
(j + 0.5, i + 0.5); the object frame is [-0.5, 0.5]³.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PARAMS_PER_GAUSSIAN = 14  # xyz offset 3 + colour 3 + scale 3 + rotation 4 + opacity 1
# TRELLIS bounds offsets as tanh(raw) * 0.5 * voxel_size with voxel_size = 1.5 voxels: ±0.75 voxel, so
# neighbouring voxels' Gaussians may overlap a little and close seams, but never wander off their token.
OFFSET_VOXELS = 0.75
INIT_OPACITY = 0.1  # TRELLIS's opacity_bias: faint at first, so early renders are not a wall of overlapping blobs

# gsplat's defaults, named here and passed to gsplat explicitly so that both render paths use the same values.
NEAR_PLANE = 0.01
FAR_PLANE = 1e10
EPS2D = 0.3  # low-pass blur (pixels²) added to every 2D covariance: a Gaussian covers at least about a pixel
ALPHA_MAX = 0.999  # per-Gaussian alpha clamp (csrc/RasterizeToPixels3DGSFwd.cu): transmittance never hits zero
ALPHA_MIN = 1.0 / 255.0  # fainter contributions are skipped (ALPHA_THRESHOLD in csrc/include/Common.h)
T_MIN = 1e-4  # a pixel stops at the first Gaussian that would bring its transmittance to this or below
TILE = 16  # pixels per tile side, gsplat's default tile_size


def _hammersley(n: int) -> torch.Tensor:
    """n points of the 3D Hammersley set in [0, 1)³: (i + 0.5) / n, then radical inverses in bases 2 and 3."""

    def radical_inverse(base: int, i: int) -> float:
        value, digit_weight = 0.0, 1.0 / base
        while i:
            value += digit_weight * (i % base)
            i //= base
            digit_weight /= base
        return value

    return torch.tensor([[(i + 0.5) / n, radical_inverse(2, i), radical_inverse(3, i)] for i in range(n)])


class GaussianHead(nn.Module):
    """Decoder tokens of occupied voxels → G Gaussians each, in the object frame [-0.5, 0.5]³.

    Means stay within OFFSET_VOXELS of their voxel's centre, so a border voxel's Gaussians may reach a quarter
    voxel outside the cube. The output dict is flat over M = N·G Gaussians, ready for `render_gaussians`.
    """

    def __init__(self, width: int, gaussians_per_voxel: int = 32, voxel_grid: int = 64):
        super().__init__()
        self.gaussians_per_voxel = gaussians_per_voxel
        self.voxel_grid = voxel_grid
        self.voxel_size = 1.0 / voxel_grid
        self.proj = nn.Linear(width, gaussians_per_voxel * PARAMS_PER_GAUSSIAN)
        # Zero init, as TRELLIS's SLatGaussianDecoder: every Gaussian starts exactly at the biases below, so the
        # first renders are a sensible grey voxel cloud whatever the decoder trunk outputs.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # With zero raw offsets all G Gaussians of a voxel would sit on its centre and get identical gradients.
        # TRELLIS adds a fixed Hammersley perturbation before the tanh so they start spread over the voxel.
        spread = _hammersley(gaussians_per_voxel) - 0.5  # (G, 3) in voxels, inside [-0.5, 0.5)
        self.register_buffer("offset_bias", torch.atanh(spread / OFFSET_VOXELS), persistent=False)  # (G, 3)
        # Each Gaussian starts with its share of the voxel, voxel_size / G^(1/3) (0.31 voxel for G = 32; TRELLIS's
        # scaling_bias 0.004 is 0.26 voxel at 64³): together they tile the voxel without one blurring the rest.
        # Softplus rather than exp keeps large raw values from exploding scales; the bias is its inverse.
        init_scale = self.voxel_size / gaussians_per_voxel ** (1 / 3)
        self.scale_bias = math.log(math.expm1(init_scale))
        self.opacity_bias = math.log(INIT_OPACITY / (1 - INIT_OPACITY))  # inverse sigmoid
        self.register_buffer("quat_bias", torch.tensor([1.0, 0.0, 0.0, 0.0]), persistent=False)  # identity (wxyz)

    def forward(self, hidden: torch.Tensor, voxel_xyz: torch.Tensor) -> dict[str, torch.Tensor]:
        """hidden (N, width), voxel_xyz (N, 3) integer coords in [0, voxel_grid) → M = N·G Gaussians."""
        n, g = hidden.shape[0], self.gaussians_per_voxel
        raw = self.proj(hidden).view(n, g, PARAMS_PER_GAUSSIAN)  # (N, G, 14)
        offset, color, scale, rotation, opacity = raw.split([3, 3, 3, 4, 1], dim=-1)
        centre = (voxel_xyz.to(raw.dtype) + 0.5) * self.voxel_size - 0.5  # (N, 3) voxel centres
        offset = torch.tanh(offset + self.offset_bias) * (OFFSET_VOXELS * self.voxel_size)  # (N, G, 3)
        return {
            "means": (centre[:, None] + offset).reshape(n * g, 3),  # (M, 3)
            "colors": torch.sigmoid(color).reshape(n * g, 3),  # (M, 3) in [0, 1]
            "scales": F.softplus(scale + self.scale_bias).reshape(n * g, 3),  # (M, 3) > 0
            "quats": F.normalize(rotation + self.quat_bias, dim=-1).reshape(n * g, 4),  # (M, 4) unit, wxyz
            "opacities": torch.sigmoid(opacity + self.opacity_bias).reshape(n * g),  # (M,)
            "token_index": torch.arange(n, device=hidden.device).repeat_interleave(g),  # (M,)
        }


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EWA projection of N Gaussians into C cameras.

    Uses gsplat's own pure-PyTorch reference (gsplat.cuda._torch_impl, runs on CPU and is differentiable) so the
    reference renderer projects exactly as gsplat does: covariance R S Sᵀ Rᵀ from the quaternion and scales, 2D
    covariance J W Σ Wᵀ Jᵀ with the perspective Jacobian, plus the EPS2D blur. Returns means2d (C, N, 2) in
    pixels, conics (C, N, 3) = upper triangle (a, b, c) of the inverse 2D covariance, depths (C, N) camera z,
    and radii (C, N, 2): half-sizes in pixels of a box holding the 3.33-sigma ellipse, zero for a Gaussian that
    is culled (outside the near/far planes or off the image).
    """
    # Imported here: the model builds without gsplat; only rendering needs it.
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)  # (N, 3, 3)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=EPS2D, near_plane=NEAR_PLANE, far_plane=FAR_PLANE
    )  # (C, N, 2) int, (C, N, 2), (C, N), (C, N, 3)
    return means2d, conics, depths, radii


def _composite_pixels(
    px: torch.Tensor,
    py: torch.Tensor,
    means2d: torch.Tensor,
    conics: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    background: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing at pixel centres px, py (P,) of n Gaussians already sorted by depth.

    Follows csrc/RasterizeToPixels3DGSFwd.cu rule for rule; returns rgb (P, 3) and alpha (P,).
    """
    dx = px[:, None] - means2d[:, 0]  # (P, n)
    dy = py[:, None] - means2d[:, 1]  # (P, n)
    a, b, c = conics.unbind(dim=-1)  # (n,) each
    sigma = 0.5 * (a * dx**2 + c * dy**2) + b * dx * dy  # (P, n) half the squared Mahalanobis distance
    alpha = (opacities * torch.exp(-sigma)).clamp(max=ALPHA_MAX)  # (P, n)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, 0.0)  # (P, n)
    # gsplat stops a pixel at the first Gaussian that would bring T to ≤ T_MIN and does not draw that one; T only
    # falls along the sorted order, so "T after this Gaussian > T_MIN" marks exactly the drawn prefix.
    log_t_after = torch.cumsum(torch.log1p(-alpha), dim=-1)  # (P, n)
    alpha = torch.where(log_t_after.detach() > math.log(T_MIN), alpha, 0.0)  # (P, n)
    log_keep = torch.log1p(-alpha)  # (P, n)
    t_before = torch.exp(torch.cumsum(log_keep, dim=-1) - log_keep)  # (P, n) transmittance in front of each
    t_final = torch.exp(log_keep.sum(dim=-1))  # (P,); sum, not cumsum[-1], so that n = 0 works
    rgb = (alpha * t_before) @ colors + t_final[:, None] * background  # (P, 3)
    return rgb, 1.0 - t_final


def _rasterize(
    means2d: torch.Tensor,
    conics: torch.Tensor,
    depths: torch.Tensor,
    radii: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One view's n Gaussians → rgb (H, W, 3), alpha (H, W).

    Written by hand because gsplat has no CPU path for this step: its torch `_rasterize_to_pixels` needs the CUDA
    tile intersection (`rasterize_to_indices_in_range`) and nerfacc. Like gsplat it works in 16×16 tiles, each
    with only the Gaussians whose box overlaps it; outside its 3.33-sigma box a Gaussian's alpha is already below
    1/255 and skipped, so tiling changes no pixel, it only saves time: 3,200 Gaussians of a centred object into
    four 64×64 views take ~0.8 s forward + backward on one CPU thread, against ~12 s untiled.
    """
    order = torch.argsort(depths, stable=True)  # front to back, as gsplat's depth sort
    means2d, conics, radii = means2d[order], conics[order], radii[order]  # (n, 2), (n, 3), (n, 2)
    opacities, colors = opacities[order], colors[order]  # (n,), (n, 3)
    low, high = means2d.detach() - radii, means2d.detach() + radii  # (n, 2) boxes
    rgb_rows, alpha_rows = [], []
    for y0 in range(0, height, TILE):
        y1 = min(y0 + TILE, height)
        rgb_tiles, alpha_tiles = [], []
        for x0 in range(0, width, TILE):
            x1 = min(x0 + TILE, width)
            hit = (high[:, 0] > x0) & (low[:, 0] < x1) & (high[:, 1] > y0) & (low[:, 1] < y1)  # (n,) keeps order
            rows = torch.arange(y0, y1, dtype=means2d.dtype, device=means2d.device) + 0.5
            cols = torch.arange(x0, x1, dtype=means2d.dtype, device=means2d.device) + 0.5
            py, px = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) pixel centres
            rgb, alpha = _composite_pixels(
                px.reshape(-1), py.reshape(-1), means2d[hit], conics[hit], opacities[hit], colors[hit], background
            )  # (h·w, 3), (h·w,)
            rgb_tiles.append(rgb.view(y1 - y0, x1 - x0, 3))
            alpha_tiles.append(alpha.view(y1 - y0, x1 - x0))
        rgb_rows.append(torch.cat(rgb_tiles, dim=1))  # (h, W, 3)
        alpha_rows.append(torch.cat(alpha_tiles, dim=1))  # (h, W)
    return torch.cat(rgb_rows), torch.cat(alpha_rows)  # (H, W, 3), (H, W)


def render_gaussians_reference(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch, differentiable EWA splatting of N Gaussians into C views → rgb (C, H, W, 3), alpha (C, H, W).

    Every tile evaluates each of its Gaussians at each of its pixels, keeping about ten such float tensors for
    backward: fine for CPU tests and the quickstart (a few thousand Gaussians at 64×64), not for training at
    512 px; that is what the CUDA path is for.
    """
    means2d, conics, depths, radii = project_gaussians(means, quats, scales, viewmats, Ks, width, height)
    bg = torch.as_tensor(background, dtype=colors.dtype, device=colors.device)  # (3,)
    rgbs, alphas = [], []
    for cam in range(viewmats.shape[0]):
        # Indexing, not masking, drops culled Gaussians: a Gaussian behind the camera has a meaningless 2D
        # footprint whose gradients must not reach the loss even multiplied by zero.
        keep = (radii[cam] > 0).all(dim=-1)  # (N,)
        rgb, alpha = _rasterize(
            means2d[cam, keep], conics[cam, keep], depths[cam, keep], radii[cam, keep], opacities[keep], colors[keep],
            width, height, bg,
        )
        rgbs.append(rgb)
        alphas.append(alpha)
    return torch.stack(rgbs), torch.stack(alphas)  # (C, H, W, 3), (C, H, W)


def render_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render N Gaussians into C views → rgb (C, H, W, 3), alpha (C, H, W): gsplat on CUDA, the reference on CPU."""
    if not means.is_cuda:
        return render_gaussians_reference(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, background
        )
    from gsplat import rasterization  # the fused CUDA kernels; only this path needs them

    bg = torch.as_tensor(background, dtype=colors.dtype, device=colors.device).repeat(viewmats.shape[0], 1)  # (C, 3)
    rgb, alpha, _ = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=NEAR_PLANE, far_plane=FAR_PLANE, eps2d=EPS2D, backgrounds=bg,
    )  # (C, H, W, 3), (C, H, W, 1)
    return rgb, alpha[..., 0]
