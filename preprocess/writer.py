"""One shard in, committed: process its items (images or video clips), write the tar, verify it, then
write its manifest.

The manifest is written last and is the shard's commit marker: a shard with a manifest is done and a
rerun skips it; a shard without one is rebuilt from scratch, so a kill at any point loses nothing and
duplicates nothing. A done shard with failed items is rebuilt on a rerun (up to MAX_ATTEMPTS), so an item
that failed for a passing reason (a timeout, a file still being copied) lands the next time.
Plain functions: preprocess/job.py maps them over Ray.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from atoken.pipeline.storage import LocalStaging, Storage, join
from atoken.preprocess.images import ItemError, process_image
from atoken.preprocess.sources import ItemSpec, read_item_bytes
from atoken.preprocess.videos import ClipSettings, clip_video

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("caption", pa.string()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("bytes", pa.int64()),
    # video clips only (null for images): where in the source the clip lies
    ("source_key", pa.string()), ("start_seconds", pa.float64()), ("end_seconds", pa.float64()),
    ("fps", pa.float64()), ("frames", pa.int32()),
    # 3D assets only (null for images and clips): views rendered, occupied voxels, quality flags
    # (preprocess/voxels.py FLAGS), the asset's licence where its source has one, Blender seconds
    ("views", pa.int32()), ("voxels", pa.int32()), ("flags", pa.list_(pa.string())), ("license", pa.string()),
    ("render_seconds", pa.float64()),
])
ERRORS_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("locator", pa.string()), ("stage", pa.string()),
    ("error", pa.string()), ("attempts", pa.int32()),
])
MAX_ATTEMPTS = 3


@dataclass
class ShardPlan:
    name: str  # e.g. "train-000003"
    split: str
    items: list[ItemSpec]


@dataclass
class ShardResult:
    name: str
    samples: int
    errors: int
    bytes: int
    seconds: float
    skipped: bool = False
    error_rows: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ShardSample:
    key: str
    files: dict[str, bytes]  # extension → bytes, e.g. {"png": ...} or {"mp4": ...}
    meta: dict


@dataclass(frozen=True)
class ImageSettings:
    resolution: int
    max_pixels: int

    def process(self, data: bytes, item: ItemSpec) -> list[ShardSample]:
        sample = process_image(data, item.key, self.resolution, self.max_pixels)
        return [ShardSample(sample.key, {"png": sample.png}, sample.meta)]


@dataclass(frozen=True)
class VideoSettings:
    clips: ClipSettings

    def process(self, data: bytes, item: ItemSpec) -> list[ShardSample]:
        return [ShardSample(c.key, {c.extension: c.data}, c.meta) for c in clip_video(data, item.key, self.clips)]


def shard_uri(output: str, name: str) -> str:
    return join(output, "shards", f"{name}.tar")


def manifest_uri(output: str, name: str) -> str:
    return join(output, "manifests", f"{name}.parquet")


def errors_uri(output: str, name: str) -> str:
    return join(output, "errors", f"{name}.parquet")


def write_shard(plan: ShardPlan, storage: Storage, output: str, settings: ImageSettings | VideoSettings) -> ShardResult:
    started = time.perf_counter()
    attempt = 1
    if storage.exists(manifest_uri(output, plan.name)):
        table = pq.read_table(io.BytesIO(storage.read_bytes(manifest_uri(output, plan.name))))
        errors = pq.read_table(io.BytesIO(storage.read_bytes(errors_uri(output, plan.name))))
        attempt = max(errors.column("attempts").to_pylist(), default=0) + 1
        if errors.num_rows == 0 or attempt > MAX_ATTEMPTS:
            return ShardResult(plan.name, table.num_rows, errors.num_rows,
                               int(sum(table.column("bytes").to_pylist())), 0.0, skipped=True,
                               error_rows=errors.to_pylist())
        # Uncommit first: a kill during the rebuild then leaves a shard without manifest, rebuilt next time.
        storage.delete(manifest_uri(output, plan.name))

    rows: list[dict] = []
    error_rows: list[dict] = []
    with LocalStaging() as staging:
        tar_path = staging / f"{plan.name}.tar"
        with wds.TarWriter(str(tar_path)) as sink:
            for item in plan.items:
                stage = "read"
                try:
                    data = read_item_bytes(item.locator, storage)
                    stage = "decode"
                    samples = settings.process(data, item)
                except (ItemError, OSError) as exc:
                    error_rows.append({"key": item.key, "source": item.source, "locator": item.locator,
                                       "stage": getattr(exc, "stage", stage), "error": str(exc)[:500],
                                       "attempts": attempt})
                    continue
                for sample in samples:
                    meta = {**sample.meta, "caption": item.caption, "source": item.source, "split": plan.split}
                    sink.write({"__key__": sample.key, **sample.files, "json": json.dumps(meta).encode()})
                    rows.append(_manifest_row(sample, meta, plan))
        _verify_tar(tar_path, [row["key"] for row in rows])
        storage.upload(tar_path, shard_uri(output, plan.name))
    # The manifest's measure (bytes of the samples' media), so a skipped shard reports the same number.
    size = sum(row["bytes"] for row in rows)
    storage.write_bytes(errors_uri(output, plan.name), _parquet(error_rows, ERRORS_SCHEMA))
    storage.write_bytes(manifest_uri(output, plan.name), _parquet(rows, MANIFEST_SCHEMA))
    return ShardResult(plan.name, len(rows), len(error_rows), size, time.perf_counter() - started,
                       error_rows=error_rows)


def _manifest_row(sample: ShardSample, meta: dict, plan: ShardPlan) -> dict:
    return {
        "key": sample.key, "split": plan.split, "shard": plan.name, "source": meta["source"],
        "caption": meta["caption"],
        "original_width": meta.get("original_width", meta.get("source_width")),
        "original_height": meta.get("original_height", meta.get("source_height")),
        "width": meta["width"], "height": meta["height"], "sha256": meta["sha256"],
        "bytes": sum(len(b) for b in sample.files.values()),
        "source_key": meta.get("source_key"), "start_seconds": meta.get("start_seconds"),
        "end_seconds": meta.get("end_seconds"), "fps": meta.get("fps"), "frames": meta.get("frames"),
        "views": meta.get("views"), "voxels": meta.get("voxels"), "flags": meta.get("flags"),
        "license": meta.get("license"), "render_seconds": (meta.get("render") or {}).get("seconds"),
    }


def _verify_tar(path, expected_keys: list[str]) -> None:
    """Re-read the tar before commit: every sample present once, with its media and its metadata."""
    with tarfile.open(path) as tar:
        names = tar.getnames()
    keys = [name.rsplit(".", 1)[0] for name in names if name.endswith(".json")]
    if keys != expected_keys or len(names) != 2 * len(expected_keys):
        raise RuntimeError(f"shard {path.name} failed verification: {len(keys)} of {len(expected_keys)} samples")


def _parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()
