"""3D assets in, the tokenizer's 3D samples out: sources, one asset's processing, `atoken preprocess 3d`.

Sources stream assets as `ItemSpec`s (key + locator + fingerprint), like the image and video sources: the
meshes shipped in `pybullet_data` (the built-in set), any local folder of GLB/GLTF/OBJ/PLY/FBX/STL files, and
Objaverse through the `objaverse` package, read from a local mirror in the package's own layout
(`hf-objaverse-v1/{object-paths.json.gz, metadata/*.json.gz, glbs/*/*.glb}`).

`ObjectSettings.process` is the shard writer's per-item contract (preprocess/writer.py): render the asset
in a Blender child (preprocess/render.py), voxelise its input views (preprocess/voxels.py), flag it, and return
one sample: `<key>.npz` (voxels, fp16 features, the input views and their cameras, and the evaluation views and
theirs) + `<key>.json`. The evaluation views are rendered at cameras no input view shares and never reach the
voxelisation (issue 17): 3D evaluation scores them, so it never measures the views the features came from.

With `keep_renders` every asset keeps one object beside the shards, OUT/renders/<key>[-<source hash>].tar: the
RGBA PNGs, float depth EXRs, transforms.json, the child's info.json and its blender.log (an asset that failed
keeps OUT/renders/<key>/blender.log). When a part is rebuilt (a kill before its record, or a rerun retrying its
failed assets) the assets that rendered before are voxelised from their kept renders instead of being rendered
again, so a rerun renders only what never finished; a source whose content changed (size and mtime, or ETag)
has another name and is rendered again.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import heapq
import io
import itertools
import json
import tarfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atoken.pipeline.storage import LocalStaging, Storage, join
from atoken.preprocess.images import ItemError
from atoken.preprocess.render import (
    MESH_SUFFIXES,
    RenderedViews,
    RenderError,
    RenderSettings,
    camera_offset,
    load_views,
    render_object,
    render_settings,
)
from atoken.preprocess.sources import ItemSpec, SourceError, list_folder
from atoken.preprocess.voxels import FLAGS, VoxelSettings, voxelise_views

# The named meshes of pybullet_data (file, caption); OBJ files, some with MTL materials and textures.
PYBULLET_OBJECTS = {
    "bunny": ("bunny.obj", "bunny"),
    "duck": ("duck.obj", "rubber duck"),
    "teddy": ("teddy2_VHACD_CHs.obj", "teddy bear"),
    "mug": ("objects/mug.obj", "mug"),
    "lego": ("lego/lego.obj", "lego brick"),
    "torus": ("torus/torus_textured.obj", "textured torus"),
    "soccerball": ("soccerball.obj", "soccer ball"),
    "sphere": ("textured_sphere_smooth.obj", "checkered sphere"),
    "table": ("table/table.obj", "table"),
}
OBJAVERSE_VERSION = "hf-objaverse-v1"  # the folder objaverse 0.1.x keeps under its BASE_PATH


# -- sources ---------------------------------------------------------------------------------------------------

def pybullet_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pybullet_data")
    if spec is None or spec.origin is None:
        raise SourceError("built-in set pybullet: pybullet is not installed (pip install pybullet==3.2.7)")
    return Path(spec.origin).parent


def list_pybullet_objects(limit: int | None = None, named_only: bool = False) -> list[ItemSpec]:
    """pybullet_data's named meshes, then its 1000 procedurally generated objects (random_urdfs/NNN/NNN.obj)."""
    root = pybullet_data_dir()
    items = [ItemSpec(key=f"pybullet_{name}", source="pybullet", locator=str(root / path), caption=caption)
             for name, (path, caption) in PYBULLET_OBJECTS.items()]
    if not named_only:
        items += [ItemSpec(key=f"pybullet_random_{p.stem}", source="pybullet", locator=str(p))
                  for p in sorted((root / "random_urdfs").glob("*/*.obj")) if p.stem == p.parent.name]
    return items[:limit]


BUILTIN_3D_SOURCES = {
    "pybullet": list_pybullet_objects,
    "pybullet-named": lambda limit=None: list_pybullet_objects(limit, named_only=True),
}


