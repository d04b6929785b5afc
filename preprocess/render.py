"""Multi-view renders of one 3D asset with Blender as a module (`bpy`, Cycles, headless), in a child process.

Blender runs in a child of the worker, never in it: an asset that crashes Blender (a segfault in an importer)
or hangs it (a pathological mesh) costs that asset only. The parent sends one job per asset over a pipe
and waits with a timeout; a timed-out child is killed with its process group and a fresh one takes the
next asset. Every asset gets its own Blender log (the child points its stdout and stderr at the asset's
`blender.log` for the duration of the job), so a failure is never just a missing file (spec pain point 1).

A child serves up to `assets_per_process` assets before it is replaced: importing bpy costs ~2 s, as much
as rendering 16 views at 256 px, and starting one child per asset would miss the issue's 1.3x-of-bare goal;
`read_factory_settings` between assets resets the scene. `assets_per_process=1` is strict isolation.

Conventions (the same as train/model/gaussians.py and NeRF's transforms.json): the object is normalised
into [-0.5, 0.5]³ of Blender's world (Z up); the input cameras sit on a Hammersley sphere (TRELLIS'
`sphere_hammersley_sequence`) looking at the origin, and the evaluation cameras (`eval_views`, issue 17) on
elevation rings halfway between the input cameras' rings, so no evaluation view is an input view (only the
input views feed the voxel features; evaluation scores the others); `c2w` are camera-to-world matrices in the
Blender/OpenGL camera frame (x right, y up, looking down -z); depth is Cycles' Z pass: distance along the camera's
viewing axis (planar, not along the ray), +inf where no surface was hit; pixel (i, j) has its centre at
(j + 0.5, i + 0.5) and rows run top to bottom, as in the PNGs.

    python -m atoken.preprocess.render --child FD     # the child side; the parent starts it
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from atoken.preprocess.images import ItemError

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".fbx", ".stl")
DEPTH_BACKGROUND = 1e9  # Cycles writes 1e10 where a ray hits nothing; anything beyond this is background


@dataclass(frozen=True)
class RenderSettings:
    views: int = 16  # input views: the voxel features are made from these alone
    # Evaluation views rendered beside them at cameras no input view shares (eval_camera_poses): 3D evaluation
    # scores only these, so it never measures reconstruction on the views the features were cut from.
    eval_views: int = 4
    resolution: int = 256
    samples: int = 16  # Cycles samples per pixel; CPU Cycles on 2 cores costs ~1 s/view at 256 px and 16
    fov_degrees: float = 40.0
    radius: float = 2.0  # camera distance from the object's centre (the object spans [-0.5, 0.5]³)
    device: str = "auto"  # auto: the first GPU Cycles finds (OptiX, CUDA, HIP, oneAPI, Metal), else CPU
    threads: int = 0  # Cycles CPU threads; 0 = all cores (give each parallel worker its share)
    denoise: bool = False  # OpenImageDenoise on CPU measured ~8 s/view at 256 px on 2 cores: off by default
    # Per asset, from the job's start to its last view. A GPU's first render may compile kernels (OptiX and
    # CUDA builds ship most precompiled): leave room for that on a new GPU model.
    timeout_s: float = 600.0
    startup_timeout_s: float = 120.0  # a new child's `import bpy` (~2 s here)
    assets_per_process: int = 32  # then the child is replaced (1 = a fresh Blender for every asset)
    python: str = ""  # an interpreter where bpy and atoken import; "" = this one (bpy has only a cp311 wheel)

    def validate(self, where: str = "render") -> None:
        for name in ("views", "resolution", "samples", "assets_per_process"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}: must be >= 1")
        if self.eval_views < 0:
            raise ValueError(f"{where}.eval_views: must be >= 0")
        if not 1.0 <= self.fov_degrees <= 170.0:
            raise ValueError(f"{where}.fov_degrees: must lie in [1, 170]")
        # The unit cube's corners lie sqrt(3)/2 from the centre: a camera inside that would clip the object.
        if self.radius <= math.sqrt(3) / 2:
            raise ValueError(f"{where}.radius: must exceed sqrt(3)/2 (the cube's half-diagonal)")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"{where}.device: one of auto, cpu, gpu")
        if self.timeout_s <= 0 or self.startup_timeout_s <= 0 or self.threads < 0:
            raise ValueError(f"{where}: timeouts must be > 0 and threads >= 0")

    def fingerprint(self) -> dict:
        """What decides the pixels: renders made with equal fingerprints (and camera offsets) are reusable."""
        return {k: v for k, v in asdict(self).items() if k in ("views", "eval_views", "resolution", "samples",
                                                                 "fov_degrees", "radius", "denoise")}


# The release's 3D input (spec "3D input": 16 views at 256 px; its sample count is not published, 16 is ours)
# and TRELLIS' dataset_toolkits renders (150 views at 512 px, 128 samples, FoV 40°, radius 2).
PRESETS = {
    "release": RenderSettings(views=16, resolution=256, samples=16),
    "trellis": RenderSettings(views=150, resolution=512, samples=128),
}


def render_settings(preset: str, parallelism: int, threads: int = 0, **fields) -> RenderSettings:
    """A preset with `fields` replaced where given (None keeps the preset's); `threads` 0 shares this machine's
    cores among `parallelism` workers. What `atoken preprocess 3d` and the ingest_3d stage both render with."""
    given = {name: value for name, value in fields.items() if value is not None}
    return replace(PRESETS[preset], **given, threads=threads or max(1, (os.cpu_count() or 1) // parallelism))


class RenderError(ItemError):
    """Blender could not render this asset; `stage` says where (import, render, timeout, crash)."""

    def __init__(self, reason: str, stage: str, log: Path | str | None = None):
        super().__init__(f"{reason} (Blender log: {log})" if log else reason)
        self.reason, self.stage, self.log = reason, stage, log


@dataclass
class RenderedViews:
    rgba: np.ndarray  # (N, H, W, 4) uint8, straight alpha, sRGB: the input views
    depth: np.ndarray  # (N, H, W) float32, planar camera depth, +inf on the background
    c2w: np.ndarray  # (N, 4, 4) float64, Blender/OpenGL camera frame
    intrinsics: np.ndarray  # (3, 3) pixels, of every view (input and evaluation)
    eval_rgba: np.ndarray  # (E, H, W, 4) uint8: the evaluation views, never voxelised
    eval_c2w: np.ndarray  # (E, 4, 4) float64: their cameras, none an input camera
    info: dict  # from the child: mesh statistics, normalisation, device, seconds per view (inputs, then eval)
    folder: Path  # the PNGs, depth EXRs, depth.npy, transforms.json and blender.log


# -- cameras (pure numpy: the parent computes them, the child only places them) ---------------------------

def _radical_inverse(base: int, n: int) -> float:
    value, inverse = 0.0, 1.0 / base
    scale = inverse
    while n > 0:
        value += (n % base) * scale
        n //= base
        scale *= inverse
    return value


def hammersley_sphere(views: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """(yaw, pitch) in radians of `views` points evenly spread on the sphere, as TRELLIS' renders place them
    (dataset_toolkits/utils.py `sphere_hammersley_sequence`: u = i/N + offset/N, v = radical_inverse_2(i) + offset)."""
    u = np.array([(i + offset[0]) / views for i in range(views)])
    v = np.array([_radical_inverse(2, i) + offset[1] for i in range(views)])
    pitch = np.arccos(np.clip(1.0 - 2.0 * u, -1.0, 1.0)) - np.pi / 2
    return v * 2.0 * np.pi, pitch


def camera_offset(key: str) -> tuple[float, float]:
    """A per-asset rotation of the Hammersley pattern (TRELLIS draws it at random), derived from the key so
    that a rerun renders the very same views. Never 0 in u, which would put view 0 on the pole."""
    import hashlib

    digest = hashlib.sha256(key.encode()).digest()
    a = int.from_bytes(digest[:8], "big") / 2**64
    b = int.from_bytes(digest[8:16], "big") / 2**64
    return 0.05 + 0.9 * a, b


def eval_camera_angles(views: int, eval_views: int, offset: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(yaw, pitch) in radians of `eval_views` cameras that no input camera shares.

    The input cameras' elevations are rings at u = (i + offset_u) / views (hammersley_sphere). Each evaluation
    camera sits halfway between two neighbouring rings, u = (k + offset_u + 1/2) / views (mod 1), with the rings
    k spread evenly over the sphere, at its own Hammersley azimuth. Its pitch differs from every input camera's by
    at least 1/views radians (d pitch / d u >= 2), so its direction does too: disjoint by construction."""
    ring = np.floor((np.arange(eval_views) + 0.5) * views / max(eval_views, 1))  # (E,) of the N rings
    u = ((ring + offset[0] + 0.5) / views) % 1.0
    v = np.array([_radical_inverse(2, j) + offset[1] for j in range(eval_views)])
    pitch = np.arccos(np.clip(1.0 - 2.0 * u, -1.0, 1.0)) - np.pi / 2
    return v * 2.0 * np.pi, pitch


def camera_poses(settings: RenderSettings, offset: tuple[float, float]) -> np.ndarray:
    """(N, 4, 4) camera-to-world matrices of the input views: cameras at `radius`, looking at the origin."""
    return _looking_at_origin(*hammersley_sphere(settings.views, offset), settings.radius)


def eval_camera_poses(settings: RenderSettings, offset: tuple[float, float]) -> np.ndarray:
    """(E, 4, 4) camera-to-world matrices of the evaluation views (eval_camera_angles), at the same radius."""
    return _looking_at_origin(*eval_camera_angles(settings.views, settings.eval_views, offset), settings.radius)


def _looking_at_origin(yaw: np.ndarray, pitch: np.ndarray, radius: float) -> np.ndarray:
    """(yaw, pitch) of K cameras → (K, 4, 4) camera-to-world matrices at `radius`, looking at the origin, world
    up +Z (Blender/OpenGL camera frame)."""
    poses = np.zeros((len(yaw), 4, 4))
    for i, (y, p) in enumerate(zip(yaw, pitch, strict=True)):
        back = np.array([math.cos(y) * math.cos(p), math.sin(y) * math.cos(p), math.sin(p)])
        up_ref = np.array([0.0, 0.0, 1.0]) if abs(back[2]) < 0.999 else np.array([0.0, 1.0, 0.0])
        right = np.cross(up_ref, back)
        right /= np.linalg.norm(right)
        up = np.cross(back, right)
        poses[i, :3, 0], poses[i, :3, 1], poses[i, :3, 2] = right, up, back
        poses[i, :3, 3] = radius * back
        poses[i, 3, 3] = 1.0
    return poses


def intrinsics(settings: RenderSettings) -> np.ndarray:
    """(3, 3) pinhole matrix of a square render whose horizontal field of view is `fov_degrees`."""
    size = settings.resolution
    focal = size / 2 / math.tan(math.radians(settings.fov_degrees) / 2)
    return np.array([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])


def transforms_json(settings: RenderSettings, c2w: np.ndarray, eval_c2w: np.ndarray, info: dict,
                    offset: tuple[float, float]) -> dict:
    """NeRF-style transforms.json (instant-ngp keys), plus how the object was normalised and rendered. `frames`
    are the input views; `eval_frames` the evaluation views (numbered after them), which NeRF tools ignore and
    the voxel features never see."""
    K = intrinsics(settings)
    return {
        "camera_angle_x": math.radians(settings.fov_degrees),
        "fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2],
        "w": settings.resolution, "h": settings.resolution,
        "aabb": [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]],
        "depth": "planar distance along the camera axis (Cycles Z pass), world units; background +inf",
        # world = scale * (imported + offset): imported coordinates are Blender's after the importer's
        # axis conversion (OBJ and glTF are Y-up files, Blender is Z-up).
        "normalisation": {"scale": info["scale"], "offset": info["offset"]},
        "render": {**settings.fingerprint(), "camera_offset": list(offset), "device": info.get("device"),
                   "blender": info.get("blender")},
        "frames": [
            {"file_path": f"{i:03d}.png", "depth_file_path": f"{i:03d}_depth.exr",
             "transform_matrix": c2w[i].tolist()}
            for i in range(len(c2w))
        ],
        "eval_frames": [
            {"file_path": f"{i:03d}.png", "depth_file_path": f"{i:03d}_depth.exr",
             "transform_matrix": pose.tolist()}
            for i, pose in enumerate(eval_c2w, start=len(c2w))
        ],
    }


