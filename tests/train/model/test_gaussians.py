"""Tests for train/model/gaussians.py: the per-voxel Gaussian head and the splatting renderers.

The reference renderer is checked against closed-form cases (a single Gaussian, two at different depths), its
projection against both a hand-written EWA and gsplat's own torch functions, and, where CUDA exists, the whole
image against gsplat's fused rasteriser.
"""

from __future__ import annotations

import math

import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

from atoken.train.model import gaussians
from atoken.train.model.gaussians import (
    GaussianHead,
    project_gaussians,
    render_gaussians,
    render_gaussians_reference,
)


def intrinsics(f: float, cx: float, cy: float, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def look_at(eye: torch.Tensor) -> torch.Tensor:
    """World-to-camera (4, 4) for an OpenCV camera at `eye` looking at the origin, world +z up."""
    forward = -eye / eye.norm()  # camera +z
    right = torch.linalg.cross(forward, eye.new_tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()  # camera +x
    down = torch.linalg.cross(forward, right)  # camera +y
    R = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    view = torch.eye(4, dtype=eye.dtype)
    view[:3, :3], view[:3, 3] = R, -R @ eye
    return view


def random_cameras(count: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    azimuth = torch.rand(count, generator=generator, dtype=dtype) * 2 * math.pi
    elevation = (torch.rand(count, generator=generator, dtype=dtype) - 0.5) * 1.6  # stay away from the poles
    eyes = 2.5 * torch.stack(
        [elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], dim=-1
    )  # (C, 3)
    return torch.stack([look_at(eye) for eye in eyes])  # (C, 4, 4)


def random_gaussians(count: int, generator: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=dtype)

    return {
        "means": (rand(count, 3) - 0.5) * 0.8,
        "quats": torch.randn(count, 4, generator=generator, dtype=dtype),
        "scales": 0.01 + 0.05 * rand(count, 3),
        "opacities": 0.05 + 0.9 * rand(count),
        "colors": rand(count, 3),
    }


def one_gaussian(xyz, scale, opacity, color) -> dict[str, torch.Tensor]:
    return {
        "means": torch.tensor([xyz]),
        "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        "scales": torch.full((1, 3), scale),
        "opacities": torch.tensor([opacity]),
        "colors": torch.tensor([color]),
    }


def concat(*scenes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([scene[key] for scene in scenes]) for key in scenes[0]}


def test_head_outputs_bounded_gaussians_near_their_voxels():
    torch.manual_seed(0)
    grid, per_voxel = 16, 8
    head = GaussianHead(width=24, gaussians_per_voxel=per_voxel, voxel_grid=grid)
    voxel_xyz = torch.tensor([[0, 0, 0], [15, 15, 15], [3, 9, 12]])
    hidden = torch.randn(3, 24)
    voxel = 1.0 / grid
    centres = (voxel_xyz.float() + 0.5) * voxel - 0.5  # (3, 3)

    # At initialisation: identity rotations, opacity 0.1, each Gaussian its share of the voxel, spread inside it.
    out = head(hidden, voxel_xyz)
    assert out["token_index"].tolist() == [0] * per_voxel + [1] * per_voxel + [2] * per_voxel
    torch.testing.assert_close(out["opacities"], torch.full((24,), 0.1))
    torch.testing.assert_close(out["scales"], torch.full((24, 3), voxel / per_voxel ** (1 / 3)))
    torch.testing.assert_close(out["quats"], torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(24, 4))
    offsets = out["means"].view(3, per_voxel, 3) - centres[:, None]  # (3, G, 3)
    assert offsets.abs().max() <= 0.5 * voxel + 1e-6
    assert torch.cdist(offsets[0], offsets[0]).add(torch.eye(per_voxel)).min() > 0.05 * voxel  # all distinct

    # With large weights every output still lands in its range, and means stay in their voxel's neighbourhood.
    torch.nn.init.normal_(head.proj.weight, std=0.5)  # raw values up to ~±8: far past the initial biases,
    torch.nn.init.normal_(head.proj.bias, std=0.5)  # short of where float32 sigmoid rounds to exactly 0 or 1
    out = head(hidden, voxel_xyz)
    assert {key: tuple(value.shape) for key, value in out.items()} == {
        "means": (24, 3), "colors": (24, 3), "scales": (24, 3), "quats": (24, 4), "opacities": (24,),
        "token_index": (24,),
    }
    assert (out["colors"] >= 0).all() and (out["colors"] <= 1).all()
    assert (out["opacities"] > 0).all() and (out["opacities"] < 1).all()
    assert (out["scales"] > 0).all()
    torch.testing.assert_close(out["quats"].norm(dim=-1), torch.ones(24))
    offsets = out["means"].view(3, per_voxel, 3) - centres[:, None]
    assert offsets.abs().max() <= 0.75 * voxel + 1e-6
    assert offsets.abs().max() > 0.5 * voxel  # trained offsets may leave the voxel a little, as in TRELLIS


def test_single_gaussian_renders_a_blob_where_the_pinhole_model_puts_it():
    f, cx, cy, z, opacity = 60.0, 32.0, 32.0, 3.0, 0.7
    x, y = 8.5 / f * z, -7.5 / f * z  # projects to (40.5, 24.5): the centre of pixel row 24, column 40
    scale = 3.0 * z / f  # 3 px standard deviation at that depth
    scene = one_gaussian((x, y, z), scale, opacity, (0.2, 0.4, 0.6))
    rgb, alpha = render_gaussians(**scene, viewmats=torch.eye(4)[None], Ks=intrinsics(f, cx, cy)[None],
                                  width=64, height=64)
    assert rgb.shape == (1, 64, 64, 3) and alpha.shape == (1, 64, 64)
    rgb, alpha = rgb[0], alpha[0]

    peak = divmod(int(alpha.argmax()), 64)
    assert peak == (24, 40)
    assert alpha[24, 40].item() == pytest.approx(opacity, abs=1e-6)

    # Whole neighbourhood against the closed form: Σ2d = s² J Jᵀ + 0.3 I with the perspective Jacobian J.
    jacobian = torch.tensor([[f / z, 0.0, -f * x / z**2], [0.0, f / z, -f * y / z**2]])
    cov2d = scale**2 * jacobian @ jacobian.T + 0.3 * torch.eye(2)
    rows, cols = torch.meshgrid(torch.arange(14, 35), torch.arange(30, 51), indexing="ij")
    delta = torch.stack([cols + 0.5 - 40.5, rows + 0.5 - 24.5], dim=-1)  # (21, 21, 2)
    mahalanobis = torch.einsum("...i,ij,...j->...", delta, torch.linalg.inv(cov2d), delta)
    expected = opacity * torch.exp(-0.5 * mahalanobis)
    expected = torch.where(expected >= 1 / 255, expected, 0.0)  # gsplat skips alpha below 1/255
    torch.testing.assert_close(alpha[14:35, 30:51], expected, atol=1e-5, rtol=0)

    # One sigma (3 px) to the right: exp(-1/2) of the peak, up to the 0.3 px² blur and off-axis stretch (~2.5%).
    assert alpha[24, 43].item() / opacity == pytest.approx(math.exp(-0.5), abs=0.03)
    assert alpha[24, 43].item() / opacity > math.exp(-0.5)  # the blur only widens
    # Colour over the white background: c·α + (1 − α).
    torch.testing.assert_close(rgb[24, 40], torch.tensor([0.2, 0.4, 0.6]) * opacity + (1 - opacity))
    torch.testing.assert_close(rgb[0, 0], torch.ones(3))


def test_culled_gaussians_leave_the_background():
    behind = one_gaussian((0.0, 0.0, -2.0), 0.5, 0.9, (1.0, 0.0, 0.0))  # behind the camera
    faint = one_gaussian((0.0, 0.0, 2.0), 0.5, 0.003, (1.0, 0.0, 0.0))  # opacity below 1/255
    rgb, alpha = render_gaussians_reference(**concat(behind, faint), viewmats=torch.eye(4)[None],
                                            Ks=intrinsics(40.0, 16.0, 16.0)[None], width=32, height=32,
                                            background=(0.1, 0.2, 0.3))
    assert (alpha == 0).all()
    torch.testing.assert_close(rgb, torch.tensor([0.1, 0.2, 0.3]).expand(1, 32, 32, 3))


def test_nearer_gaussian_wins_whatever_the_input_order():
    red = one_gaussian((0.0, 0.0, 2.0), 0.05, 1.0, (1.0, 0.0, 0.0))  # 1 px sigma
    blue = one_gaussian((0.0, 0.0, 3.0), 0.45, 1.0, (0.0, 0.0, 1.0))  # 6 px sigma, behind red
    camera = {"viewmats": torch.eye(4)[None], "Ks": intrinsics(40.0, 16.5, 16.5)[None], "width": 32, "height": 32,
              "background": (0.0, 0.0, 0.0)}  # both project to the centre of pixel (16, 16)

    rgb_rb, alpha_rb = render_gaussians_reference(**concat(red, blue), **camera)
    rgb_br, alpha_br = render_gaussians_reference(**concat(blue, red), **camera)
    torch.testing.assert_close(rgb_rb, rgb_br)
    torch.testing.assert_close(alpha_rb, alpha_br)
    # Red's alpha is clamped to 0.999, leaving T = 1e-3; blue would take T to 1e-6 <= 1e-4, so gsplat stops
    # before drawing it: no blue at all in the centre, and the pixel's alpha stays 0.999.
    torch.testing.assert_close(rgb_rb[0, 16, 16], torch.tensor([0.999, 0.0, 0.0]))
    assert alpha_rb[0, 16, 16].item() == pytest.approx(0.999, abs=1e-6)
    # Outside red's footprint blue shows: the order matters only where they overlap.
    assert rgb_rb[0, 16, 24, 2] > 0.3 and rgb_rb[0, 16, 24, 0] < 0.01

    # Move blue in front and it wins instead.
    blue_front = one_gaussian((0.0, 0.0, 1.5), 0.45, 1.0, (0.0, 0.0, 1.0))
    rgb, _ = render_gaussians_reference(**concat(red, blue_front), **camera)
    torch.testing.assert_close(rgb[0, 16, 16], torch.tensor([0.0, 0.0, 0.999]))


def test_projection_matches_gsplat_and_a_hand_written_ewa():
    generator = torch.Generator().manual_seed(1)
    scene = random_gaussians(200, generator, dtype=torch.float64)
    viewmats = random_cameras(3, generator, dtype=torch.float64)  # (3, 4, 4)
    Ks = intrinsics(70.0, 31.0, 33.0, dtype=torch.float64).expand(3, 3, 3)
    means2d, conics, depths, radii = project_gaussians(
        scene["means"], scene["quats"], scene["scales"], viewmats, Ks, 64, 64
    )
    assert (radii > 0).all()  # every Gaussian is well inside every frustum: none culled

    # gsplat's own torch path, called the way its rasterization() does with its defaults.
    covars, _ = _quat_scale_to_covar_preci(scene["quats"], scene["scales"], compute_preci=False)
    radii_gs, means2d_gs, depths_gs, conics_gs, _ = _fully_fused_projection(
        scene["means"], covars, viewmats, Ks, 64, 64
    )
    torch.testing.assert_close(radii, radii_gs, rtol=0, atol=0)
    torch.testing.assert_close(means2d, means2d_gs, rtol=0, atol=1e-10)
    torch.testing.assert_close(conics, conics_gs, rtol=1e-10, atol=0)
    torch.testing.assert_close(depths, depths_gs, rtol=0, atol=1e-12)

    # By hand: wxyz quaternion → R, Σ = R S² Rᵀ, pinhole projection, Σ2d = J W Σ Wᵀ Jᵀ + 0.3 I.
    w, x, y, z = (scene["quats"] / scene["quats"].norm(dim=-1, keepdim=True)).unbind(-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).view(-1, 3, 3)  # (N, 3, 3)
    sigma = R @ torch.diag_embed(scene["scales"] ** 2) @ R.transpose(1, 2)  # (N, 3, 3)
    for cam in range(3):
        W, t = viewmats[cam, :3, :3], viewmats[cam, :3, 3]
        p = scene["means"] @ W.T + t  # (N, 3) camera frame
        fx, fy, cx, cy = Ks[cam, 0, 0], Ks[cam, 1, 1], Ks[cam, 0, 2], Ks[cam, 1, 2]
        uv = torch.stack([fx * p[:, 0] / p[:, 2] + cx, fy * p[:, 1] / p[:, 2] + cy], dim=-1)  # (N, 2)
        zero = torch.zeros_like(p[:, 0])
        J = torch.stack([fx / p[:, 2], zero, -fx * p[:, 0] / p[:, 2] ** 2,
                         zero, fy / p[:, 2], -fy * p[:, 1] / p[:, 2] ** 2], dim=-1).view(-1, 2, 3)
        cov2d = J @ W @ sigma @ W.T @ J.transpose(1, 2) + 0.3 * torch.eye(2, dtype=torch.float64)  # (N, 2, 2)
        inv = torch.linalg.inv(cov2d)
        torch.testing.assert_close(means2d[cam], uv, rtol=0, atol=1e-9)
        torch.testing.assert_close(depths[cam], p[:, 2], rtol=0, atol=1e-12)
        torch.testing.assert_close(conics[cam], torch.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1))


def test_tiles_change_no_pixel(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    scene = random_gaussians(300, generator)
    scene["scales"] = scene["scales"] * 2  # some Gaussians span several tiles
    camera = {"viewmats": random_cameras(2, generator), "Ks": intrinsics(70.0, 25.0, 20.0).expand(2, 3, 3),
              "width": 50, "height": 40}  # not multiples of 16: partial tiles at the right and bottom
    rgb, alpha = render_gaussians_reference(**scene, **camera)
    monkeypatch.setattr(gaussians, "TILE", 10_000)  # one tile holding every Gaussian: the dense renderer
    rgb_dense, alpha_dense = render_gaussians_reference(**scene, **camera)
    assert alpha_dense.mean() > 0.1  # the scene covers a good part of both views
    torch.testing.assert_close(rgb, rgb_dense, rtol=0, atol=1e-6)
    torch.testing.assert_close(alpha, alpha_dense, rtol=0, atol=1e-6)


def test_gradients_reach_every_gaussian_parameter_and_the_head():
    torch.manual_seed(0)
    head = GaussianHead(width=16, gaussians_per_voxel=8, voxel_grid=8)
    voxel_xyz = torch.tensor([[3, 3, 3], [4, 3, 4], [4, 4, 3], [3, 4, 4]])
    viewmats = random_cameras(2, torch.Generator().manual_seed(2))
    Ks = intrinsics(40.0, 16.0, 16.0).expand(2, 3, 3)
    target = torch.rand(2, 32, 32, 3)

    out = head(torch.randn(4, 16), voxel_xyz)
    rgb, alpha = render_gaussians(out["means"], out["quats"], out["scales"], out["opacities"], out["colors"],
                                  viewmats, Ks, 32, 32)
    ((rgb - target).abs().mean() + alpha.mean()).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name

    # Leaves with anisotropic scales and non-trivial rotations, or quaternions would have nothing to turn.
    generator = torch.Generator().manual_seed(3)
    leaves = {key: value.detach().clone() for key, value in out.items() if key != "token_index"}
    leaves["scales"] = leaves["scales"] * (0.5 + torch.rand(32, 3, generator=generator))
    leaves["quats"] = torch.randn(32, 4, generator=generator)
    leaves["opacities"] = torch.full((32,), 0.5)
    for value in leaves.values():
        value.requires_grad_(True)
    rgb, alpha = render_gaussians_reference(**leaves, viewmats=viewmats, Ks=Ks, width=32, height=32)
    ((rgb - target).abs().mean() + alpha.mean()).backward()
    for name, value in leaves.items():
        assert torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat rasterisation needs CUDA")
def test_gsplat_matches_the_reference_on_random_scenes():
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        scene = random_gaussians(500, generator)
        viewmats = random_cameras(4, generator)
        Ks = intrinsics(70.0, 32.0, 32.0).expand(4, 3, 3)
        rgb_ref, alpha_ref = render_gaussians_reference(**scene, viewmats=viewmats, Ks=Ks, width=64, height=64)
        cuda = {key: value.cuda() for key, value in scene.items()}
        rgb_gs, alpha_gs = render_gaussians(**cuda, viewmats=viewmats.cuda(), Ks=Ks.cuda(), width=64, height=64)
        assert rgb_gs.shape == rgb_ref.shape and alpha_gs.shape == alpha_ref.shape
        assert (rgb_gs.cpu() - rgb_ref).abs().mean() < 1e-2, seed
        assert (alpha_gs.cpu() - alpha_ref).abs().mean() < 1e-2, seed