def list_mesh_folder(path: str, limit: int | None = None) -> Iterator[ItemSpec]:
    """Every mesh file under a folder, recursively, streamed (preprocess/sources.py list_folder: each with its size
    and mtime as its fingerprint, so an edited mesh is made again). OBJ sidecars, MTL and textures, are found by
    Blender."""
    return list_folder(path, limit, suffixes=MESH_SUFFIXES)


def objaverse_dir(root: str | Path | None) -> Path:
    """The mirror's versioned folder: ROOT/hf-objaverse-v1, or ROOT itself when it is that folder."""
    base = Path(root) if root else Path.home() / ".objaverse"
    return base if base.name == OBJAVERSE_VERSION else base / OBJAVERSE_VERSION


def list_objaverse(root: str | Path | None = None, uids: list[str] | None = None, limit: int | None = None,
                   download: bool = False, download_processes: int = 4) -> Iterator[ItemSpec]:
    """Objaverse (1.0) assets through the `objaverse` package, from a mirror in its layout, streamed.

    Every wanted UID is listed (every UID of the mirror, or the first `limit` of `uids`), whether its GLB is in
    the mirror or not: a missing one fails at the read stage and is recorded, and a rerun after it arrives lands
    it (its fingerprint, the GLB's size and mtime, is "" until then). Assets come in path order, folder by
    folder, so each metadata file is read once; the job plans by key hash, so the order decides nothing else.
    The mirror, the UIDs and `download` (fetch the missing GLBs with `objaverse.load_objects` first; needs
    huggingface.co) are checked and done at the call, before the first item. The driver then holds the package's
    uid → path dict (~800k entries: the package reads no less) and the wanted UIDs, never a list of items nor
    more than one folder's captions."""
    import objaverse

    folder = objaverse_dir(root)
    if not (folder / "object-paths.json.gz").is_file():
        raise SourceError(f"objaverse mirror {folder}: no object-paths.json.gz (the objaverse package's layout: "
                          f"{OBJAVERSE_VERSION}/object-paths.json.gz, metadata/NNN-NNN.json.gz, glbs/NNN-NNN/UID.glb)")
    # objaverse 0.1.x reads its location from module globals and takes no path argument.
    saved = objaverse.BASE_PATH, objaverse._VERSIONED_PATH
    objaverse.BASE_PATH, objaverse._VERSIONED_PATH = str(folder.parent), str(folder)
    try:
        paths = objaverse._load_object_paths()  # uid → glbs/NNN-NNN/uid.glb
        wanted = _wanted_uids(folder, paths, uids, limit)
        if download:
            missing = [uid for uid in wanted if not (folder / paths[uid]).is_file()]
            if missing:
                objaverse.load_objects(missing, download_processes=download_processes)
    finally:
        objaverse.BASE_PATH, objaverse._VERSIONED_PATH = saved
    return _objaverse_items(folder, paths, wanted)


def _wanted_uids(folder: Path, paths: dict[str, str], uids: list[str] | None, limit: int | None) -> list[str]:
    """The UIDs to list, sorted by path (folder, then UID): every UID of the mirror, or the first `limit` of
    `uids` (each of which must be in the mirror's object paths)."""
    if uids is None:
        if limit is not None:  # a few (a preflight's one asset, objects.limit): no sort of 800k paths
            return heapq.nsmallest(limit, paths, key=paths.get)
        return sorted(paths, key=paths.get)
    given = [uid.removesuffix(".glb") for uid in uids]
    unknown = [uid for uid in given if uid not in paths]
    if unknown:
        raise SourceError(f"objaverse mirror {folder}: {len(unknown)} UIDs are not in object-paths.json.gz, "
                          f"e.g. {unknown[0]}")
    return sorted(given[:limit], key=paths.get)


def _objaverse_items(folder: Path, paths: dict[str, str], wanted: list[str]) -> Iterator[ItemSpec]:
    """The wanted UIDs as items, one glbs/NNN-NNN folder at a time: captions are the assets' names, read from the
    folder's metadata file and dropped when the next folder's is read (objaverse.load_annotations would hold
    every requested annotation, GBs for all 800k, at once)."""
    for folder_id, in_folder in itertools.groupby(wanted, key=lambda uid: Path(paths[uid]).parent.name):
        uids = list(in_folder)
        metadata = folder / "metadata" / f"{folder_id}.json.gz"
        entries = _read_objaverse_metadata(str(metadata)) if metadata.is_file() else {}
        names = {uid: (entries.get(uid) or {}).get("name") or "" for uid in uids}
        del entries  # the folder's whole annotations: only the names travel on
        for uid in uids:
            glb = folder / paths[uid]
            yield ItemSpec(key=f"objaverse_{uid}", source="objaverse", locator=str(glb), caption=names[uid],
                           fingerprint=_file_fingerprint(glb))


