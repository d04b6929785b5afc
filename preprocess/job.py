"""Ingest jobs (images, videos): list sources, plan shards, map the shard writer over Ray, gather stats.

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

from atoken.pipeline.config import IngestSection, VideoIngestSection
from atoken.pipeline.storage import Storage, join
from atoken.preprocess.sources import (
    BUILTIN_SOURCES,
    BUILTIN_VIDEO_SOURCES,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    ItemSpec,
    list_file,
    list_folder,
    list_s3_prefix,
)
from atoken.preprocess.videos import ClipSettings
from atoken.preprocess.writer import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    ImageSettings,
    ShardPlan,
    ShardResult,
    VideoSettings,
    manifest_uri,
    write_shard,
)


def list_items(section: IngestSection | VideoIngestSection, storage: Storage | None = None) -> list[ItemSpec]:
    """The items of every source of an image or video section, in a stable order."""
    storage = storage or Storage()
    videos = isinstance(section, VideoIngestSection)
    builtin = BUILTIN_VIDEO_SOURCES if videos else BUILTIN_SOURCES
    suffixes = VIDEO_SUFFIXES if videos else IMAGE_SUFFIXES
    items: list[ItemSpec] = []
    for source in section.sources:
        if source.kind == "builtin":
            items.extend(builtin[source.name](source.limit))
        elif source.kind == "folder":
            items.extend(list_folder(source.path, source.limit, suffixes))
        elif source.kind == "s3":
            items.extend(list_s3_prefix(storage, source.path, source.limit, suffixes))
        else:
            items.extend(list_file(source.path, storage, source.limit))
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("ingest.sources: two sources list the same item keys (a source listed twice?)")
    return items


def plan_shards(items: list[ItemSpec], items_per_shard: int, val_every: int) -> list[ShardPlan]:
    by_split: dict[str, list[ItemSpec]] = {"train": [], "val": []}
    for index, item in enumerate(items):
        by_split["val" if index % val_every == 0 else "train"].append(item)
    plans = []
    for split, split_items in by_split.items():
        for start in range(0, len(split_items), items_per_shard):
            plans.append(ShardPlan(f"{split}-{start // items_per_shard:06d}", split,
                                   split_items[start:start + items_per_shard]))
    return plans


def plan_image_shards(section: IngestSection, storage: Storage | None = None) -> list[ShardPlan]:
    return plan_shards(list_items(section, storage), section.samples_per_shard, section.val_every)


def run_image_job(section: IngestSection, storage: Storage, output: str, progress: bool = True) -> dict[str, Any]:
    settings = ImageSettings(section.resolution, section.max_pixels)
    return run_shard_job(plan_image_shards(section, storage), settings, storage, output, section.parallelism,
                         progress, "ingest images", "img")


def run_video_job(section: VideoIngestSection, storage: Storage, output: str, progress: bool = True) -> dict[str, Any]:
    clips = ClipSettings(section.clip_frames, section.stride_frames, section.fps, section.resolution,
                         section.max_clips, section.encoding)
    plans = plan_shards(list_items(section, storage), section.videos_per_shard, section.val_every)
    return run_shard_job(plans, VideoSettings(clips), storage, output, section.parallelism, progress,
                         "ingest videos", "video")


def run_shard_job(plans: list[ShardPlan], settings: ImageSettings | VideoSettings, storage: Storage, output: str,
                  parallelism: int, progress: bool, description: str, unit: str) -> dict[str, Any]:
    """Write every planned shard (in parallel Ray tasks) and the job's manifest, errors and stats."""
    import ray

    started = time.perf_counter()
    remote_writer = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    storage_ref = ray.put(storage)
    pending = list(plans)
    in_flight: list = []
    results: list[ShardResult] = []
    bar = tqdm(total=sum(len(p.items) for p in plans), desc=description, unit=unit, disable=not progress)
    # A bounded window keeps a million-item job from materialising every task at once.
    window = max(1, parallelism * 2)
    while pending or in_flight:
        while pending and len(in_flight) < window:
            in_flight.append(remote_writer.remote(pending.pop(0), storage_ref, output, settings))
        done, in_flight = ray.wait(in_flight, num_returns=1)
        result: ShardResult = ray.get(done[0])
        results.append(result)
        plan = next(p for p in plans if p.name == result.name)
        bar.update(len(plan.items))
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
    built_items = sum(len(p.items) for p in plans if p.name in {r.name for r in built})
    seconds = time.perf_counter() - started
    splits = manifest.column("split").to_pylist()
    stats = {
        "shards": len(results),
        "shards_skipped": len(results) - len(built),
        "items": sum(len(p.items) for p in plans),
        "samples": manifest.num_rows,
        "samples_train": splits.count("train"),
        "samples_val": splits.count("val"),
        "failures": len(errors),
        "bytes": sum(r.bytes for r in results),
        "seconds": round(seconds, 3),
        "items_per_second": round(built_items / seconds, 2) if built else 0.0,
    }
    storage.write_json(join(output, "_stats.json"), stats)
    return stats


def _write_parquet(storage: Storage, uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())