# -- the parent side ------------------------------------------------------------------------------------------

class BlenderProcess:
    """One child Python that imported bpy and renders the jobs it is sent, one at a time."""

    def __init__(self, python: str, startup_timeout_s: float):
        self.python = python or sys.executable
        self.jobs_done = 0
        # Output outside any job (startup, shutdown) goes to an anonymous file: read when the start fails.
        self.startup_log = tempfile.TemporaryFile(prefix="atoken-blender-")
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [self.python, "-m", "atoken.preprocess.render", "--child", str(write_fd)],
                stdin=subprocess.PIPE, stdout=self.startup_log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                start_new_session=True,  # its own process group: a kill takes Blender's helpers with it
            )
        except OSError as exc:
            os.close(read_fd)
            self.startup_log.close()
            raise RenderError(f"cannot start {self.python}: {exc.strerror or exc}", "crash") from exc
        finally:
            os.close(write_fd)
        self._results = read_fd
        self._buffer = b""
        self._closed = False  # the child closed its end of the result pipe (it exited or died)
        reply = self._read_reply(startup_timeout_s)
        if reply is None or not reply.get("ready"):
            self.startup_log.seek(0)
            tail = self.startup_log.read().decode(errors="replace")[-2000:]
            self.kill()
            raise RenderError(f"Blender did not start in {self.python}: {tail.strip()[-500:]}", "crash")
        self.blender = reply.get("blender", "?")

    def render(self, job: dict, timeout_s: float) -> dict:
        log = Path(job["log"])
        try:
            self.process.stdin.write((json.dumps(job) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            self.kill()
            raise RenderError("the Blender child died before the job was sent", "crash", log) from None
        started = time.perf_counter()
        reply = self._read_reply(timeout_s)
        self.jobs_done += 1
        if reply is not None:
            return reply
        if not self._closed:
            self.kill()
            _append(log, f"[atoken] killed: no result after {time.perf_counter() - started:.1f} s "
                         f"(timeout {timeout_s:.0f} s)")
            raise RenderError(f"Blender timed out after {timeout_s:.0f} s", "timeout", log)
        try:  # the result pipe closed: the child is exiting or gone
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.returncode
        self._cleanup()
        what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        _append(log, f"[atoken] Blender died with {what}")
        raise RenderError(f"Blender crashed ({what})", "crash", log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """Let the child finish and exit (stdin closes); kill it if it does not within 10 s."""
        if self.alive():
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup()

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # the group this child leads, nothing else
        self.process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._results >= 0:
            os.close(self._results)
            self._results = -1
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        self.startup_log.close()

    def _read_reply(self, timeout_s: float) -> dict | None:
        """The child's next JSON line, or None on timeout or when the child died (EOF)."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._results], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._results, 65536)
            if not chunk:
                self._closed = True
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


_PROCESSES: dict[str, BlenderProcess] = {}


def _process_for(settings: RenderSettings) -> BlenderProcess:
    """This worker's Blender child for `settings.python`, replaced when dead or after assets_per_process."""
    key = settings.python or sys.executable
    process = _PROCESSES.get(key)
    if process is not None and (not process.alive() or process.jobs_done >= settings.assets_per_process):
        process.close()
        process = None
    if process is None:
        process = _PROCESSES[key] = BlenderProcess(key, settings.startup_timeout_s)
    return process


def close_blender_processes() -> None:
    while _PROCESSES:
        _PROCESSES.popitem()[1].close()


atexit.register(close_blender_processes)


def render_object(mesh: str | Path, folder: str | Path, settings: RenderSettings,
                  offset: tuple[float, float] = (0.5, 0.0)) -> RenderedViews:
    """Render `settings.views` input views and `settings.eval_views` evaluation views of one mesh file into
    `folder` (which ends up holding the views, the depth maps, transforms.json and blender.log), in this worker's
    Blender child: one job, the evaluation cameras after the input ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "blender.log"
    log.write_text("")
    c2w, eval_c2w = camera_poses(settings, offset), eval_camera_poses(settings, offset)  # (N, 4, 4), (E, 4, 4)
    job = {"mesh": str(Path(mesh).resolve()), "folder": str(folder.resolve()), "log": str(log.resolve()),
           "c2w": np.concatenate([c2w, eval_c2w]).tolist(), "resolution": settings.resolution,
           "samples": settings.samples, "fov_degrees": settings.fov_degrees, "device": settings.device,
           "threads": settings.threads, "denoise": settings.denoise}
    try:
        process = _process_for(settings)
    except RenderError as exc:  # Blender did not start: the asset's log says why
        _append(log, f"[atoken] {exc.reason}")
        raise RenderError(exc.reason, exc.stage, log) from exc
    reply = process.render(job, settings.timeout_s)
    if not reply.get("ok"):
        raise RenderError(reply.get("error", "unknown Blender error"), reply.get("stage", "render"), log)
    info = reply["info"]
    (folder / "info.json").write_text(json.dumps(info, indent=1))
    transforms = transforms_json(settings, c2w, eval_c2w, info, offset)
    (folder / "transforms.json").write_text(json.dumps(transforms, indent=1))
    return load_views(folder, c2w, eval_c2w, intrinsics(settings), info)


def load_views(folder: Path, c2w: np.ndarray, eval_c2w: np.ndarray, K: np.ndarray, info: dict) -> RenderedViews:
    """A render folder → its input views (the first len(c2w) files) and evaluation views (the rest)."""
    from PIL import Image

    inputs, count = len(c2w), len(c2w) + len(eval_c2w)
    rgba = np.stack([np.asarray(Image.open(folder / f"{i:03d}.png").convert("RGBA")) for i in range(count)])
    depth = np.load(folder / "depth.npy")[:inputs]  # (N, H, W): evaluation views' depth is never read
    return RenderedViews(rgba[:inputs], depth, c2w, K, rgba[inputs:], eval_c2w, info, folder)


def _append(path: Path, line: str) -> None:
    with open(path, "a") as handle:
        handle.write(f"\n{line}\n")


# -- the child side (runs with bpy imported) -----------------------------------------------------------------

class ImportFailure(RuntimeError):
    """The file did not import into a mesh Blender can render."""


def _child_main(result_fd: int) -> int:
    _die_with_parent()
    import bpy

    results = os.fdopen(result_fd, "w")

    def reply(value: dict) -> None:
        results.write(json.dumps(value) + "\n")
        results.flush()

    reply({"ready": True, "blender": bpy.app.version_string})
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0  # the parent closed the pipe (or died)
        job = json.loads(line)
        with _output_to(job["log"]):
            try:
                info = _render_job(job)
                result = {"ok": True, "info": info}
            except ImportFailure as exc:
                print(f"[atoken] import failed: {exc}", flush=True)
                result = {"ok": False, "stage": "import", "error": f"import failed: {exc}"}
            except Exception as exc:  # noqa: BLE001 - any other Blender error fails this asset, not the child
                traceback.print_exc()
                result = {"ok": False, "stage": "render", "error": f"{type(exc).__name__}: {exc}"}
        reply(result)


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when its parent dies, so a killed worker leaves no Blender behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _output_to(path: str):
    """Point fds 1 and 2 (Python's and Blender's C-level output alike) at one asset's log for one job."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        libc.fflush(None)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)


def _render_job(job: dict) -> dict:
    import bpy
    from mathutils import Matrix

    started = time.perf_counter()
    print(f"[atoken] blender {bpy.app.version_string}: {job['mesh']}", flush=True)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    stats = _import_mesh(job["mesh"])
    scale, offset = _normalise(scene)
    device = _setup_scene(scene, job)
    camera = scene.camera
    output = _depth_output(scene, job["folder"])
    import_seconds = time.perf_counter() - started
    view_seconds = []
    for i, c2w in enumerate(job["c2w"]):
        camera.matrix_world = Matrix(c2w)
        output.file_name = f"{i:03d}_"
        scene.render.filepath = os.path.join(job["folder"], f"{i:03d}.png")
        view_start = time.perf_counter()
        bpy.ops.render.render(write_still=True)
        view_seconds.append(time.perf_counter() - view_start)
        print(f"[atoken] view {i + 1}/{len(job['c2w'])}: {view_seconds[-1]:.2f} s", flush=True)
    depth = np.stack([_read_depth(os.path.join(job["folder"], f"{i:03d}_depth.exr")) for i in range(len(job["c2w"]))])
    np.save(os.path.join(job["folder"], "depth.npy"), depth)
    total = time.perf_counter() - started
    print(f"[atoken] done: import+setup {import_seconds:.2f} s, {len(view_seconds)} views "
          f"{sum(view_seconds):.2f} s ({sum(view_seconds) / len(view_seconds):.3f} s/view), total {total:.2f} s",
          flush=True)
    return {**stats, "scale": scale, "offset": offset, "device": device, "blender": bpy.app.version_string,
            "import_seconds": import_seconds, "view_seconds": view_seconds, "seconds": total}


def _import_mesh(path: str) -> dict:
    import bpy

    suffix = Path(path).suffix.lower()
    importers = {
        ".glb": lambda: bpy.ops.import_scene.gltf(filepath=path),
        ".gltf": lambda: bpy.ops.import_scene.gltf(filepath=path),
        ".obj": lambda: bpy.ops.wm.obj_import(filepath=path),
        ".ply": lambda: bpy.ops.wm.ply_import(filepath=path),
        ".stl": lambda: bpy.ops.wm.stl_import(filepath=path),
        ".fbx": lambda: bpy.ops.import_scene.fbx(filepath=path),
    }
    if suffix not in importers:
        raise ImportFailure(f"no importer for {suffix} files (known: {', '.join(importers)})")
    if not os.path.isfile(path):
        raise ImportFailure(f"no such file {path}")
    try:
        importers[suffix]()
    except RuntimeError as exc:  # bpy.ops report importer errors as RuntimeError
        raise ImportFailure(str(exc).strip().splitlines()[-1][:300]) from exc
    # Files may bring their own lights and cameras; ours light and frame every asset the same way.
    for obj in list(bpy.context.scene.objects):
        if obj.type in ("LIGHT", "CAMERA") or obj.hide_render:
            bpy.data.objects.remove(obj, do_unlink=True)
    meshes = [obj for obj in bpy.context.scene.objects if obj.type == "MESH"]
    faces = sum(len(obj.data.polygons) for obj in meshes)
    if faces == 0:
        raise ImportFailure(f"the file holds no faces ({len(meshes)} mesh objects)")
    images = [image for image in bpy.data.images if image.source == "FILE"]
    # `size` reads the file's header; a texture that is not there has none (Cycles would render it magenta).
    missing = [image.name for image in images if image.size[0] == 0 and image.packed_file is None]
    return {
        "mesh_objects": len(meshes),
        "vertices": sum(len(obj.data.vertices) for obj in meshes),
        "faces": faces,
        "materials": len({slot.material.name for obj in meshes for slot in obj.material_slots if slot.material}),
        "textures": len(images) - len(missing),
        "missing_textures": missing,
        "color_attributes": sum(len(obj.data.color_attributes) for obj in meshes),
    }


def _normalise(scene) -> tuple[float, list[float]]:
    """Scale and move the whole scene so that its tight bounding box is centred in [-0.5, 0.5]³."""
    import bpy

    depsgraph = bpy.context.evaluated_depsgraph_get()
    corners = []
    for obj in scene.objects:
        if obj.type != "MESH":
            continue
        mesh = obj.evaluated_get(depsgraph).data
        co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", co)
        world = np.array(obj.matrix_world)
        points = co.reshape(-1, 3).astype(np.float64) @ world[:3, :3].T + world[:3, 3]
        corners.extend([points.min(0), points.max(0)])
    corners = np.array(corners)
    low, high = corners.min(0), corners.max(0)
    extent = float((high - low).max())
    if not np.isfinite(extent) or extent <= 0:
        raise ImportFailure(f"degenerate bounding box {low.tolist()} .. {high.tolist()}")
    scale, offset = 1.0 / extent, (-(low + high) / 2).tolist()
    root = bpy.data.objects.new("atoken_normalise", None)
    scene.collection.objects.link(root)
    for obj in list(scene.objects):
        if obj.parent is None and obj is not root:
            obj.parent = root  # the parent inverse stays identity: world = root @ local
    root.scale = (scale, scale, scale)
    root.location = tuple(scale * np.array(offset))
    bpy.context.view_layer.update()
    return scale, offset


def _setup_scene(scene, job: dict) -> str:
    import bpy

    render = scene.render
    render.engine = "CYCLES"
    render.resolution_x = render.resolution_y = job["resolution"]
    render.resolution_percentage = 100
    render.film_transparent = True  # RGBA: alpha is the object's mask
    render.use_persistent_data = True  # keep the BVH between the views of one asset (measured ~1.7x faster)
    render.image_settings.file_format = "PNG"
    render.image_settings.color_mode = "RGBA"
    render.image_settings.color_depth = "8"
    render.image_settings.compression = 15  # PNG zlib effort: fast writes, the parent re-encodes anyway
    if job["threads"]:
        render.threads_mode = "FIXED"
        render.threads = job["threads"]
    scene.view_settings.view_transform = "Standard"  # sRGB as authored, not AgX's filmic curve
    cycles = scene.cycles
    cycles.samples = job["samples"]
    cycles.use_denoising = job["denoise"]
    # TRELLIS' dataset_toolkits settings: one diffuse and one glossy bounce, a box pixel filter.
    cycles.max_bounces, cycles.diffuse_bounces, cycles.glossy_bounces = 4, 1, 1
    cycles.transparent_max_bounces, cycles.transmission_bounces = 3, 3
    cycles.pixel_filter_type, cycles.filter_width = "BOX", 1.0
    device = _select_device(scene, job["device"])
    # Uniform white light from every direction: colours read as albedo (times ambient occlusion) from any
    # view, which is what a voxel's nearest-view patch should carry.
    world = bpy.data.worlds.new("atoken_world")  # Blender 5: a node tree with a Background node
    background = next(node for node in world.node_tree.nodes if node.type == "BACKGROUND")
    background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    background.inputs["Strength"].default_value = 1.0
    scene.world = world
    camera = bpy.data.objects.new("atoken_camera", bpy.data.cameras.new("atoken_camera"))
    scene.collection.objects.link(camera)
    camera.data.lens_unit = "FOV"
    camera.data.sensor_fit = "HORIZONTAL"
    camera.data.angle = math.radians(job["fov_degrees"])
    camera.data.clip_start, camera.data.clip_end = 0.01, 100.0
    scene.camera = camera
    return device


def _select_device(scene, wanted: str) -> str:
    import bpy

    if wanted != "cpu":
        preferences = bpy.context.preferences.addons["cycles"].preferences
        for kind in ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL"):
            try:
                preferences.compute_device_type = kind
            except TypeError:  # not built into this Blender
                continue
            preferences.refresh_devices()
            gpus = [d for d in preferences.devices if d.type == kind]
            if gpus:
                for d in preferences.devices:
                    d.use = d.type == kind
                scene.cycles.device = "GPU"
                return f"{kind}: {', '.join(d.name for d in gpus)}"
        if wanted == "gpu":
            raise RuntimeError("device gpu: Cycles finds no GPU (OptiX, CUDA, HIP, oneAPI, Metal)")
    scene.cycles.device = "CPU"
    return f"CPU ({scene.render.threads} threads)"


def _depth_output(scene, folder: str):
    """The compositor writes the Z pass of every render as a single-channel float32 EXR (Blender 5 API)."""
    import bpy

    scene.view_layers[0].use_pass_z = True
    tree = bpy.data.node_groups.new("atoken_depth", "CompositorNodeTree")
    scene.compositing_node_group = tree
    layers = tree.nodes.new("CompositorNodeRLayers")
    output = tree.nodes.new("CompositorNodeOutputFile")
    output.directory = folder
    output.format.media_type = "IMAGE"
    output.format.file_format = "OPEN_EXR"
    output.format.color_depth = "32"
    output.format.color_mode = "BW"
    output.file_output_items.new("FLOAT", "depth")
    tree.links.new(layers.outputs["Depth"], output.inputs["depth"])
    return output


def _read_depth(path: str) -> np.ndarray:
    """An EXR the compositor wrote → (H, W) float32, rows top to bottom, +inf on the background."""
    import bpy

    image = bpy.data.images.load(path)
    try:
        width, height = image.size
        pixels = np.empty(width * height * image.channels, dtype=np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    depth = pixels.reshape(height, width, -1)[::-1, :, 0].copy()  # Blender stores rows bottom-up
    depth[depth > DEPTH_BACKGROUND] = np.inf
    return depth


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child_main(int(sys.argv[2])))
    print("usage: python -m atoken.preprocess.render --child FD  (started by render_object)", file=sys.stderr)
    sys.exit(2)