def _file_fingerprint(path: Path) -> str:
    """"size:mtime_ns", as list_folder fingerprints a file: a GLB replaced under the same UID is another item
    (made again, and its renders are not reused: renders_key). "" while the file is absent."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _read_objaverse_metadata(path: str) -> dict:
    with gzip.open(path, "rb") as handle:
        return json.load(handle)


@functools.lru_cache(maxsize=4)
def _objaverse_metadata(path: str) -> dict:
    return _read_objaverse_metadata(path)  # a worker's: its assets' annotations, a few folders kept


def objaverse_annotation(locator: str) -> dict:
    """An Objaverse asset's name, licence and attribution, from the package's metadata file for its folder
    (metadata/NNN-NNN.json.gz beside glbs/NNN-NNN/UID.glb; objaverse.load_annotations reads the same files but
    first loads the whole 800k-entry object-path index, on every call)."""
    glb = Path(locator)
    metadata = glb.parents[2] / "metadata" / f"{glb.parent.name}.json.gz"
    if not metadata.is_file():
        return {"uid": glb.stem}
    entry = _objaverse_metadata(str(metadata)).get(glb.stem, {})
    return {
        "uid": glb.stem,
        "license": entry.get("license"),
        "name": entry.get("name"),
        "author": (entry.get("user") or {}).get("username"),
        "source_url": entry.get("viewerUrl") or entry.get("uri"),
        "tags": [tag.get("name") for tag in entry.get("tags", []) if isinstance(tag, dict)],
    }


class DroppedAsset(ItemError):
    """An asset that rendered but carries a flag the job was told to leave out."""
    stage = "quality"


# -- one asset -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectSettings:
    """The shard writer's settings for 3D assets (same `.process` contract as ImageSettings/VideoSettings)."""
    render: RenderSettings
    voxels: VoxelSettings
    output: str  # the job's OUT: each asset's Blender log (and renders) go to OUT/renders/<key>/
    storage: Storage = field(default_factory=Storage)
    # objects.max_item_mb: a mesh file past this is refused at the read (ItemTooLarge, permanent), before a
    # Blender child is asked to open it; the writer's read (writer._read_with_retries) applies it.
    max_item_bytes: int | None = 512 << 20
    keep_renders: bool = True
    # Assets with any of these flags become errors (stage "quality"). An empty asset has no voxels, so no
    # tokens: it is left out unless asked for.
    drop_flags: tuple[str, ...] = ("empty",)
    log_assets: bool = True  # one line per asset (Ray forwards it to the driver): views, s/view, voxels

    def process(self, data: bytes, item: ItemSpec) -> list:
        # Imported here: pipeline/cli.py imports this module to build its parser, and the writer pulls in
        # webdataset, pyarrow and PyAV.
        from atoken.preprocess.writer import ShardSample

        key, npz, meta, measured = process_object(data, item, self)
        return [ShardSample(key, {"npz": npz}, meta, measured)]


def renders_uri(output: str, key: str) -> str:
    return join(output, "renders", key)


def renders_key(item: ItemSpec) -> str:
    """The folder name of an asset's kept renders: its key, plus a hash of its source's fingerprint (size and
    mtime, or ETag) when it has one, so a mesh whose content changed is rendered again, not reused."""
    if not item.fingerprint:
        return item.key
    return f"{item.key}-{hashlib.sha256(item.fingerprint.encode()).hexdigest()[:8]}"


