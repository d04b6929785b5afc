"""3D preprocessing cost: time per asset of the child-process renderer next to bare bpy, in the same run, and the
cost of the release's 16 views at 256 px against TRELLIS' 150 views at 512 px, with what 1M assets would take.

    python benchmarks/bench_render.py --out benchmarks/results/render-cpu.json

- bare: one process imports bpy once and renders every asset's views in a loop, with the very scene, cameras and
  Cycles settings of the pipeline (render._render_job called in-process): the floor for the Blender work.
- atoken: `ObjectSettings.process` per asset, as a shard writer calls it: pipes to the Blender child, PNG and
  depth readback, voxels and features, the npz, the renders kept on local storage. Once with a child serving
  many assets (the default, assets_per_process=32: its start is timed apart and each asset pays a 32nd of it)
  and once with a fresh Blender per asset (assets_per_process=1: every asset pays a whole start).
- trellis: the 150-view 512 px preset (128 samples) costs minutes per asset on 2 CPU cores, so it renders a few
  of its views and extrapolates per view; the JSON says so.

The goal (issue 6): atoken ≤ 1.3x bare per asset. Bare and atoken runs alternate per round, so a load change
on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = ["duck", "bunny", "mug", "torus"]  # pybullet_data meshes: textured, untextured, untextured, textured
WORKERS = (1, 16, 64, 256, 1024)


def bare_main(jobs_path: str, result_path: str) -> None:
    """The bare baseline, in its own process: import bpy once, then render each job's views in a loop."""
    started = time.perf_counter()
    import bpy  # noqa: F401 - the one-time import the pipeline's child also pays

    from atoken.preprocess.render import _render_job

    import_seconds = time.perf_counter() - started
    seconds = []
    for job in json.loads(Path(jobs_path).read_text()):
        Path(job["folder"]).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        info = _render_job(job)
        seconds.append({"asset": job["mesh"], "seconds": time.perf_counter() - start,
                        "view_seconds": info["view_seconds"]})
    Path(result_path).write_text(json.dumps({"import_seconds": import_seconds, "assets": seconds}))


