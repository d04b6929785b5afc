"""The image ingest job: list sources, plan shards, map the shard writer over Ray, gather stats.

Items are split and sharded by their position in a stable listing, so a rerun plans the very same
shards and skips the committed ones (see preprocess/writer.py).
"""

from __future__ import annotations

import io
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from atoken.pipeline.config import IngestSection
from atoken.pipeline.storage import Storage, join
from atoken.preprocess.sources import BUILTIN_SOURCES, ItemSpec, list_folder
from atoken.preprocess.writer import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    ImageSettings,
    ShardPlan,
    ShardResult,
    manifest_uri,
    write_image_shard,
)


def list_items(section: IngestSection) -> list[ItemSpec]:
    items: list[ItemSpec] = []
    for source in section.sources:
        if source.kind == "builtin":
            items.extend(BUILTIN_SOURCES[source.name](source.limit))
        else:
            items.extend(list_folder(source.path, source.limit))
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("ingest.sources: two sources list the same item keys (a source listed twice?)")
    return items


def plan_image_shards(section: IngestSection) -> list[ShardPlan]:
    items = list_items(section)
    by_split: dict[str, list[ItemSpec]] = {"train": [], "val": []}
    for index, item in enumerate(items):
        by_split["val" if index % section.val_every == 0 else "train"].append(item)
    plans = []
    for split, split_items in by_split.items():
        size = section.samples_per_shard
        for start in range(0, len(split_items), size):
            plans.append(ShardPlan(f"{split}-{start // size:06d}", split, split_items[start:start + size]))
    return plans


def run_image_job(section: IngestSection, storage: Storage, output: str, progress: bool = True) -> dict[str, Any]:
    """Write every planned shard (in parallel Ray tasks) and the job's manifest, errors and stats."""
    import ray

    started = time.perf_counter()
    plans = plan_image_shards(section)
    settings = ImageSettings(section.resolution, section.max_pixels)
    remote_writer = ray.remote(num_cpus=1, max_retries=2)(write_image_shard)
    storage_ref = ray.put(storage)
    pending = list(plans)
    in_flight: list = []
    results: list[ShardResult] = []
    bar = tqdm(total=sum(len(p.items) for p in plans), desc="ingest images", unit="img", disable=not progress)
    # A bounded window keeps a million-item job from materialising every task at once.
    window = max(1, section.parallelism * 2)
    while pending or in_flight:
        while pending and len(in_flight) < window:
            in_flight.append(remote_writer.remote(pending.pop(0), storage_ref, output, settings))
        done, in_flight = ray.wait(in_flight, num_returns=1)
        result: ShardResult = ray.get(done[0])
        results.append(result)
        bar.update(result.samples + result.errors)
        bar.set_postfix(shards=f"{len(results)}/{len(plans)}", errors=sum(r.errors for r in results))
    bar.close()

    results.sort(key=lambda r: r.name)
    manifest = pa.concat_tables(
        [pq.read_table(io.BytesIO(storage.read_bytes(manifest_uri(output, r.name)))) for r in results]
    ) if results else MANIFEST_SCHEMA.empty_table()
    errors = [row for r in results for row in r.error_rows]
    _write_parquet(storage, join(output, "manifest.parquet"), manifest)
    _write_parquet(storage, join(output, "errors.parquet"), pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
    built = [r for r in results if not r.skipped]
    seconds = time.perf_counter() - started
    stats = {
        "shards": len(results),
        "shards_skipped": len(results) - len(built),
        "samples": manifest.num_rows,
        "samples_train": sum(1 for s in manifest.column("split").to_pylist() if s == "train"),
        "samples_val": sum(1 for s in manifest.column("split").to_pylist() if s == "val"),
        "failures": len(errors),
        "bytes": sum(r.bytes for r in results),
        "seconds": round(seconds, 3),
        "images_per_second": round(sum(r.samples + r.errors for r in built) / seconds, 2) if built else 0.0,
    }
    storage.write_json(join(output, "_stats.json"), stats)
    return stats


def _write_parquet(storage: Storage, uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())