def process_object(data: bytes, item: ItemSpec, settings: ObjectSettings) -> tuple[str, bytes, dict, dict]:
    """Render (or reuse the kept renders of) one asset, voxelise it, flag it → (key, npz bytes, metadata,
    measured). The metadata is a function of the asset and the settings alone; what this run measured (seconds,
    views rendered, renders reused) comes apart, as writer.ShardSample.measured."""
    started = time.perf_counter()
    folder_uri = renders_uri(settings.output, renders_key(item))
    offset = camera_offset(item.key)
    with LocalStaging() as staging:
        rendered = _kept_renders(settings, folder_uri, offset, staging / "kept") if settings.keep_renders else None
        reused = rendered is not None
        if rendered is None:
            mesh = _local_mesh(data, item, staging)
            try:
                rendered = render_object(mesh, staging / "views", settings.render, offset)
            except RenderError as exc:
                log = staging / "views" / "blender.log"
                if log.is_file():
                    settings.storage.upload(log, join(folder_uri, "blender.log"))
                raise RenderError(exc.reason, exc.stage, join(folder_uri, "blender.log")) from exc
        # Keeping the renders is I/O (a file commit each, ~0.2 s for 16 views): it overlaps the voxelisation.
        with ThreadPoolExecutor(1) as uploads:
            kept = None if reused else uploads.submit(_keep, rendered.folder, folder_uri, settings)
            # The input views alone: the evaluation views (rendered.eval_*) must not shape the features.
            voxelised = voxelise_views(rendered.rgba, rendered.depth, rendered.c2w, rendered.intrinsics,
                                       rendered.info, settings.voxels)
            if kept is not None:
                kept.result()
    dropped = sorted(set(voxelised.flags) & set(settings.drop_flags))
    if dropped:
        raise DroppedAsset(f"dropped for flags {', '.join(dropped)}: "
                           + "; ".join(voxelised.reasons[flag] for flag in dropped))
    npz = _npz(voxelised, rendered, settings.voxels.store_views)
    info = rendered.info
    views, eval_views = len(rendered.c2w), len(rendered.eval_c2w)
    meta = {
        "key": item.key,
        "width": settings.render.resolution, "height": settings.render.resolution,
        "views": views, "eval_views": eval_views, "voxels": int(len(voxelised.voxels)), "grid": settings.voxels.grid,
        "patch": settings.voxels.patch, "feature_dim": int(voxelised.features.shape[1]),
        "flags": voxelised.flags, "flag_reasons": voxelised.reasons, "quality": voxelised.stats,
        "mesh": {k: info.get(k) for k in ("mesh_objects", "vertices", "faces", "materials", "textures",
                                          "missing_textures", "color_attributes")},
        "normalisation": {"scale": info["scale"], "offset": info["offset"]},
        "render": {**settings.render.fingerprint(), "camera_offset": list(offset), "device": info.get("device"),
                   "blender": info.get("blender")},
        # Relative to the job's output (see renders_uri), so that the sample is the same wherever the output lives.
        "renders": f"renders/{renders_key(item)}.tar" if settings.keep_renders else None,
        "blender_log": f"renders/{renders_key(item)}.tar:blender.log" if settings.keep_renders
        else f"renders/{renders_key(item)}/blender.log",
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "sha256": hashlib.sha256(npz).hexdigest(),
        "license": None,
    }
    render_seconds = 0.0 if reused else sum(info["view_seconds"])
    measured = {"seconds": time.perf_counter() - started, "render_seconds": render_seconds,
                "rendered_views": 0 if reused else views + eval_views, "reused_renders": int(reused)}
    if item.source == "objaverse":
        annotation = objaverse_annotation(item.locator)
        meta.update(annotation, objaverse=annotation)
    if settings.log_assets:
        what = "reused renders" if reused else f"{views} + {eval_views} evaluation views in {render_seconds:.1f} " \
                                               f"s ({render_seconds / (views + eval_views):.2f} s/view)"
        print(f"atoken 3d: {item.key}: {what}, {meta['voxels']} voxels, {measured['seconds']:.1f} s"
              + (f", flags {','.join(voxelised.flags)}" if voxelised.flags else ""), flush=True)
    return item.key, npz, meta, measured


