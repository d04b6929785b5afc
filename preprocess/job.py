"""Ingest jobs (images, videos): list sources, plan groups of items, write each as a part over Ray, repack
the parts into shards of equal sample counts, gather manifest, errors and stats.

Items are split and grouped by their position in a stable listing, and shards are cut from the parts in
that order, so a rerun plans the very same parts and shards and skips the committed ones (see
preprocess/writer.py). Layout under the output: shards/{split}-NNNNNN.tar, manifests/ (one parquet per
shard), manifest.parquet, errors.parquet, _stats.json, and _parts/ (the staging parts' manifests and
errors; their tars are deleted once no failed item can be retried).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import time
from collections import deque
from collections.abc import Callable
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
    MAX_ATTEMPTS,
    ImageSettings,
    RepackPlan,
    ShardPlan,
    ShardResult,
    VideoSettings,
    repack_shard,
    shard_uri,
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
            listed = builtin[source.name](source.limit)
        elif source.kind == "folder":
            listed = list_folder(source.path, source.limit, suffixes)
        elif source.kind == "s3":
            listed = list_s3_prefix(storage, source.path, source.limit, suffixes)
        else:
            listed = list_file(source.path, storage, source.limit)
        if source.split != "auto":
            listed = [dataclasses.replace(item, split=source.split) for item in listed]
        items.extend(listed)
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("ingest.sources: two sources list the same item keys (a source listed twice?)")
    return items


def plan_shards(items: list[ItemSpec], items_per_shard: int, val_every: int) -> list[ShardPlan]:
    """Items whose source pins a split keep it; the others are split by their position among themselves (every
    `val_every`-th is validation), so adding a held-out source leaves the other sources' split as it was."""
    by_split: dict[str, list[ItemSpec]] = {"train": [], "val": []}
    position = 0
    for item in items:
        if item.split:
            by_split[item.split].append(item)
            continue
        by_split["val" if position % val_every == 0 else "train"].append(item)
        position += 1
    plans = []
    for split, split_items in by_split.items():
        for start in range(0, len(split_items), items_per_shard):
            plans.append(ShardPlan(f"{split}-{start // items_per_shard:06d}", split,
                                   split_items[start:start + items_per_shard]))
    return plans


def plan_image_shards(section: IngestSection, storage: Storage | None = None) -> list[ShardPlan]:
    return plan_shards(list_items(section, storage), section.samples_per_shard, section.val_every)


def run_image_job(section: IngestSection, storage: Storage, output: str, progress: bool = True,
                  resources: dict[str, float] | None = None) -> dict[str, Any]:
    settings = ImageSettings(section.resolution, section.max_pixels)
    return run_shard_job(plan_image_shards(section, storage), settings, storage, output, section.parallelism,
                         progress, "ingest images", "img", section.samples_per_shard, resources)


def run_video_job(section: VideoIngestSection, storage: Storage, output: str, progress: bool = True,
                  resources: dict[str, float] | None = None) -> dict[str, Any]:
    clips = ClipSettings(section.clip_frames, section.stride_frames, section.fps, section.resolution,
                         section.max_clips, section.encoding)
    plans = plan_shards(list_items(section, storage), section.videos_per_shard, section.val_every)
    return run_shard_job(plans, VideoSettings(clips), storage, output, section.parallelism, progress,
                         "ingest videos", "video", section.clips_per_shard, resources)


def parts_folder(output: str) -> str:
    """Where a job stages its parts (one per planned group of items) before repacking them into shards."""
    return join(output, "_parts")


