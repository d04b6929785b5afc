"""One shard in, committed: process its items, write the tar, verify it, then write its manifest.

The manifest is written last and is the shard's commit marker: a shard with a manifest is done and a
rerun skips it; a shard without one is rebuilt from scratch, so a kill at any point loses nothing and
duplicates nothing. Plain functions: preprocess/job.py maps them over Ray.
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

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("caption", pa.string()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("bytes", pa.int64()),
])
ERRORS_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("locator", pa.string()), ("stage", pa.string()),
    ("error", pa.string()),
])


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
class ImageSettings:
    resolution: int
    max_pixels: int


def shard_uri(output: str, name: str) -> str:
    return join(output, "shards", f"{name}.tar")


def manifest_uri(output: str, name: str) -> str:
    return join(output, "manifests", f"{name}.parquet")


def errors_uri(output: str, name: str) -> str:
    return join(output, "errors", f"{name}.parquet")


def write_image_shard(plan: ShardPlan, storage: Storage, output: str, settings: ImageSettings) -> ShardResult:
    started = time.perf_counter()
    if storage.exists(manifest_uri(output, plan.name)):
        table = pq.read_table(io.BytesIO(storage.read_bytes(manifest_uri(output, plan.name))))
        errors = pq.read_table(io.BytesIO(storage.read_bytes(errors_uri(output, plan.name))))
        return ShardResult(plan.name, table.num_rows, errors.num_rows, int(sum(table.column("bytes").to_pylist())),
                           0.0, skipped=True, error_rows=errors.to_pylist())

    rows: list[dict] = []
    error_rows: list[dict] = []
    with LocalStaging() as staging:
        tar_path = staging / f"{plan.name}.tar"
        with wds.TarWriter(str(tar_path)) as sink:
            for item in plan.items:
                stage = "read"
                try:
                    data = read_item_bytes(item.locator)
                    stage = "decode"
                    sample = process_image(data, item.key, settings.resolution, settings.max_pixels)
                except (ItemError, OSError) as exc:
                    error_rows.append({"key": item.key, "source": item.source, "locator": item.locator,
                                       "stage": stage, "error": str(exc)[:500]})
                    continue
                meta = {**sample.meta, "caption": item.caption, "source": item.source, "split": plan.split}
                sink.write({"__key__": item.key, "png": sample.png, "json": json.dumps(meta).encode()})
                rows.append({
                    "key": item.key, "split": plan.split, "shard": plan.name, "source": item.source,
                    "caption": item.caption, "original_width": meta["original_width"],
                    "original_height": meta["original_height"], "width": meta["width"],
                    "height": meta["height"], "sha256": meta["sha256"], "bytes": len(sample.png),
                })
        _verify_tar(tar_path, [row["key"] for row in rows])
        storage.upload(tar_path, shard_uri(output, plan.name))
    # The manifest's measure (PNG bytes of the samples), so a skipped shard reports the same number.
    size = sum(row["bytes"] for row in rows)
    storage.write_bytes(errors_uri(output, plan.name), _parquet(error_rows, ERRORS_SCHEMA))
    storage.write_bytes(manifest_uri(output, plan.name), _parquet(rows, MANIFEST_SCHEMA))
    return ShardResult(plan.name, len(rows), len(error_rows), size, time.perf_counter() - started,
                       error_rows=error_rows)


def _verify_tar(path, expected_keys: list[str]) -> None:
    """Re-read the tar before commit: every sample present once, with both its image and its metadata."""
    with tarfile.open(path) as tar:
        names = tar.getnames()
    keys = [name.rsplit(".", 1)[0] for name in names if name.endswith(".png")]
    if keys != expected_keys or len(names) != 2 * len(expected_keys):
        raise RuntimeError(f"shard {path.name} failed verification: {len(keys)} of {len(expected_keys)} samples")


def _parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()