def load_object_sample(data: bytes) -> dict[str, np.ndarray]:
    """A sample's npz bytes → its arrays: voxels, features, view_index, and if kept the input views, c2w and
    intrinsics, and the evaluation views eval_views, eval_c2w (samples ingested before issue 17 have none)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _npz(voxelised, rendered: RenderedViews, store_views: bool) -> bytes:
    """The sample's arrays. `views`/`c2w` are the input views (view_index indexes them; the training render
    loss reads them); `eval_views`/`eval_c2w` are the evaluation views, in arrays of their own so that nothing
    reading `views` can pick one up, and evaluation reads nothing else. `intrinsics` (3, 3) serves both."""
    arrays = {"voxels": voxelised.voxels, "features": voxelised.features, "view_index": voxelised.view_index}
    if store_views:
        arrays.update(views=rendered.rgba, c2w=rendered.c2w.astype(np.float32),
                      intrinsics=rendered.intrinsics.astype(np.float32),
                      eval_views=rendered.eval_rgba, eval_c2w=rendered.eval_c2w.astype(np.float32))
    # np.savez_compressed's zlib level 6 took 0.43 s for a 16-view 256 px duck (1.7 MB); level 3 takes 0.14 s
    # (2.2 MB). Same .npz format: np.load reads it.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=3) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _local_mesh(data: bytes, item: ItemSpec, staging: Path) -> Path:
    """A file Blender can open: the locator itself when local (OBJ sidecars beside it keep working), else the
    item's bytes written under the locator's suffix (s3:// or http(s):// sources)."""
    if "://" not in item.locator and Path(item.locator).is_file():
        return Path(item.locator)
    suffix = Path(item.locator.split("?", 1)[0]).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise ItemError(f"not a mesh file ({suffix or 'no suffix'}; known: {', '.join(MESH_SUFFIXES)})")
    path = staging / f"asset{suffix}"
    path.write_bytes(data)
    return path


def _keep(folder: Path, folder_uri: str, settings: ObjectSettings) -> None:
    """With keep_renders, the views, depth, cameras and Blender log as one object, `<folder_uri>.tar` (one
    object per asset, not 2N+4: ~800k instead of ~29M objects for Objaverse at the release preset); without,
    the Blender log alone. The tar is written whole, then committed, so a partial one is never found."""
    storage = settings.storage
    if not settings.keep_renders:
        storage.upload(folder / "blender.log", join(folder_uri, "blender.log"))
        return
    archive = folder.parent / f"{folder.name}-kept.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.iterdir()):
            info = tar.gettarinfo(path, arcname=path.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    storage.move_into(archive, f"{folder_uri}.tar")


def _kept_renders(settings: ObjectSettings, folder_uri: str, offset: tuple[float, float],
                  local: Path) -> RenderedViews | None:
    """The renders a previous attempt kept for this asset, if complete and made with the same settings."""
    storage = settings.storage
    uri = f"{folder_uri}.tar"
    if not storage.exists(uri):
        return None
    local.mkdir(parents=True)
    with tarfile.open(storage.download(uri, local.parent / "kept.tar")) as tar:
        tar.extractall(local, filter="data")  # our own archive; "data" refuses links and paths outside `local`
    transforms = json.loads((local / "transforms.json").read_text())
    wanted = {**settings.render.fingerprint(), "camera_offset": list(offset)}
    if {k: transforms.get("render", {}).get(k) for k in wanted} != wanted:
        return None
    c2w = np.array([f["transform_matrix"] for f in transforms["frames"]]).reshape(-1, 4, 4)
    eval_c2w = np.array([f["transform_matrix"] for f in transforms["eval_frames"]]).reshape(-1, 4, 4)
    K = np.array([[transforms["fl_x"], 0, transforms["cx"]], [0, transforms["fl_y"], transforms["cy"]], [0, 0, 1]])
    return load_views(local, c2w, eval_c2w, K, json.loads((local / "info.json").read_text()))


# -- the standalone job ----------------------------------------------------------------------------------------

def add_3d_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `atoken preprocess 3d SRC OUT` (pipeline/cli.py adds the subparser): the objects section's
    fields (pipeline/preprocess_cli.py), then the renderer's own knobs, which a pipeline config leaves at defaults."""
    from atoken.pipeline.preprocess_cli import add_standalone_arguments

    add_standalone_arguments(parser, "3d", source_help=(
        "a folder of meshes (.glb .gltf .obj .ply .fbx .stl), builtin:pybullet, builtin:pybullet-named, or "
        "objaverse:MIRROR (a folder in the objaverse package's layout; objaverse: alone means ~/.objaverse); "
        "several are listed in order. With --config: replaces the config's objects.sources"))
    parser.add_argument("--fov", type=float, help="field of view in degrees (default: the preset's, 40)")
    parser.add_argument("--radius", type=float, help="camera distance (default: the preset's, 2)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="Cycles threads per worker (0: cores / parallelism)")
    parser.add_argument("--assets-per-process", type=int, default=32,
                        help="assets one Blender child renders before it is replaced (1: a fresh one per asset)")
    parser.add_argument("--drop-flags", default="empty",
                        help=f"comma-separated flags to leave out ({', '.join(FLAGS)}); '' keeps every asset")
    parser.add_argument("--no-keep-renders", action="store_true",
                        help="keep only each asset's Blender log, not its views and depth (no per-asset resume)")
    parser.add_argument("--no-views-in-samples", action="store_true",
                        help="samples carry voxels and features only, not the RGBA views and cameras")
    parser.add_argument("--uids", default=None, help="objaverse: a file with one UID per line")
    parser.add_argument("--download", action="store_true", help="objaverse: fetch missing GLBs first")


def list_3d_source(source: str, limit: int | None = None, uids_file: str | None = None,
                   download: bool = False) -> Iterator[ItemSpec]:
    """One 3D source's assets, streamed; a source that cannot be listed (an unknown set, a missing folder or
    mirror, an unknown UID, a folder without meshes) raises at the call, before the first asset."""
    from atoken.pipeline.config import ConfigError

    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_3D_SOURCES:
            raise ConfigError(f"preprocess 3d: unknown built-in set {name!r} (known: {', '.join(BUILTIN_3D_SOURCES)})")
        return iter(BUILTIN_3D_SOURCES[name](limit))
    if source.startswith("objaverse:"):
        uids = Path(uids_file).read_text().split() if uids_file else None
        return list_objaverse(source.removeprefix("objaverse:") or None, uids, limit, download)
    items = list_mesh_folder(str(Path(source).resolve()), limit)
    first = next(items, None)
    if first is None:
        raise SourceError(f"preprocess 3d: {source} holds no meshes ({', '.join(MESH_SUFFIXES)})")
    return itertools.chain([first], items)


def iter_3d_items(sources: list[str], limit: int | None = None, uids_file: str | None = None,
                  download: bool = False) -> Iterator[ItemSpec]:
    """Every source's assets in order, each cut at `limit`, streamed into the job (its planner spills them:
    preprocess/plan.py); each source is listed when the one before it is done, so at most one Objaverse path
    index is held. What `atoken preprocess 3d` and the ingest_3d stage list."""
    for source in sources:
        yield from list_3d_source(source, limit, uids_file, download)


def first_3d_items(sources: list[str], uids_file: str | None = None) -> list[ItemSpec]:
    """Each source's first asset, or a one-line error naming the source that lists none: the preflight, which
    lists one asset of a source (an Objaverse mirror's path index is read, its 800k assets are not listed)."""
    firsts = []
    for index, source in enumerate(sources):
        first = next(list_3d_source(source, 1, uids_file), None)
        if first is None:
            raise SourceError(f"objects.sources[{index}] ({source}) lists no assets")
        firsts.append(first)
    return firsts


def preprocess_3d_main(args: argparse.Namespace) -> int:
    """`atoken preprocess 3d SRC OUT`: render, voxelise and shard every asset of SRC; print the job's stats."""
    from atoken.pipeline.config import ConfigError
    from atoken.pipeline.preprocess_cli import resolve
    from atoken.pipeline.runner import start_ray

    job = resolve("3d", args)
    section = job.section
    if args.threads < 0:
        raise ConfigError("preprocess 3d --threads: must be >= 0")
    drop = tuple(flag for flag in args.drop_flags.split(",") if flag)
    if set(drop) - set(FLAGS):
        raise ConfigError(f"preprocess 3d --drop-flags: unknown {sorted(set(drop) - set(FLAGS))} (known: {FLAGS})")
    # What the ingest_3d stage renders with (pipeline/stages.py), plus the knobs only this command has.
    render = render_settings(section.preset, section.parallelism, args.threads, views=section.views,
                             eval_views=section.eval_views, resolution=section.resolution, samples=section.samples,
                             fov_degrees=args.fov, radius=args.radius, device=args.device,
                             timeout_s=section.timeout_s, assets_per_process=args.assets_per_process)
    try:
        render.validate("render")
    except ValueError as exc:
        flags = {"fov_degrees": "--fov", "radius": "--radius", "assets_per_process": "--assets-per-process"}
        where, _, message = str(exc).partition(": ")
        raise ConfigError(f"preprocess 3d {flags.get(where.removeprefix('render.'), where)}: {message}") from exc

    # A source that lists nothing stops here, before OUT or Ray are touched; the job then streams the same
    # listing as the ingest_3d stage.
    first_3d_items(section.sources, args.uids)
    storage = job.storage
    storage.check_writable(job.out)
    settings = ObjectSettings(render, VoxelSettings(grid=section.voxel_grid, min_voxels=section.min_voxels,
                                                    store_views=not args.no_views_in_samples),
                              job.out, storage, max_item_bytes=section.max_item_mb << 20,
                              keep_renders=not args.no_keep_renders, drop_flags=drop)
    print(f"atoken 3d: {render.views} input + {render.eval_views} evaluation views at {render.resolution} px, "
          f"{render.samples} samples, device {render.device}, {section.parallelism} worker(s) x {render.threads} "
          f"threads → {job.out}", flush=True)
    start_ray(job.config)
    items = iter_3d_items(section.sources, section.limit, args.uids, args.download)
    stats = run_object_job(items, settings, section.assets_per_shard, section.val_every, section.parallelism,
                           job.progress, "preprocess 3d", resources=job.resources, redo=args.redo)
    # The count comes from the job: the listing streamed through its planner, nothing here held it.
    print(f"atoken 3d: {stats['items']} assets, {stats['samples']} samples, {stats['failures']} failed",
          flush=True)
    print(json.dumps(stats, indent=2))
    return 0


def run_object_job(items: Iterable[ItemSpec], settings: ObjectSettings, assets_per_shard: int, val_every: int,
                   parallelism: int, progress: bool, description: str,
                   resources: dict[str, float] | None = None, redo: bool = False) -> dict:
    """Render, voxelise and shard `items` into settings.output on Ray; the job's stats, render figures added.
    What `atoken preprocess 3d` and the pipeline's ingest_3d stage both run."""
    import dataclasses

    from atoken.preprocess.job import run_ingest_job

    record = {"render": settings.render.fingerprint(), "voxels": dataclasses.asdict(settings.voxels),
              "keep_renders": settings.keep_renders, "drop_flags": list(settings.drop_flags), "val_every": val_every}
    return run_ingest_job(items, settings, settings.storage, settings.output, kind="3d",
                          items_per_part=assets_per_shard, val_every=val_every, parallelism=parallelism,
                          progress=progress, description=description, unit="asset", settings_record=record,
                          resources=resources, redo=redo, job_stats=_render_stats)


def _render_stats(manifest, part_results: list) -> dict:
    """The views in the shards, Blender's seconds per view over those this run rendered (none when every
    asset reused its kept renders or its part was skipped), and how many assets carry each flag."""
    rows = [row for row in manifest.select(["views", "flags"]).to_pylist() if row["views"]]
    rendered = sum(r.measured.get("rendered_views", 0) for r in part_results)
    seconds = sum(r.measured.get("render_seconds", 0.0) for r in part_results)
    flagged = {flag: sum(flag in (row["flags"] or []) for row in rows) for flag in FLAGS}
    return {"views": sum(row["views"] for row in rows), "views_rendered": int(rendered),
            "seconds_per_view": round(seconds / rendered, 4) if rendered else None, "flagged": flagged}


if __name__ == "__main__":
    # `python -m atoken.preprocess.objects SRC OUT [...]`: the same job as `atoken preprocess 3d`.
    # Imported from the package, not run from __main__, so that Ray workers unpickle the package's classes.
    import sys

    from atoken.preprocess import objects

    cli = argparse.ArgumentParser(prog="atoken preprocess 3d", description=objects.preprocess_3d_main.__doc__)
    objects.add_3d_arguments(cli)
    sys.exit(objects.preprocess_3d_main(cli.parse_args()))