def run_shard_job(plans: list[ShardPlan], settings: ImageSettings | VideoSettings, storage: Storage, output: str,
                  parallelism: int, progress: bool, description: str, unit: str,
                  samples_per_shard: int | None = None,
                  resources: dict[str, float] | None = None,
                  job_stats: Callable[[pa.Table, list[ShardResult]], dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """Write every planned group as a part, repack the parts into shards of exactly `samples_per_shard`
    samples (default: the largest group's item count), then the job's manifest, errors and stats.

    Both steps are parallel Ray tasks on the same workers; see preprocess/writer.py for how each commits.
    `resources`: Ray custom resources every task asks for (config `ray.preprocess_resources`), which keeps the
    work on a cluster's CPU render workers. A task whose node dies is rerun elsewhere (max_retries).
    `job_stats`: figures of the job's whole manifest and of its parts' results (what making their samples
    measured) added to its stats (the 3D job's render figures).
    """
    import ray

    started = time.perf_counter()
    samples_per_shard = samples_per_shard or max((len(p.items) for p in plans), default=1)
    parts_output = parts_folder(output)
    storage_ref = ray.put(storage)
    part_results: list[ShardResult] = _map_on_ray(
        _remote(write_shard).options(resources=resources or None),
        [(p, storage_ref, parts_output, settings) for p in plans],
        [len(p.items) for p in plans], parallelism, progress, description, unit)
    part_tables = {r.name: r.manifest for r in part_results}

    repacks = plan_repack(plans, part_tables, samples_per_shard)
    _delete_stale_shards(storage, output, {r.name for r in repacks})
    shard_results: list[ShardResult] = _map_on_ray(
        _remote(repack_shard).options(resources=resources or None),
        [(r, storage_ref, output, parts_output) for r in repacks],
        [r.manifest.num_rows for r in repacks], parallelism, progress, f"{description}: shards", "sample")

    manifest = pa.concat_tables([r.manifest for r in repacks]) if repacks else MANIFEST_SCHEMA.empty_table()
    errors = [row for r in part_results for row in r.error_rows]
    _write_parquet(storage, join(output, "manifest.parquet"), manifest)
    _write_parquet(storage, join(output, "errors.parquet"), pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
    if not any(row["attempts"] < MAX_ATTEMPTS for row in errors):
        # No item can land on a rerun any more, so no shard will be rebuilt: the parts' samples are
        # only a second copy now. Their manifests and errors stay, so a rerun still skips every part.
        for result in part_results:
            storage.delete(shard_uri(parts_output, result.name))
    built = {r.name for r in part_results if not r.skipped}
    built_items = sum(len(p.items) for p in plans if p.name in built)
    seconds = time.perf_counter() - started
    splits = manifest.column("split").to_pylist()
    stats = {
        "shards": len(shard_results),
        "shards_skipped": sum(r.skipped for r in shard_results),
        "samples_per_shard": samples_per_shard,
        "parts": len(part_results),
        "parts_skipped": len(part_results) - len(built),
        "items": sum(len(p.items) for p in plans),
        "samples": manifest.num_rows,
        "samples_train": splits.count("train"),
        "samples_val": splits.count("val"),
        "failures": len(errors),
        "bytes": sum(r.bytes for r in shard_results),
        "seconds": round(seconds, 3),
        "items_per_second": round(built_items / seconds, 2) if built else 0.0,
    }
    if job_stats is not None:
        stats.update(job_stats(manifest, part_results))
    storage.write_json(join(output, "_stats.json"), stats)
    return stats


def plan_repack(plans: list[ShardPlan], part_tables: dict[str, pa.Table], samples_per_shard: int) -> list[RepackPlan]:
    """Each split's samples, in part order, cut into shards of `samples_per_shard` (the last may hold fewer).

    A function of the parts' manifests alone, so a rerun over the same parts plans the same shards.
    """
    repacks: list[RepackPlan] = []
    for split in dict.fromkeys(p.split for p in plans):
        pieces: list[tuple[str, int, int]] = []
        slices: list[pa.Table] = []
        filled = 0
        count = 0
        for plan in (p for p in plans if p.split == split):
            table = part_tables[plan.name]
            offset = 0
            while offset < table.num_rows:
                take = min(samples_per_shard - filled, table.num_rows - offset)
                pieces.append((plan.name, offset, offset + take))
                slices.append(table.slice(offset, take))
                offset += take
                filled += take
                if filled == samples_per_shard:
                    repacks.append(_repack_plan(f"{split}-{count:06d}", split, pieces, slices, part_tables))
                    pieces, slices, filled, count = [], [], 0, count + 1
        if slices:
            repacks.append(_repack_plan(f"{split}-{count:06d}", split, pieces, slices, part_tables))
    return repacks


def _repack_plan(name: str, split: str, pieces: list[tuple[str, int, int]], slices: list[pa.Table],
                 part_tables: dict[str, pa.Table]) -> RepackPlan:
    table = pa.concat_tables(slices)
    table = table.set_column(table.schema.get_field_index("shard"), "shard",
                             pa.array([name] * table.num_rows, pa.string()))
    whole_part = len(pieces) == 1 and pieces[0][1] == 0 and pieces[0][2] == part_tables[pieces[0][0]].num_rows
    return RepackPlan(name, split, pieces, table, whole_part)


def _delete_stale_shards(storage: Storage, output: str, planned: set[str]) -> None:
    """Shards a previous run committed past today's last one (fewer samples landed this time): manifest first."""
    for folder, suffix in (("manifests", ".parquet"), ("shards", ".tar")):
        for uri in storage.list(join(output, folder)):
            name = uri.rsplit("/", 1)[-1].removesuffix(suffix)
            if uri.endswith(suffix) and name not in planned:
                storage.delete(uri)


@functools.cache
def _remote(function):
    """One Ray remote function per function for the process: Ray exports (and disassembles) each new one."""
    import ray

    return ray.remote(num_cpus=1, max_retries=2)(function)


def _map_on_ray(remote_function, calls: list[tuple], weights: list[int], parallelism: int, progress: bool,
                description: str, unit: str) -> list:
    """Run `remote_function(*call)` for every call, at most 2 x parallelism in flight; results in call order."""
    import ray

    results: list = [None] * len(calls)
    pending = deque(range(len(calls)))
    in_flight: dict = {}
    done_count = errors = 0
    bar = tqdm(total=sum(weights), desc=description, unit=unit, disable=not progress)
    # A bounded window keeps a million-item job from materialising every task at once.
    window = max(1, parallelism * 2)
    while pending or in_flight:
        while pending and len(in_flight) < window:
            index = pending.popleft()
            in_flight[remote_function.remote(*calls[index])] = index
        done, _ = ray.wait(list(in_flight), num_returns=1)
        index = in_flight.pop(done[0])
        results[index] = ray.get(done[0])
        done_count, errors = done_count + 1, errors + results[index].errors
        bar.update(weights[index])
        bar.set_postfix(done=f"{done_count}/{len(calls)}", errors=errors)
    bar.close()
    return results


def _write_parquet(storage: Storage, uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())
