"""preprocess/voxels.py and the cameras of preprocess/render.py: against an analytic sphere, against an
independent ray caster on pybullet_data meshes that Blender rendered, and on made-up views for the flags."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from scipy.ndimage import distance_transform_edt

from atoken.preprocess.objects import pybullet_data_dir
from atoken.preprocess.render import (
    PRESETS,
    RenderSettings,
    camera_offset,
    camera_poses,
    eval_camera_poses,
    hammersley_sphere,
    intrinsics,
    render_object,
)
from atoken.preprocess.voxels import (
    VoxelSettings,
    composite_on_white,
    project,
    unproject,
    voxel_centres,
    voxelise_views,
)
from atoken.train.model.tokens import voxel_tokens

PYBULLET = pybullet_data_dir()
SMALL = RenderSettings(views=8, resolution=96, samples=4)
GRID = 64
HALF_DIAGONAL = math.sqrt(3) / 2 / GRID  # a voxel's centre is at most this far from any point inside it


# -- cameras -------------------------------------------------------------------------------------------------

def test_hammersley_cameras_sit_on_the_radius_and_look_at_the_origin():
    poses = camera_poses(RenderSettings(views=150, radius=2.0), camera_offset("any asset"))
    rotation, position = poses[:, :3, :3], poses[:, :3, 3]
    np.testing.assert_allclose(np.linalg.norm(position, axis=1), 2.0)
    np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (150, 3, 3)),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0)
    forward = -rotation[:, :, 2]  # cameras look down their -z
    np.testing.assert_allclose(forward, -position / 2.0, atol=1e-12)
    # Even spread: every direction has a camera within 15° (ideal for 150 points: ~11°), no two coincide.
    unit = position / 2.0
    directions = np.random.default_rng(0).normal(size=(20000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    assert np.degrees(np.arccos((directions @ unit.T).max(axis=1))).max() < 15
    assert (unit @ unit.T - 2 * np.eye(150)).max() < math.cos(math.radians(1))
    assert abs(unit[:, 2].mean()) < 0.05  # as many views from below as from above


def test_hammersley_sequence_is_trellis():
    # TRELLIS' sphere_hammersley_sequence with offset (0, 0): u = i/N, v = radical_inverse_2(i).
    yaw, pitch = hammersley_sphere(4)
    np.testing.assert_allclose(yaw, [0.0, math.pi, math.pi / 2, 3 * math.pi / 2])
    np.testing.assert_allclose(pitch, np.arccos(1 - 2 * np.arange(4) / 4) - math.pi / 2)


@pytest.mark.parametrize("views, eval_views", [(1, 1), (6, 2), (16, 4), (8, 20), (150, 4)])
def test_evaluation_cameras_are_never_input_cameras(views, eval_views):
    """Issue 17: the views evaluation scores must not be views the voxel features were made from. By camera
    position, not index: every evaluation camera lies at least 1/N rad (its elevation ring's half step) from
    every input camera, sits on the same radius looking at the origin, and no two coincide."""
    settings = RenderSettings(views=views, eval_views=eval_views)
    for key in ("pybullet_duck", "objaverse_0a1b2c3d", "any asset"):
        offset = camera_offset(key)
        inputs, held_out = camera_poses(settings, offset), eval_camera_poses(settings, offset)
        assert held_out.shape == (eval_views, 4, 4)
        seen, scored = inputs[:, :3, 3] / settings.radius, held_out[:, :3, 3] / settings.radius  # unit directions
        np.testing.assert_allclose(np.linalg.norm(scored, axis=1), 1.0)
        np.testing.assert_allclose(-held_out[:, :3, 2], -scored, atol=1e-12)  # looking down -z at the origin
        angles = np.arccos(np.clip(scored @ seen.T, -1, 1))  # (E, N)
        assert angles.min() >= 1 / views - 1e-9, key
        assert (scored @ scored.T - 2 * np.eye(eval_views)).max() < 1 - 1e-9  # distinct among themselves
    assert len(eval_camera_poses(RenderSettings(views=views, eval_views=0), (0.5, 0.0))) == 0


def test_the_evaluation_views_are_part_of_what_makes_renders_reusable():
    """A kept render is reused only under an equal fingerprint: another eval_views count must render again."""
    assert RenderSettings(eval_views=2).fingerprint() != RenderSettings(eval_views=4).fingerprint()
    assert PRESETS["release"].eval_views == 4
    with pytest.raises(ValueError, match="eval_views"):
        RenderSettings(eval_views=-1).validate()


def test_presets_are_the_release_and_trellis_renders():
    release, trellis = PRESETS["release"], PRESETS["trellis"]
    assert (release.views, release.resolution) == (16, 256)
    assert (trellis.views, trellis.resolution, trellis.samples) == (150, 512, 128)
    assert trellis.fov_degrees == 40.0 and trellis.radius == 2.0


def test_project_inverts_unproject():
    K = intrinsics(SMALL)
    c2w = camera_poses(SMALL, (0.3, 0.7))[3]
    rng = np.random.default_rng(0)
    depth = rng.uniform(1.5, 2.5, (96, 96))
    points = unproject(depth, np.ones((96, 96), dtype=bool), c2w, K)
    uv, z = project(points, c2w, K)
    rows, cols = np.mgrid[0:96, 0:96]
    np.testing.assert_allclose(uv[:, 0], cols.ravel() + 0.5, atol=1e-9)
    np.testing.assert_allclose(uv[:, 1], rows.ravel() + 0.5, atol=1e-9)
    np.testing.assert_allclose(z, depth.ravel(), atol=1e-12)


# -- an analytic sphere, no Blender ----------------------------------------------------------------------------

def sphere_views(settings: RenderSettings, radius: float):
    """Planar depth and RGBA (colour = normal) of a sphere at the origin, ray-traced in closed form."""
    K, poses = intrinsics(settings), camera_poses(settings, (0.5, 0.25))
    size = settings.resolution
    rows, cols = np.mgrid[0:size, 0:size]
    directions = np.stack([(cols + 0.5 - K[0, 2]) / K[0, 0], -(rows + 0.5 - K[1, 2]) / K[1, 1],
                           -np.ones((size, size))], axis=-1)  # camera frame, z component -1: t is planar depth
    depth = np.full((settings.views, size, size), np.inf)
    rgba = np.zeros((settings.views, size, size, 4), dtype=np.uint8)
    for view, c2w in enumerate(poses):
        d = directions @ c2w[:3, :3].T
        o = c2w[:3, 3]
        a, b, c = (d * d).sum(-1), 2 * (d @ o), o @ o - radius**2
        disc = b * b - 4 * a * c
        hit = disc > 0
        t = (-b - np.sqrt(np.where(hit, disc, 0))) / (2 * a)
        depth[view][hit] = t[hit]
        normal = (o + t[..., None] * d) / radius
        rgba[view][hit] = np.concatenate([((normal[hit] + 1) * 127.5).astype(np.uint8),
                                          np.full((hit.sum(), 1), 255, np.uint8)], axis=1)
    return rgba, depth, poses, K


def test_voxels_of_an_analytic_sphere_lie_on_its_surface():
    settings = RenderSettings(views=16, resolution=128)
    rgba, depth, poses, K = sphere_views(settings, radius=0.4)
    result = voxelise_views(rgba, depth, poses, K, {"textures": 1}, VoxelSettings())
    centres = voxel_centres(result.voxels, GRID)
    assert np.abs(np.linalg.norm(centres, axis=1) - 0.4).max() <= HALF_DIAGONAL + 1e-9
    # Sixteen views see nearly all of a sphere: most of the shell's cells are occupied.
    shell = np.stack(np.meshgrid(*[np.arange(GRID)] * 3, indexing="ij"), -1).reshape(-1, 3)
    shell_centres = voxel_centres(shell, GRID)
    on_surface = np.abs(np.linalg.norm(shell_centres, axis=1) - 0.4) < 0.5 / GRID
    assert len(result.voxels) > 0.9 * on_surface.sum()
    assert result.flags == []  # coloured, seen from every view, plenty of voxels


def test_features_are_the_nearest_views_patches_and_fit_the_tokenizer():
    settings = RenderSettings(views=8, resolution=96)
    rgba, depth, poses, K = sphere_views(settings, radius=0.45)
    result = voxelise_views(rgba, depth, poses, K, {"textures": 1}, VoxelSettings())
    assert result.features.dtype == np.float16 and result.features.shape == (len(result.voxels), 768)
    assert result.features.min() >= -1 and result.features.max() <= 1
    centres = voxel_centres(result.voxels, GRID)
    rgb = composite_on_white(rgba)
    rng = np.random.default_rng(0)
    for index in rng.choice(len(centres), 50, replace=False):
        view = result.view_index[index]
        uv, _ = project(centres[index:index + 1], poses[view], K)
        u, v = uv[0]
        left, top = int(np.clip(round(u - 8), 0, 96 - 16)), int(np.clip(round(v - 8), 0, 96 - 16))
        expected = rgb[view, top:top + 16, left:left + 16].reshape(-1)
        np.testing.assert_allclose(result.features[index].astype(np.float32), expected, atol=1e-3)
    # Nearest: of the views that see a voxel and on whose object pixels its centre lands, none is closer.
    masks = rgba[..., 3] >= 128
    seeing = seeing_views(depth, masks, poses, K, result.voxels)
    distance = np.linalg.norm(centres[:, None] - poses[None, :, :3, 3], axis=2)  # (V, N)
    for index in rng.choice(len(centres), 300, replace=False):
        # (A voxel grazed by every view that sees it falls back to the nearest of them.)
        candidates = [v for v in seeing[index] if on_mask(centres[index], masks[v], poses[v], K)] or list(seeing[index])
        assert result.view_index[index] in seeing[index]
        assert distance[index, result.view_index[index]] <= distance[index, candidates].min() + 1e-12
    patches, coords, layout = voxel_tokens(torch.from_numpy(result.voxels.astype(np.int64)),
                                           torch.from_numpy(result.features.astype(np.float32)))
    assert patches.shape == (len(result.voxels), 3072) and coords.shape == (len(result.voxels), 4)
    assert (coords[:, 0] == 0).all() and coords[:, 1:].max() < GRID


def seeing_views(depth, masks, poses, K, voxels) -> list[set[int]]:
    """For each voxel, the views whose depth pixels land in it (recomputed here, pixel by pixel)."""
    index = {tuple(v): i for i, v in enumerate(voxels.tolist())}
    seeing: list[set[int]] = [set() for _ in range(len(voxels))]
    for view in range(len(poses)):
        points = unproject(depth[view], masks[view], poses[view], K)
        for cell in np.clip(np.floor((points + 0.5) * GRID), 0, GRID - 1).astype(int).tolist():
            seeing[index[tuple(cell)]].add(view)
    return seeing


def on_mask(point, mask, c2w, K) -> bool:
    uv, _ = project(point[None], c2w, K)
    col, row = int(np.floor(uv[0, 0])), int(np.floor(uv[0, 1]))
    return 0 <= row < mask.shape[0] and 0 <= col < mask.shape[1] and bool(mask[row, col])


# -- flags on made-up views ------------------------------------------------------------------------------------

def flat_views(colour, coverage_box=(30, 60), views=8, size=96) -> tuple[np.ndarray, np.ndarray]:
    rgba = np.zeros((views, size, size, 4), dtype=np.uint8)
    low, high = coverage_box
    rgba[:, low:high, low:high, :3] = colour
    rgba[:, low:high, low:high, 3] = 255
    return rgba, rgba[..., 3] >= 128


def flags_of(rgba, info, voxels=5000):
    from atoken.preprocess.voxels import quality_flags

    return quality_flags(rgba, rgba[..., 3] >= 128, voxels, info, VoxelSettings())


def test_a_flat_grey_untextured_asset_is_flagged_and_a_coloured_one_is_not():
    rgba, _ = flat_views((180, 180, 180))
    rgba[:, 30:45, 30:60, :3] = 120  # shading changes brightness, not chromaticity
    flags, reasons, _ = flags_of(rgba, {"textures": 0, "color_attributes": 0})
    assert flags == ["untextured"] and "chromaticity" in reasons["untextured"]
    rgba[:, 30:45, 30:60] = (200, 40, 40, 255)  # a second, red material
    assert flags_of(rgba, {"textures": 0, "color_attributes": 0})[0] == []
    grey, _ = flat_views((180, 180, 180))
    assert flags_of(grey, {"textures": 2, "color_attributes": 0})[0] == []  # a grey texture is still a texture


def test_empty_degenerate_and_few_voxel_renders_are_flagged():
    empty = np.zeros((8, 96, 96, 4), dtype=np.uint8)
    assert flags_of(empty, {"textures": 1}, voxels=0)[0] == ["empty", "few_voxels"]
    nothing = voxelise_views(empty, np.full((8, 96, 96), np.inf), camera_poses(SMALL, (0.5, 0.0)), intrinsics(SMALL),
                             {"textures": 1}, VoxelSettings())
    assert nothing.voxels.shape == (0, 3) and nothing.features.shape == (0, 768) and "empty" in nothing.flags
    clipped, _ = flat_views((200, 40, 40), coverage_box=(0, 60))
    flags, reasons, _ = flags_of(clipped, {"textures": 1})
    assert flags == ["degenerate"] and "border" in reasons["degenerate"]
    black, _ = flat_views((0, 0, 0))
    assert "black" in flags_of(black, {"textures": 1})[1]["degenerate"]
    rare, _ = flat_views((200, 40, 40))
    rare[2:] = 0  # only two views of eight see it
    assert "2/8 views" in flags_of(rare, {"textures": 1})[1]["degenerate"]
    assert flags_of(flat_views((200, 40, 40))[0], {"textures": 1}, voxels=10)[0] == ["few_voxels"]
    missing = flags_of(flat_views((255, 0, 255))[0], {"textures": 0, "missing_textures": ["duckCM.png"]})
    assert "missing_texture" in missing[0] and "duckCM.png" in missing[1]["missing_texture"]


# -- Blender renders of real meshes ----------------------------------------------------------------------------

def file_to_blender(points: np.ndarray, suffix: str) -> np.ndarray:
    """File coordinates → Blender's, as its importers convert them (OBJ and glTF are Y-up, Blender Z-up)."""
    if suffix in (".obj", ".glb", ".gltf"):
        return np.stack([points[:, 0], -points[:, 2], points[:, 1]], axis=1)
    return points  # PLY, STL: Blender keeps the file's axes


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """bunny (OBJ), duck (OBJ, textured), the duck as a GLB and the bunny as a PLY, rendered by Blender."""
    folder = tmp_path_factory.mktemp("renders")
    trimesh.load(PYBULLET / "duck.obj").export(folder / "duck.glb")
    trimesh.load(PYBULLET / "bunny.obj", force="mesh").export(folder / "bunny.ply")
    meshes = {"bunny.obj": PYBULLET / "bunny.obj", "duck.obj": PYBULLET / "duck.obj",
              "duck.glb": folder / "duck.glb", "bunny.ply": folder / "bunny.ply"}
    out = {}
    for name, path in meshes.items():
        views = render_object(path, folder / name.replace(".", "_"), SMALL, camera_offset(name))
        out[name] = (path, views, voxelise_views(views.rgba, views.depth, views.c2w, views.intrinsics, views.info,
                                                 VoxelSettings()))
    return out


def raycast(triangles: np.ndarray, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Möller–Trumbore: the nearest hit's t along each direction (inf for a miss), the reference ray caster."""
    v0, e1, e2 = triangles[:, 0], triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]
    nearest = np.full(len(directions), np.inf)
    for start in range(0, len(directions), 128):
        d = directions[start:start + 128, None]  # (R, 1, 3)
        p = np.cross(d, e2)  # (R, F, 3)
        det = (e1 * p).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / det
            s = origin - v0
            u = (s * p).sum(-1) * inv
            q = np.cross(s, e1)
            v = (d * q).sum(-1) * inv
            t = (e2 * q).sum(-1) * inv
        hit = (np.abs(det) > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6)
        nearest[start:start + 128] = np.where(hit, t, np.inf).min(axis=1)
    return nearest


@pytest.mark.parametrize("name", ["duck.obj", "duck.glb", "bunny.ply"])
def test_cameras_in_transforms_json_reproduce_the_rendered_depth(rendered, name):
    path, views, _ = rendered[name]
    transforms = json.loads((views.folder / "transforms.json").read_text())
    mesh = trimesh.load(path, force="mesh")
    scale, offset = transforms["normalisation"]["scale"], np.array(transforms["normalisation"]["offset"])
    vertices = scale * (file_to_blender(np.asarray(mesh.vertices, dtype=np.float64), path.suffix) + offset)
    triangles = vertices[np.asarray(mesh.faces)]
    size = transforms["w"]
    rows, cols = (grid.ravel() for grid in np.mgrid[0:size:2, 0:size:2])
    camera = np.stack([(cols + 0.5 - transforms["cx"]) / transforms["fl_x"],
                       -(rows + 0.5 - transforms["cy"]) / transforms["fl_y"], -np.ones(len(rows))], axis=1)
    for index in (0, 5):
        frame = transforms["frames"][index]
        c2w = np.array(frame["transform_matrix"])
        assert frame["file_path"] == f"{index:03d}.png" and (views.folder / frame["depth_file_path"]).is_file()
        expected = raycast(triangles, c2w[:3, 3], camera @ c2w[:3, :3].T)  # z of the direction is -1: planar
        depth = views.depth[index][rows, cols]
        hits = np.isfinite(expected)
        assert (hits == np.isfinite(depth)).mean() > 0.99  # only silhouette pixels may disagree
        both = hits & np.isfinite(depth)
        error = np.abs(depth[both] - expected[both])
        assert np.median(error) < 1e-4 and np.quantile(error, 0.95) < 1e-3


@pytest.mark.parametrize("name", ["bunny.obj", "duck.obj", "duck.glb"])
def test_every_voxel_centre_projects_inside_the_alpha_mask_of_the_views_that_see_it(rendered, name):
    _, views, result = rendered[name]
    K, c2w = views.intrinsics, views.c2w
    masks = views.rgba[..., 3] >= 128
    centres = voxel_centres(result.voxels, GRID)
    index = {tuple(v): i for i, v in enumerate(result.voxels.tolist())}
    strictly_inside = []
    for view in range(len(c2w)):
        # The views that see a voxel: those whose depth pixels land in it.
        points = unproject(views.depth[view], masks[view], c2w[view], K)
        cells = np.clip(np.floor((points + 0.5) * GRID), 0, GRID - 1).astype(int)
        seen = np.unique([index[tuple(cell)] for cell in cells.tolist()])
        uv, z = project(centres[seen], c2w[view], K)
        col, row = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        assert ((col >= 0) & (col < SMALL.resolution) & (row >= 0) & (row < SMALL.resolution)).all()
        # A voxel's centre is within its half-diagonal of the surface point a mask pixel saw, so it projects
        # within that distance (in pixels at its depth) of the mask, plus half a pixel's diagonal.
        gap = distance_transform_edt(~masks[view])[row, col]
        assert (gap <= K[0, 0] * HALF_DIAGONAL / (z - HALF_DIAGONAL) + math.sqrt(0.5)).all()
        chosen = result.view_index[seen] == view
        strictly_inside.append(masks[view][row[chosen], col[chosen]])
    # ...and the view a voxel's feature comes from has its centre on the object for nearly every voxel.
    assert np.concatenate(strictly_inside).mean() > 0.99


def test_rendered_objects_are_normalised_into_the_unit_cube(rendered):
    for _, views, _ in rendered.values():
        points = np.concatenate([unproject(views.depth[i], views.rgba[i, ..., 3] >= 128, views.c2w[i],
                                           views.intrinsics) for i in range(len(views.c2w))])
        assert np.abs(points).max() <= 0.5 + 1e-3
        assert (points.max(0) - points.min(0)).max() > 0.95  # the longest side spans the cube


def test_flags_of_real_meshes(rendered, tmp_path):
    assert rendered["bunny.obj"][2].flags == ["untextured"]  # no material at all: flat grey
    assert rendered["duck.obj"][2].flags == [] and rendered["duck.obj"][1].info["textures"] == 1
    assert rendered["duck.glb"][2].flags == []
    # The same duck without its texture file: Blender finds the MTL but not the PNG.
    for name in ("duck.obj", "duck.mtl"):
        shutil.copyfile(PYBULLET / name, tmp_path / name)
    views = render_object(tmp_path / "duck.obj", tmp_path / "views", SMALL)
    result = voxelise_views(views.rgba, views.depth, views.c2w, views.intrinsics, views.info, VoxelSettings())
    assert "missing_texture" in result.flags and "duckCM.png" in result.reasons["missing_texture"]


def test_the_render_folder_holds_a_nerf_dataset(rendered):
    _, views, _ = rendered["duck.obj"]
    transforms = json.loads((views.folder / "transforms.json").read_text())
    assert transforms["camera_angle_x"] == pytest.approx(math.radians(40))
    assert len(transforms["frames"]) == SMALL.views
    np.testing.assert_allclose(np.array([f["transform_matrix"] for f in transforms["frames"]]), views.c2w)
    # The evaluation views are numbered after the inputs, listed apart (NeRF tools read `frames` only).
    assert [f["file_path"] for f in transforms["eval_frames"]] == ["008.png", "009.png", "010.png", "011.png"]
    np.testing.assert_allclose(np.array([f["transform_matrix"] for f in transforms["eval_frames"]]), views.eval_c2w)
    names = {p.name for p in Path(views.folder).iterdir()}
    assert {"blender.log", "info.json", "depth.npy", "000.png", "000_depth.exr", "011.png"} <= names
    log = (views.folder / "blender.log").read_text()
    assert "[atoken] view 12/12" in log and "s/view" in log  # 8 input and 4 evaluation views