def run_bare(meshes: dict[str, Path], settings, work: Path) -> dict:
    from atoken.preprocess.render import camera_offset, camera_poses

    jobs = [{"mesh": str(path), "folder": str(work / "bare" / name), "log": os.devnull,
             "c2w": camera_poses(settings, camera_offset(f"pybullet_{name}")).tolist(),
             "resolution": settings.resolution, "samples": settings.samples, "fov_degrees": settings.fov_degrees,
             "device": settings.device, "threads": settings.threads, "denoise": settings.denoise}
            for name, path in meshes.items()]
    jobs_path, result_path = work / "bare-jobs.json", work / "bare-result.json"
    jobs_path.write_text(json.dumps(jobs))
    subprocess.run([sys.executable, __file__, "--bare", str(jobs_path), str(result_path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(result_path.read_text())


def run_atoken(items, settings, work: Path, assets_per_process: int) -> list[dict]:
    from atoken.pipeline.storage import Storage
    from atoken.preprocess.objects import ObjectSettings, process_object
    from atoken.preprocess.render import _process_for, close_blender_processes
    from atoken.preprocess.voxels import VoxelSettings

    close_blender_processes()
    output = work / f"atoken-{assets_per_process}-{time.time_ns()}"
    render = dataclasses.replace(settings, assets_per_process=assets_per_process)
    object_settings = ObjectSettings(render, VoxelSettings(), str(output), Storage(), log_assets=False)
    start = time.perf_counter()
    if assets_per_process > 1:  # a child serves many assets: time its start on its own, amortised below
        _process_for(render)
    startup = time.perf_counter() - start
    rows = []
    for item in items:
        start = time.perf_counter()
        _, npz, meta, measured = process_object(b"", item, object_settings)
        rows.append({"asset": item.key, "seconds": time.perf_counter() - start,
                     "blender_view_seconds": measured["render_seconds"], "voxels": meta["voxels"],
                     "npz_bytes": len(npz)})
    close_blender_processes()
    return {"child_start_seconds": startup, "assets": rows}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "render-cpu.json"))
    parser.add_argument("--assets", default=",".join(ASSETS), help="pybullet_data named meshes")
    parser.add_argument("--rounds", type=int, default=1, help="bare/atoken alternations")
    parser.add_argument("--trellis-views", type=int, default=2, help="views of the 150 actually rendered per asset")
    parser.add_argument("--trellis-assets", type=int, default=2)
    args = parser.parse_args()

    from atoken.preprocess.objects import list_pybullet_objects
    from atoken.preprocess.render import PRESETS, render_object

    wanted = args.assets.split(",")
    items = [i for i in list_pybullet_objects(named_only=True) if i.key.removeprefix("pybullet_") in wanted]
    meshes = {i.key.removeprefix("pybullet_"): Path(i.locator) for i in items}
    release = dataclasses.replace(PRESETS["release"], threads=os.cpu_count() or 1, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="atoken-bench-render-"))

    bare_runs, shared_runs, fresh_runs = [], [], []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: bare bpy, {len(items)} assets", flush=True)
        bare_runs.append(run_bare(meshes, release, work))
        print("  atoken, one child for all assets", flush=True)
        shared_runs.append(run_atoken(items, release, work, assets_per_process=32))
        print("  atoken, a fresh Blender per asset", flush=True)
        fresh_runs.append(run_atoken(items, release, work, assets_per_process=1))
    bare_asset = mean(a["seconds"] for run in bare_runs for a in run["assets"])
    bare_view = mean(s for run in bare_runs for a in run["assets"] for s in a["view_seconds"])
    # A child serves assets_per_process (32) assets: each pays a 32nd of its start.
    child_start = mean(run["child_start_seconds"] for run in shared_runs)
    shared_asset = mean(a["seconds"] for run in shared_runs for a in run["assets"]) + child_start / 32
    fresh_asset = mean(a["seconds"] for run in fresh_runs for a in run["assets"])
    shared_view = mean(a["blender_view_seconds"] / release.views for run in shared_runs for a in run["assets"])

    # TRELLIS' preset: render the first few of its 150 views of a few assets, time them per view.
    trellis = dataclasses.replace(PRESETS["trellis"], views=args.trellis_views, threads=os.cpu_count() or 1,
                                  device="cpu")
    trellis_views = []
    for item in items[: args.trellis_assets]:
        print(f"trellis preset: {args.trellis_views} of 150 views of {item.key}", flush=True)
        views = render_object(item.locator, work / "trellis" / item.key, trellis)
        trellis_views.extend(views.info["view_seconds"])
        trellis_setup = views.info["import_seconds"]
    trellis_view = mean(trellis_views)
    # Per asset: the per-view cost times 150, plus the setup and the per-asset overhead measured above for
    # the release preset (child, readback, voxels, npz, storage) scaled by pixels (512² x 150 vs 256² x 16).
    overhead = max(0.0, shared_asset - bare_asset)
    pixel_ratio = (150 * 512**2) / (release.views * release.resolution**2)
    trellis_asset = 150 * trellis_view + trellis_setup + overhead * pixel_ratio

    def fleet(seconds_per_asset: float) -> dict:
        return {f"{n}_workers_days": round(1e6 * seconds_per_asset / n / 86400, 2) for n in WORKERS}

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, no GPU; shared with other jobs",
        "blender": "bpy 5.0.1 (Cycles, CPU)",
        "assets": [i.key for i in items],
        "rounds": args.rounds,
        "release_preset": {
            "views": release.views, "resolution": release.resolution, "samples": release.samples,
            "bare_bpy_seconds_per_asset": round(bare_asset, 3),
            "bare_bpy_seconds_per_view": round(bare_view, 4),
            "bare_bpy_import_seconds": round(mean(run["import_seconds"] for run in bare_runs), 3),
            "atoken_child_start_seconds": round(child_start, 3),
            "atoken_seconds_per_asset": round(shared_asset, 3),
            "atoken_seconds_per_asset_means": "per asset in a warm child + child start / 32 (assets_per_process)",
            "atoken_blender_seconds_per_view": round(shared_view, 4),
            "atoken_over_bare": round(shared_asset / bare_asset, 3),
            "atoken_fresh_blender_per_asset_seconds": round(fresh_asset, 3),
            "atoken_fresh_blender_per_asset_over_bare": round(fresh_asset / bare_asset, 3),
            "goal": "atoken_over_bare <= 1.3",
            "per_asset": {"bare": bare_runs, "atoken": shared_runs, "atoken_fresh": fresh_runs},
        },
        "trellis_preset": {
            "views": 150, "resolution": 512, "samples": 128,
            "measured": f"{len(trellis_views)} views ({args.trellis_views} per asset of "
                        f"{min(len(items), args.trellis_assets)} assets), extrapolated per view to 150",
            "seconds_per_view": round(trellis_view, 3),
            "seconds_per_asset_extrapolated": round(trellis_asset, 1),
        },
        "trellis_over_release_per_asset": round(trellis_asset / shared_asset, 1),
        "one_million_assets": {
            "note": "1e6 x seconds per asset / workers; a worker = this 2-thread CPU machine. A GPU Cycles "
                    "worker is far faster but could not be measured here (bpy has no cp312 wheel for the "
                    "lent GPU machine, and none was lent to this task)",
            "release_16_views_256px": fleet(shared_asset),
            "trellis_150_views_512px": fleet(trellis_asset),
        },
        "command": "python benchmarks/bench_render.py --out benchmarks/results/render-cpu.json",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result["release_preset"].items() if k != "per_asset"}
    print(json.dumps({"release": summary, "trellis": result["trellis_preset"]}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        bare_main(sys.argv[2], sys.argv[3])
    else:
        main()
