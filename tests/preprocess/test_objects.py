"""preprocess/objects.py and the Blender child of preprocess/render.py: sources (pybullet_data, a mesh folder,
an Objaverse mirror the test builds in the objaverse package's layout), shards of 3D samples, and the
assets that break Blender (a failing importer, a hang, a crash)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh

from atoken.pipeline.storage import Storage
from atoken.preprocess.objects import (
    ObjectSettings,
    first_3d_items,
    list_mesh_folder,
    list_objaverse,
    list_pybullet_objects,
    load_object_sample,
    pybullet_data_dir,
)
from atoken.preprocess.plan import PartPlan
from atoken.preprocess.render import RenderSettings, camera_offset, camera_poses, eval_camera_poses
from atoken.preprocess.sources import ItemSpec, SourceError
from atoken.preprocess.voxels import VoxelSettings
from atoken.preprocess.writer import manifest_uri, record_uri, shard_uri

from helpers import REPO, commit_part

PYBULLET = pybullet_data_dir()
SMALL = RenderSettings(views=6, eval_views=2, resolution=64, samples=4)
UIDS = ["0a1b2c3d4e5f60718293a4b5c6d7e8f9", "f0e1d2c3b4a5968778695a4b3c2d1e0f", "5555aaaa5555aaaa5555aaaa5555aaaa"]


def settings_for(output: Path, render: RenderSettings = SMALL, **kwargs) -> ObjectSettings:
    return ObjectSettings(render, VoxelSettings(), str(output), Storage(), log_assets=False, **kwargs)


def read_parquet(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def shard_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.rsplit(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


# -- sources ---------------------------------------------------------------------------------------------------

def test_pybullet_builtin_set_lists_named_meshes_then_the_random_objects():
    items = list_pybullet_objects()
    assert [i.key for i in items[:3]] == ["pybullet_bunny", "pybullet_duck", "pybullet_teddy"]
    assert items[1].caption == "rubber duck" and Path(items[1].locator).is_file()
    random = [i for i in items if i.key.startswith("pybullet_random_")]
    assert len(random) == 1000 and random[0].key == "pybullet_random_000"
    assert all(Path(i.locator).is_file() for i in items)
    assert [i.key for i in list_pybullet_objects(4)] == [i.key for i in items[:4]]
    assert len(list_pybullet_objects(named_only=True)) == len(items) - 1000


def test_a_mesh_folder_lists_its_meshes_only(tmp_path):
    for name in ("a.obj", "b.GLB", "sub/c.ply", "d.fbx", "e.stl", "f.gltf", "notes.txt", "a.mtl", "tex.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = list(list_mesh_folder(str(tmp_path)))
    assert sorted(Path(i.locator).name for i in items) == ["a.obj", "b.GLB", "c.ply", "d.fbx", "e.stl", "f.gltf"]
    assert all("." not in i.key for i in items)


# uid → (the pybullet mesh its GLB is made of, or None: not downloaded; its name; its licence)
MIRROR_ASSETS = {UIDS[0]: ("duck.obj", "Rubber Duck", "by"), UIDS[1]: ("bunny.obj", "Stanford Bunny", "cc0"),
                 UIDS[2]: (None, "Never Downloaded", "by-nc")}


def write_objaverse_mirror(root: Path, assets: dict[str, tuple[str | None, str, str]]) -> Path:
    """A mirror in the objaverse package's layout: object paths, per-folder metadata (one folder per asset), and
    the GLBs of the assets that name a mesh."""
    versioned = root / "hf-objaverse-v1"
    paths = {uid: f"glbs/000-{index:03d}/{uid}.glb" for index, uid in enumerate(assets)}
    (versioned / "metadata").mkdir(parents=True)
    with gzip.open(versioned / "object-paths.json.gz", "wt") as handle:
        json.dump(paths, handle)
    for index, (uid, (mesh, name, licence)) in enumerate(assets.items()):
        metadata = {uid: {"uid": uid, "name": name, "license": licence, "user": {"username": f"artist{index}"},
                          "viewerUrl": f"https://sketchfab.com/3d-models/{uid}", "tags": [{"name": "toy"}]}}
        with gzip.open(versioned / "metadata" / f"000-{index:03d}.json.gz", "wt") as handle:
            json.dump(metadata, handle)
        if mesh:
            write_glb(versioned / paths[uid], mesh)
    return root


def write_glb(path: Path, mesh: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.load(PYBULLET / mesh).export(path)


@pytest.fixture(scope="module")
def objaverse_mirror(tmp_path_factory) -> Path:
    return write_objaverse_mirror(tmp_path_factory.mktemp("objaverse"), MIRROR_ASSETS)


def test_objaverse_mirror_lists_uids_with_captions(objaverse_mirror):
    listing = list_objaverse(objaverse_mirror)
    assert not isinstance(listing, list | tuple)  # streamed into the job's planner, never held whole
    items = list(listing)
    assert [i.key for i in items] == [f"objaverse_{uid}" for uid in UIDS]  # by path: folder 000-000 first
    by_key = {i.key: i for i in items}
    assert by_key[f"objaverse_{UIDS[0]}"].caption == "Rubber Duck"
    assert by_key[f"objaverse_{UIDS[0]}"].locator.endswith(f"glbs/000-000/{UIDS[0]}.glb")
    # The GLB's size and mtime, as a folder's files carry theirs; "" for the one not downloaded.
    glb = Path(by_key[f"objaverse_{UIDS[0]}"].locator).stat()
    assert by_key[f"objaverse_{UIDS[0]}"].fingerprint == f"{glb.st_size}:{glb.st_mtime_ns}"
    assert by_key[f"objaverse_{UIDS[2]}"].fingerprint == ""
    assert [i.key for i in list_objaverse(objaverse_mirror / "hf-objaverse-v1", uids=[UIDS[1]])] == [
        f"objaverse_{UIDS[1]}"]
    # Given UIDs: the first `limit` of them as given, listed by path.
    assert [i.key for i in list_objaverse(objaverse_mirror, uids=[UIDS[2], UIDS[1], UIDS[0]], limit=2)] == [
        f"objaverse_{UIDS[1]}", f"objaverse_{UIDS[2]}"]
    assert [i.key for i in list_objaverse(objaverse_mirror, limit=2)] == [i.key for i in items[:2]]
    with pytest.raises(SourceError, match="not in object-paths"):
        list_objaverse(objaverse_mirror, uids=["ffffffffffffffffffffffffffffffff"])
    with pytest.raises(SourceError, match="object-paths.json.gz"):
        list_objaverse(objaverse_mirror / "nowhere")
    import objaverse

    assert objaverse._VERSIONED_PATH.endswith(os.path.join(".objaverse", "hf-objaverse-v1"))  # left as found


def test_objaverse_assets_keep_their_licence_and_a_missing_glb_is_recorded(objaverse_mirror, tmp_path):
    items = list(list_objaverse(objaverse_mirror))
    result = commit_part(PartPlan("train-000000-of-000004", "train", items), Storage(), str(tmp_path),
                         settings_for(tmp_path))
    assert (result.samples, result.errors) == (2, 1)
    assert result.error_rows[0]["key"] == f"objaverse_{UIDS[2]}" and result.error_rows[0]["stage"] == "read"
    rows = {r["key"]: r for r in read_parquet(tmp_path / "manifests" / f"{result.shard}.parquet")}
    duck = rows[f"objaverse_{UIDS[0]}"]
    assert duck["license"] == "by" and duck["caption"] == "Rubber Duck" and duck["flags"] == []
    assert rows[f"objaverse_{UIDS[1]}"]["license"] == "cc0"
    meta = json.loads(shard_samples(tmp_path / "shards" / f"{result.shard}.tar")[duck["key"]]["json"])
    assert meta["uid"] == UIDS[0] and meta["author"] == "artist0" and meta["objaverse"]["tags"] == ["toy"]
    assert meta["source_url"].endswith(UIDS[0])


def test_the_preflight_lists_one_asset_of_each_source_and_names_one_that_lists_none(objaverse_mirror, tmp_path,
                                                                                   monkeypatch):
    import atoken.preprocess.objects as objects

    read, original = [], objects._read_objaverse_metadata

    def counted(path: str) -> dict:
        read.append(path)
        return original(path)

    monkeypatch.setattr(objects, "_read_objaverse_metadata", counted)
    firsts = first_3d_items(["builtin:pybullet-named", f"objaverse:{objaverse_mirror}"])
    assert [i.key for i in firsts] == ["pybullet_bunny", f"objaverse_{UIDS[0]}"]
    assert len(read) == 1  # the first asset's folder only: the mirror's other assets are not listed
    read.clear()
    assert len(list(list_objaverse(objaverse_mirror))) == 3 and len(read) == 3  # the whole listing reads each
    empty = write_objaverse_mirror(tmp_path / "empty", {})
    with pytest.raises(SourceError, match=r"objects.sources\[1\] \(objaverse:.*\) lists no assets"):
        first_3d_items(["builtin:pybullet-named", f"objaverse:{empty}"])
    (tmp_path / "no_meshes").mkdir()
    with pytest.raises(SourceError, match="holds no meshes"):
        first_3d_items([str(tmp_path / "no_meshes")])


def mesh_folder_source(root: Path) -> tuple[Callable[[], list[ItemSpec]], Path]:
    """A mesh folder of a duck and a bunny: (its listing, the duck's file)."""
    for name, mesh in (("duck.glb", "duck.obj"), ("bunny.glb", "bunny.obj")):
        write_glb(root / name, mesh)
    return lambda: list(list_mesh_folder(str(root))), root / "duck.glb"


def objaverse_source(root: Path) -> tuple[Callable[[], list[ItemSpec]], Path]:
    """An Objaverse mirror of a duck and a bunny: (its listing, the duck's GLB)."""
    mirror = write_objaverse_mirror(root, {uid: MIRROR_ASSETS[uid] for uid in UIDS[:2]})
    return lambda: list(list_objaverse(mirror)), mirror / "hf-objaverse-v1" / "glbs" / "000-000" / f"{UIDS[0]}.glb"


@pytest.mark.parametrize("source", [mesh_folder_source, objaverse_source], ids=["folder", "objaverse"])
def test_an_asset_whose_file_changed_is_rendered_again_and_an_unchanged_one_is_reused(tmp_path, source):
    """Issue 16: an Objaverse item carried no fingerprint, so a GLB replaced under its UID kept its old sample
    and renders; a mesh folder's files carry their size and mtime. Either way, new bytes under the same key are
    rendered again, the unchanged asset's sample is copied, and an unchanged listing skips the part."""
    listing, duck_file = source(tmp_path / "source")
    storage, output = Storage(), tmp_path / "out"
    name = "train-000000-of-000004"
    first = commit_part(PartPlan(name, "train", listing()), storage, str(output), settings_for(output))
    assert (first.samples, first.errors, first.made) == (2, 0, 2)
    before = shard_samples(output / "shards" / f"{first.shard}.tar")
    unchanged = commit_part(PartPlan(name, "train", listing()), storage, str(output), settings_for(output))
    assert unchanged.skipped and unchanged.made == 0  # negative control: the same files, nothing made

    write_glb(duck_file, "teddy2_VHACD_CHs.obj")  # the same path, key and UID; other bytes
    edited = commit_part(PartPlan(name, "train", listing()), storage, str(output), settings_for(output))
    assert (edited.samples, edited.made, edited.reused) == (2, 1, 1)
    # Rendered again, not taken from the renders kept for the duck's old bytes.
    assert edited.measured["reused_renders"] == 0
    assert edited.measured["rendered_views"] == SMALL.views + SMALL.eval_views
    after = shard_samples(output / "shards" / f"{edited.shard}.tar")
    duck_key = next(item.key for item in listing() if Path(item.locator) == duck_file)
    (bunny_key,) = set(before) - {duck_key}
    assert after[bunny_key] == before[bunny_key]  # copied as it was
    was, now = (json.loads(samples[duck_key]["json"]) for samples in (before, after))
    assert now["source_sha256"] != was["source_sha256"] and now["mesh"]["vertices"] != was["mesh"]["vertices"]


def test_an_objaverse_glb_that_arrives_after_a_run_lands_on_the_rerun(tmp_path):
    """A GLB not yet in the mirror fails permanently (not retried while nothing changed); once it arrives its
    fingerprint is another, so the rerun makes it."""
    mirror = write_objaverse_mirror(tmp_path / "mirror", {UIDS[2]: (None, "Arrives Later", "by")})
    storage, output = Storage(), tmp_path / "out"
    name = "train-000000-of-000004"

    def run():
        plan = PartPlan(name, "train", list(list_objaverse(mirror)))
        return commit_part(plan, storage, str(output), settings_for(output))

    missing = run()
    assert missing.samples == 0 and missing.error_rows[0]["kind"] == "permanent"
    assert run().skipped  # negative control: still missing, so the failure stands and nothing is retried
    write_glb(mirror / "hf-objaverse-v1" / "glbs" / "000-000" / f"{UIDS[2]}.glb", "duck.obj")
    arrived = run()
    assert (arrived.samples, arrived.errors, arrived.made) == (1, 0, 1)


def test_a_mesh_over_the_size_cap_fails_before_blender_is_asked_and_the_part_goes_on(tmp_path):
    """objects.max_item_mb: a file past the cap is a permanent read failure; Blender is never sent it, and the
    asset after it in the part still is."""
    folder = tmp_path / "meshes"
    write_glb(folder / "a_big.glb", "duck.obj")  # 133 KB, its texture inside
    write_glb(folder / "b_small.glb", "teddy2_VHACD_CHs.obj")  # 45 KB
    items = sorted(list_mesh_folder(str(folder)), key=lambda item: item.locator)  # the big one first
    big, small = ((folder / n).stat().st_size for n in ("a_big.glb", "b_small.glb"))
    assert small < big
    sent = tmp_path / "sent_to_blender.txt"
    # A Blender child that notes each mesh it is sent and refuses it.
    blender = fake_python(tmp_path / "python", (
        "import json\n"
        "while job:\n"
        f"    open(\"{sent}\", \"a\").write(json.loads(job)[\"mesh\"] + \"\\n\")\n"
        "    os.write(fd, json.dumps(dict(ok=False, error=\"refused\", stage=\"import\")).encode() + b\"\\n\")\n"
        "    job = sys.stdin.readline()"))
    render = dataclasses.replace(SMALL, python=blender)
    output = tmp_path / "out"
    capped = commit_part(PartPlan("train-000000-of-000004", "train", items), Storage(), str(output),
                         settings_for(output, render, max_item_bytes=(small + big) // 2))
    errors = {Path(r["locator"]).name: r for r in capped.error_rows}
    assert errors["a_big.glb"]["stage"] == "read" and errors["a_big.glb"]["kind"] == "permanent"
    assert "ItemTooLarge" in errors["a_big.glb"]["error"] and "max_item_mb" in errors["a_big.glb"]["error"]
    assert errors["b_small.glb"]["stage"] == "import"  # the next asset went on to Blender
    assert sent.read_text().splitlines() == [str((folder / "b_small.glb").resolve())]
    # Negative control: under a cap above both files, Blender is sent both.
    sent.unlink()
    uncapped = commit_part(PartPlan("train-000001-of-000004", "train", items), Storage(), str(output),
                           settings_for(output, render, max_item_bytes=big))
    assert {r["stage"] for r in uncapped.error_rows} == {"import"}
    assert sent.read_text().splitlines() == [str((folder / n).resolve()) for n in ("a_big.glb", "b_small.glb")]


# -- shards of 3D samples ----------------------------------------------------------------------------------------

@pytest.fixture
def broken_meshes(tmp_path) -> list[ItemSpec]:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "corrupt.glb").write_bytes(b"glTF" + np.random.default_rng(0).bytes(3000))
    (folder / "no_faces.obj").write_text("v 0 0 0\nv 1 0 0\nnot an obj line\n")
    (folder / "points.ply").write_text("not a ply header\n")
    return list(list_mesh_folder(str(folder)))


def test_a_mesh_that_makes_the_importer_fail_is_recorded_and_the_others_land(tmp_path, broken_meshes):
    good = list_pybullet_objects(named_only=True)[:3]  # bunny, duck, teddy
    items = [good[0], broken_meshes[0], good[1], broken_meshes[1], good[2], broken_meshes[2]]
    output = tmp_path / "out"
    result = commit_part(PartPlan("train-000000-of-000004", "train", items), Storage(), str(output),
                         settings_for(output))
    assert (result.samples, result.errors) == (3, 3)
    errors = {Path(r["locator"]).name: r for r in result.error_rows}
    assert set(errors) == {"corrupt.glb", "no_faces.obj", "points.ply"}
    assert all(r["stage"] == "import" for r in errors.values())
    assert "no faces" in errors["no_faces.obj"]["error"]
    for row in errors.values():  # each failure keeps the Blender log it points at
        log = Path(row["error"].rsplit("(Blender log: ", 1)[1].rstrip(")"))
        assert log.is_file() and "[atoken] import failed" in log.read_text()

    samples = shard_samples(output / "shards" / f"{result.shard}.tar")
    assert sorted(samples) == sorted(i.key for i in good)
    duck = load_object_sample(samples["pybullet_duck"]["npz"])
    voxels, features = duck["voxels"], duck["features"]
    assert voxels.dtype == np.uint8 and voxels.shape[1] == 3 and voxels.max() < 64
    assert features.dtype == np.float16 and features.shape == (len(voxels), 768)
    assert len(np.unique(voxels, axis=0)) == len(voxels)
    assert duck["views"].shape == (6, 64, 64, 4) and duck["c2w"].shape == (6, 4, 4)
    assert duck["eval_views"].shape == (2, 64, 64, 4) and duck["eval_c2w"].shape == (2, 4, 4)
    assert duck["view_index"].max() < 6
    manifest = {r["key"]: r for r in read_parquet(output / "manifests" / f"{result.shard}.parquet")}
    assert manifest["pybullet_duck"]["voxels"] == len(voxels) and manifest["pybullet_duck"]["views"] == 6
    assert manifest["pybullet_bunny"]["flags"] == ["untextured"] and manifest["pybullet_duck"]["flags"] == []
    # What rendering took is measured for the stats, never written into a sample (the same asset, the same bytes).
    assert result.measured["render_seconds"] > 0 and result.measured["rendered_views"] == 3 * (6 + 2)
    assert result.measured["reused_renders"] == 0
    meta = json.loads(samples["pybullet_duck"]["json"])
    assert meta["caption"] == "rubber duck" and meta["render"]["views"] == 6 and meta["eval_views"] == 2
    assert meta["renders"] == "renders/pybullet_duck.tar" and "seconds" not in meta and "seconds" not in meta["render"]
    with tarfile.open(output / "renders" / "pybullet_duck.tar") as kept:  # one object per asset
        assert {"transforms.json", "blender.log", "000.png", "005_depth.exr", "depth.npy"} <= set(kept.getnames())
    kept_objects = sorted(p.name for p in (output / "renders").iterdir() if p.is_file())
    assert kept_objects == ["pybullet_bunny.tar", "pybullet_duck.tar", "pybullet_teddy.tar"]


def test_a_rebuilt_shard_renders_only_what_never_finished(tmp_path):
    items = list_pybullet_objects(named_only=True)[3:5]  # mug, lego
    storage, output = Storage(), tmp_path / "out"
    plan = PartPlan("train-000000-of-000004", "train", items)
    first = commit_part(plan, storage, str(output), settings_for(output))
    assert (first.samples, first.errors) == (2, 0)
    before = shard_samples(output / "shards" / f"{first.shard}.tar")
    # A kill after the assets rendered but before the manifest: the shard is rebuilt, its renders reused.
    storage.delete(record_uri(str(output), "train-000000-of-000004"))
    (output / "renders" / "pybullet_lego.tar").unlink()  # ...except one asset's, as if never rendered
    second = commit_part(plan, storage, str(output), settings_for(output))
    after = shard_samples(output / "shards" / f"{second.shard}.tar")
    assert second.samples == 2 and second.measured["reused_renders"] == 1  # the mug's
    assert second.measured["rendered_views"] == SMALL.views + SMALL.eval_views  # the lego's, rendered again
    assert after == before  # same cameras, same renders: the same samples, byte for byte
    # Renders made with other settings are not reused.
    storage.delete(record_uri(str(output), "train-000000-of-000004"))
    third = commit_part(plan, storage, str(output), settings_for(output, RenderSettings(views=4, resolution=64,
                                                                                        samples=4)))
    metas = [json.loads(f["json"]) for f in shard_samples(output / "shards" / f"{third.shard}.tar").values()]
    assert third.samples == 2 and third.measured["reused_renders"] == 0 and all(m["views"] == 4 for m in metas)


def test_an_asset_gives_the_same_shard_bytes_wherever_its_output_lives(tmp_path):
    """Issue 15: a sample held its render seconds and the absolute path of its renders, so two runs (or one
    run into another folder) wrote different shards from the same asset."""
    plan = PartPlan("train-000000-of-000004", "train", list_pybullet_objects(named_only=True)[1:2])  # duck
    outputs = [tmp_path / "a" / "out", tmp_path / "somewhere" / "else" / "out"]
    shards = {commit_part(plan, Storage(), str(output), settings_for(output)).shard for output in outputs}
    assert len(shards) == 1
    for relative in (f"shards/{min(shards)}.tar", f"manifests/{min(shards)}.parquet"):
        assert (outputs[0] / relative).read_bytes() == (outputs[1] / relative).read_bytes(), relative


def test_evaluation_views_are_rendered_beside_the_inputs_and_never_reach_the_voxel_features(tmp_path, monkeypatch):
    """Issue 17: every rendered view fed voxelise_views and evaluation scored views 3, 7, 11, 15 of them, so 3D
    PSNR was measured on its own inputs. The evaluation views are rendered at other cameras, kept apart in the
    sample, and the voxelisation sees the input views alone: its output is the same with or without them."""
    import atoken.preprocess.objects as objects

    given_cameras = []
    voxelise = objects.voxelise_views

    def spy(rgba, depth, c2w, *args):
        given_cameras.append(np.array(c2w))
        return voxelise(rgba, depth, c2w, *args)

    monkeypatch.setattr(objects, "voxelise_views", spy)
    plan = PartPlan("train-000000-of-000004", "train", list_pybullet_objects(named_only=True)[1:2])  # duck
    storage, samples, results = Storage(), {}, {}
    for eval_views in (0, 3):
        output = tmp_path / f"eval_views_{eval_views}"
        render = dataclasses.replace(SMALL, eval_views=eval_views)
        results[eval_views] = commit_part(plan, storage, str(output), settings_for(output, render))
        (sample,) = shard_samples(output / "shards" / f"{results[eval_views].shard}.tar").values()
        samples[eval_views] = load_object_sample(sample["npz"]), json.loads(sample["json"])
    inputs = camera_poses(SMALL, camera_offset("pybullet_duck"))  # (6, 4, 4)
    assert len(given_cameras) == 2 and all(np.array_equal(c2w, inputs) for c2w in given_cameras)

    (without, _), (with_eval, meta) = samples[0], samples[3]
    for name in ("voxels", "features", "view_index", "views", "c2w", "intrinsics"):
        assert np.array_equal(without[name], with_eval[name]), name
    assert len(without["eval_views"]) == 0 and with_eval["eval_views"].shape == (3, 64, 64, 4)
    assert (meta["views"], meta["eval_views"], results[3].measured["rendered_views"]) == (6, 3, 9)
    # The stored cameras: the evaluation ones, none at an input camera's position, and renders of the duck.
    np.testing.assert_allclose(with_eval["eval_c2w"], eval_camera_poses(dataclasses.replace(SMALL, eval_views=3),
                                                                        camera_offset("pybullet_duck")), atol=1e-6)
    held_out, seen = (with_eval[name][:, :3, 3] / SMALL.radius for name in ("eval_c2w", "c2w"))  # unit directions
    angles = np.arccos(np.clip(held_out @ seen.T, -1, 1))  # (3, 6)
    assert angles.min() > 0.99 / SMALL.views  # eval_camera_angles: >= 1/N rad from every input camera
    assert all((view[..., 3] > 0).any() for view in with_eval["eval_views"])
    assert not any(np.array_equal(e, v) for e in with_eval["eval_views"] for v in with_eval["views"])

    # Kept renders are reused only for the same evaluation views: another count renders the asset again.
    output = tmp_path / "eval_views_3"
    storage.delete(record_uri(str(output), "train-000000-of-000004"))
    again = commit_part(plan, storage, str(output), settings_for(output, dataclasses.replace(SMALL, eval_views=1)))
    (sample,) = shard_samples(output / "shards" / f"{again.shard}.tar").values()
    assert again.measured["reused_renders"] == 0 and len(load_object_sample(sample["npz"])["eval_views"]) == 1


def test_assets_with_a_dropped_flag_become_quality_errors(tmp_path):
    items = list_pybullet_objects(named_only=True)[:2]  # bunny (untextured), duck
    output = tmp_path / "out"
    result = commit_part(PartPlan("train-000000-of-000004", "train", items), Storage(), str(output),
                         settings_for(output, drop_flags=("untextured",)))
    assert result.samples == 1 and result.error_rows[0]["key"] == "pybullet_bunny"
    assert result.error_rows[0]["stage"] == "quality" and "untextured" in result.error_rows[0]["error"]


# -- assets that break Blender ---------------------------------------------------------------------------------

def fake_python(path: Path, body: str) -> str:
    """An interpreter that answers the parent like the Blender child, then misbehaves: `body` is Python, run
    with the first job's line in `job`."""
    script = (f"#!/bin/sh\nexec {sys.executable} -c '\nimport os, sys, signal, time\n"
              "fd = int(sys.argv[-1])\nos.write(fd, b\"{\\\"ready\\\": true}\\n\")\njob = sys.stdin.readline()\n"
              f"{body}\n' \"$@\"\n")
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_hanging_blender_is_killed_at_the_timeout_and_the_next_asset_renders(tmp_path):
    bunny, duck = list_pybullet_objects(named_only=True)[:2]
    output = tmp_path / "out"
    slow = RenderSettings(views=400, resolution=128, samples=16, timeout_s=2.0)  # minutes of work in 2 s
    first = commit_part(PartPlan("train-000000-of-000004", "train", [bunny]), Storage(), str(output),
                        settings_for(output, slow))
    row = first.error_rows[0]
    assert first.samples == 0 and row["stage"] == "timeout" and "timed out after 2 s" in row["error"]
    log = (output / "renders" / "pybullet_bunny" / "blender.log").read_text()
    assert "[atoken] view 1/404" in log and "[atoken] killed" in log  # 400 + 4 evaluation views; then why
    second = commit_part(PartPlan("train-000001-of-000004", "train", [duck]), Storage(), str(output),
                         settings_for(output))
    assert (second.samples, second.errors) == (1, 0)


def test_a_crashing_blender_is_recorded_and_the_next_asset_renders(tmp_path):
    bunny, duck = list_pybullet_objects(named_only=True)[:2]
    output = tmp_path / "out"
    crashing = RenderSettings(views=4, resolution=64, samples=4, python=fake_python(
        tmp_path / "python", "print(\"Writing: /tmp/blender.crash.txt\", flush=True)\n"
                             "os.kill(os.getpid(), signal.SIGSEGV)"))
    first = commit_part(PartPlan("train-000000-of-000004", "train", [bunny]), Storage(), str(output),
                        settings_for(output, crashing))
    row = first.error_rows[0]
    assert row["stage"] == "crash" and "SIGSEGV" in row["error"]
    log = (output / "renders" / "pybullet_bunny" / "blender.log").read_text()
    assert "Blender died with signal SIGSEGV" in log
    second = commit_part(PartPlan("train-000001-of-000004", "train", [duck]), Storage(), str(output),
                         settings_for(output))
    assert (second.samples, second.errors) == (1, 0)


def test_an_interpreter_without_blender_fails_each_asset_with_one_line(tmp_path):
    no_bpy = tmp_path / "python"
    no_bpy.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named bpy' >&2\nexit 1\n")
    no_bpy.chmod(0o755)
    output = tmp_path / "out"
    settings = settings_for(output, RenderSettings(views=4, resolution=64, samples=4, python=str(no_bpy)))
    result = commit_part(PartPlan("train-000000-of-000004", "train", list_pybullet_objects(2)), Storage(), str(output),
                         settings)
    assert result.errors == 2 and all("No module named bpy" in r["error"] for r in result.error_rows)
    assert all(r["stage"] == "crash" for r in result.error_rows)
    missing = settings_for(output, RenderSettings(views=4, resolution=64, samples=4, python=str(tmp_path / "none")))
    result = commit_part(PartPlan("train-000001-of-000004", "train", list_pybullet_objects(1)), Storage(), str(output),
                         missing)
    assert result.errors == 1 and "cannot start" in result.error_rows[0]["error"]


# -- the standalone job ----------------------------------------------------------------------------------------

SHIM = ("import argparse, sys\nfrom atoken.preprocess.objects import add_3d_arguments, preprocess_3d_main\n"
        "parser = argparse.ArgumentParser()\nadd_3d_arguments(parser)\n"
        "sys.exit(preprocess_3d_main(parser.parse_args()))")


def run_3d(args: list[str]) -> subprocess.CompletedProcess:
    """`atoken preprocess 3d ARGS` (the CLI calls the same two functions)."""
    return subprocess.run([sys.executable, "-c", SHIM, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_preprocess_3d_end_to_end_over_ray_with_resume(tmp_path):
    folder = tmp_path / "meshes"
    folder.mkdir()
    for name in ("duck.obj", "duck.mtl", "duckCM.png", "bunny.obj"):
        shutil.copyfile(PYBULLET / name, folder / name)
    trimesh.load(PYBULLET / "duck.obj").export(folder / "duck_copy.glb")
    (folder / "broken.glb").write_bytes(b"glTF" + bytes(100))
    out = tmp_path / "out"
    args = [str(folder), str(out), "--views", "4", "--eval-views", "2", "--resolution", "64", "--samples", "4",
            "--assets-per-shard", "2", "--val-every", "2", "--no-progress"]  # val: broken.glb + duck.obj
    first = run_3d(args)
    assert first.returncode == 0, first.stderr[-3000:]
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples"] == 3 and stats["failures"] == 1 and stats["views"] == 12
    assert stats["seconds_per_view"] > 0 and stats["items_per_second"] > 0 and stats["flagged"]["untextured"] == 1
    assert stats["views_rendered"] == 3 * (4 + 2)  # the input views, and the evaluation views beside them
    errors = read_parquet(out / "errors.parquet")
    assert errors[0]["stage"] == "import" and errors[0]["locator"].endswith("broken.glb")
    manifest = read_parquet(out / "manifest.parquet")
    assert sorted(r["voxels"] > 0 for r in manifest) == [True] * 3
    assert "atoken 3d:" in first.stdout + first.stderr  # the per-asset progress lines
    assert "atoken 3d: 4 assets, 3 samples, 1 failed" in first.stdout  # counted by the job, not a held listing
    # A kill before any part's record was committed: the rerun makes every asset again, from its kept renders.
    for record in (out / "parts").glob("*.parquet"):
        record.unlink()
    second = run_3d(args)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((out / "_stats.json").read_text())
    assert again["samples"] == 3 and again["parts_skipped"] == 0 and again["views_rendered"] == 0
    assert "reused renders" in second.stdout + second.stderr
    shards = {p.stem for p in (out / "shards").glob("*.tar")}
    assert shards == {r["shard"] for r in read_parquet(out / "manifest.parquet")}


def test_preprocess_3d_refuses_bad_arguments_before_any_work(tmp_path):
    bad = run_3d(["builtin:pybullet", str(tmp_path / "out"), "--views", "0"])
    assert bad.returncode != 0 and "views" in bad.stderr
    assert not (tmp_path / "out").exists()
    unknown = run_3d(["builtin:nothing", str(tmp_path / "out")])
    assert unknown.returncode != 0 and "unknown built-in set" in unknown.stderr
    (tmp_path / "empty").mkdir()
    empty = run_3d([str(tmp_path / "empty"), str(tmp_path / "out")])  # the preflight, before OUT and Ray
    assert empty.returncode != 0 and "holds no meshes" in empty.stderr
    assert not (tmp_path / "out").exists()


def test_shard_layout_matches_the_image_and_video_jobs(tmp_path):
    output = tmp_path / "out"
    result = commit_part(PartPlan("val-000000-of-000004", "val", list_pybullet_objects(1)), Storage(), str(output),
                         settings_for(output))
    for uri in (shard_uri(str(output), result.shard), manifest_uri(str(output), result.shard),
                record_uri(str(output), "val-000000-of-000004")):
        assert Path(uri).is_file()
    with tarfile.open(output / "shards" / f"{result.shard}.tar") as tar:
        assert sorted(tar.getnames()) == ["pybullet_bunny.json", "pybullet_bunny.npz"]
    table = pq.read_table(io.BytesIO((output / "manifests" / f"{result.shard}.parquet").read_bytes()))
    assert {"views", "voxels", "flags", "license"} <= set(table.column_names)


def test_kept_renders_are_named_by_the_sources_content_so_an_edited_mesh_is_rendered_again():
    from atoken.preprocess.objects import renders_key

    mesh = ItemSpec("file_duck_0123456789", "folder:/m", "/m/duck.obj", fingerprint="1000:1")
    edited = ItemSpec("file_duck_0123456789", "folder:/m", "/m/duck.obj", fingerprint="1200:2")
    assert renders_key(mesh) != renders_key(edited) and renders_key(mesh).startswith(mesh.key + "-")
    assert renders_key(mesh) == renders_key(ItemSpec(mesh.key, "folder:/m", "/m/duck.obj", fingerprint="1000:1"))
    builtin = list_pybullet_objects(1)[0]
    assert renders_key(builtin) == builtin.key, "an installed mesh never changes: its key alone"
