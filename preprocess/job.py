"""Ingest jobs (images, videos, 3D assets): stream the sources' listing into a plan, write every part over Ray,
gather manifest, errors and stats, with each item exactly once however the sources changed since the last run.

How an item finds its part is preprocess/plan.py; how a part commits, skips and reuses is preprocess/writer.py.
Layout under the output:

    _ingest.json                  what OUT was made with (kind, settings, code, decoders); a rerun that asks
                                  for other settings refuses, naming the setting (`redo=True` rebuilds)
    _lock                         the run lock: one driver per output (a conditional write)
    parts/<part>.parquet          each part's record (its items and their outcomes): the commit marker
    shards/<part>-<version>.tar   the WebDataset shards, one per part with samples
    manifests/<shard>.parquet     each shard's samples
    manifest.parquet, errors.parquet, _stats.json   the whole job's, rewritten by every run

A part that fails as a whole (storage down after every retry) is retried by Ray, then recorded; the other
parts go on, and the job raises IngestError at the end with the stats written. A rerun redoes only what is
not committed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import itertools
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from atoken.pipeline.config import IngestSection, VideoIngestSection
from atoken.pipeline.storage import Storage, StorageError, join
from atoken.preprocess.plan import PartPlan, Planner, hash_range, parse_part_name, part_name
from atoken.preprocess.sources import (
    BUILTIN_SOURCES,
    BUILTIN_VIDEO_SOURCES,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    ItemSpec,
    list_file,
    list_folder,
    list_parquet,
    list_s3_prefix,
    list_webdataset,
)
from atoken.preprocess.videos import ClipSettings
from atoken.preprocess.writer import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    ImageSettings,
    PartRecord,
    PartResult,
    VideoSettings,
    delete_shard,
    manifest_uri,
    record_uri,
    write_part,
)

FORMAT = 2  # of the output layout; 1 was positional parts repacked into shards (_parts/)
# The code each ingest kind runs and the libraries that decode for it: what its fingerprint and OUT's
# _ingest.json record (a comment in render.py no longer re-ingests every image).
CODE = {
    "images": ("preprocess/job.py", "preprocess/plan.py", "preprocess/writer.py", "preprocess/sources.py",
               "preprocess/images.py"),
    "videos": ("preprocess/job.py", "preprocess/plan.py", "preprocess/writer.py", "preprocess/sources.py",
               "preprocess/images.py", "preprocess/videos.py"),
    "3d": ("preprocess/job.py", "preprocess/plan.py", "preprocess/writer.py", "preprocess/sources.py",
           "preprocess/images.py", "preprocess/objects.py", "preprocess/render.py", "preprocess/voxels.py"),
}
DECODERS = {"images": ("pillow",), "videos": ("pillow", "av"), "3d": ("pillow", "trimesh", "numpy")}


class IngestError(RuntimeError):
    """Some parts could not be written; the others are committed and the stats say which failed."""


class OutputMismatch(ValueError):
    """OUT was made with other settings than this run asks for."""


def library_versions(names: Iterable[str]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def made_with(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What `_ingest.json` records: the settings that shape a sample, the code and the decoders."""
    from atoken.pipeline.dag import code_version

    record = {"format": FORMAT, "kind": kind, "settings": settings, "code": code_version(CODE[kind])[:16],
              "decoders": library_versions(DECODERS[kind])}
    return json.loads(json.dumps(record))  # as read back: tuples are lists


def iter_source(source, storage: Storage, videos: bool) -> Iterator[ItemSpec]:
    """One source's items, streamed, its pinned split applied."""
    builtin = BUILTIN_VIDEO_SOURCES if videos else BUILTIN_SOURCES
    suffixes = VIDEO_SUFFIXES if videos else IMAGE_SUFFIXES
    if source.kind == "builtin":
        listed = iter(builtin[source.name](source.limit))
    elif source.kind == "folder":
        listed = list_folder(source.path, source.limit, suffixes)
    elif source.kind == "s3":
        listed = list_s3_prefix(storage, source.path, source.limit, suffixes)
    elif source.kind == "webdataset":
        listed = list_webdataset(storage, source.path, source.limit, suffixes)
    elif source.kind == "parquet":
        listed = list_parquet(storage, source.path, source.limit, source.image_column, source.caption_column)
    else:
        listed = list_file(source.path, storage, source.limit)
    if source.split != "auto":
        listed = (dataclasses.replace(item, split=source.split) for item in listed)
    return listed


def iter_items(section: IngestSection | VideoIngestSection, storage: Storage | None = None) -> Iterator[ItemSpec]:
    """The items of every source of an image or video section, streamed (nothing holds the whole listing)."""
    storage = storage or Storage()
    videos = isinstance(section, VideoIngestSection)
    for source in section.sources:
        yield from iter_source(source, storage, videos)


def first_items(section: IngestSection | VideoIngestSection, storage: Storage) -> list[ItemSpec]:
    """Each source's first item, or a one-line error naming the source that lists none (a preflight that
    costs one listing page, not the whole listing; a list file is not listed at all: its footer or first rows
    say whether it lists an item, and its items are not returned)."""
    from atoken.preprocess.sources import SourceError, list_file_has_items

    videos = isinstance(section, VideoIngestSection)
    firsts = []
    for index, source in enumerate(section.sources):
        if source.kind == "list" and source.limit is None:
            listed = list_file_has_items(source.path, storage)
            first = True if listed else None
        else:
            first = next(iter_source(source, storage, videos), None)
        if first is None:
            what = source.name if source.kind == "builtin" else source.path
            raise SourceError(f"{'videos' if videos else 'ingest'}.sources[{index}] ({source.kind} {what}) "
                              f"lists no {'videos' if videos else 'images'}")
        if first is not True:
            firsts.append(first)
    return firsts


def list_items(section: IngestSection | VideoIngestSection, storage: Storage | None = None) -> list[ItemSpec]:
    """Every item as a list (tests and small tools; jobs stream `iter_items`)."""
    return list(iter_items(section, storage))


def run_image_job(section: IngestSection, storage: Storage, output: str, progress: bool = True,
                  resources: dict[str, float] | None = None, redo: bool = False) -> dict[str, Any]:
    settings = ImageSettings(section.resolution, section.max_pixels, section.max_item_mb << 20,
                             section.max_resolution, section.resize, section.encoding, section.quality)
    return run_ingest_job(iter_items(section, storage), settings, storage, output, kind="images",
                          items_per_part=section.samples_per_shard, val_every=section.val_every,
                          parallelism=section.parallelism, progress=progress, description="ingest images",
                          unit="img", resources=resources, redo=redo, settings_record=image_settings_record(section))


def image_settings_record(section: IngestSection) -> dict[str, Any]:
    """The image settings that shape a sample, as `_ingest.json` records them. A setting at the value every
    output had before it existed (square crop, PNG) is left out, so an output made before it still matches
    (a missing setting reads as None; a rerun then refuses only a real change, not a new config field)."""
    record: dict[str, Any] = {"resolution": section.resolution, "max_pixels": section.max_pixels,
                              "val_every": section.val_every}
    if section.resolution is None:
        record |= {"max_resolution": section.max_resolution, "resize": section.resize}
    if section.encoding != "png":
        record |= {"encoding": section.encoding, "quality": section.quality}
    return record


def run_video_job(section: VideoIngestSection, storage: Storage, output: str, progress: bool = True,
                  resources: dict[str, float] | None = None, redo: bool = False) -> dict[str, Any]:
    clips = ClipSettings(section.clip_frames, section.stride_frames, section.fps, section.resolution,
                         section.max_clips, section.encoding, max_resolution=section.max_resolution)
    settings = VideoSettings(clips, section.max_item_mb << 20, section.spool_mb << 20, section.decode_timeout_s)
    return run_ingest_job(iter_items(section, storage), settings, storage, output, kind="videos",
                          items_per_part=section.videos_per_shard, val_every=section.val_every,
                          parallelism=section.parallelism, progress=progress, description="ingest videos",
                          unit="video", resources=resources, redo=redo,
                          settings_record={**dataclasses.asdict(clips), "val_every": section.val_every})


def run_ingest_job(items: Iterable[ItemSpec], settings, storage: Storage, output: str, *, kind: str,
                   items_per_part: int, val_every: int, parallelism: int, progress: bool, description: str,
                   unit: str, settings_record: dict[str, Any], resources: dict[str, float] | None = None,
                   redo: bool = False,
                   job_stats: Callable[[pa.Table, list[PartResult]], dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """Plan `items` into parts, write every part not already committed as planned, then the job's manifest,
    errors and stats. `resources`: Ray custom resources every task asks for (config
    `ray.preprocess_resources`). `job_stats`: figures of the job's manifest and of its parts' results added to
    its stats (the 3D job's render figures). `redo`: rebuild OUT from nothing when it was made otherwise."""
    started = time.perf_counter()
    with RunLock(storage, output) as lock:
        record = made_with(kind, settings_record)
        if not redo:  # other settings are refused before the listing, which can take minutes
            _check_made_with(storage, output, record, redo)
        planner = Planner(val_every, items_per_part)
        try:
            planner.add(_listing_progress(items, progress, description))
            planner.check_unique()  # before any part is written: a key listed twice stops the job here
            if redo:  # OUT is emptied only once the whole listing is in: a listing that fails leaves OUT as it was
                _check_made_with(storage, output, record, redo)
            previous = _committed_parts(storage, output)
            listed_seconds = time.perf_counter() - started
            bits = planner.bits({split: max(found, key=lambda b: len(found[b]))
                                 for split, found in previous.items()})
            with _ErrorsWriter(storage, join(output, "errors.parquet")) as errors:
                results, failed = _write_parts(planner.parts(bits), bits, previous, settings, storage, output,
                                               parallelism, progress, description, unit, resources, errors, lock)
        finally:
            planner.close()
        items_done = sum(r.items for r in results)
        failed_items = sum(count for count, _ in failed.values())
        # Exactly once, checked: every listed item is in exactly one committed part's record (or in a part that
        # failed as a whole); below, every sample a record counts is in the manifest and no key is in it twice.
        if items_done + failed_items != planner.items:
            raise AssertionError(f"ingest lost track of items: {planner.items} listed, {items_done} in committed "
                                 f"parts, {failed_items} in failed parts")
        samples = sum(r.samples for r in results)
        if failed:
            # Some parts did not commit: the previous manifest.parquet stays, with every shard it names (nothing
            # is deleted), rather than a manifest without the failed parts' samples. The rerun completes it.
            manifest_rows = {split: sum(r.samples for r in results if r.name.startswith(f"{split}-"))
                             for split in ("train", "val")}
        else:
            # The job's manifest first, then what it no longer names: readers of OUT always find every shard the
            # manifest they read lists, during a rerun and after a kill at any point.
            lock.check()
            manifest_rows = _gather_manifest(storage, output, results, samples)
            lock.check()
            _delete_superseded(storage, output, previous, results, failed, bits)
        seconds = time.perf_counter() - started
        made = sum(r.made for r in results)
        stats = {
            "shards": sum(1 for r in results if r.shard),
            "parts": len(results) + len(failed),
            "parts_skipped": sum(r.skipped for r in results),
            "parts_failed": len(failed),
            "items": planner.items,
            "items_made": made,
            "items_landed": sum(r.landed for r in results),  # made and now samples: what a rerun added
            "items_reused": sum(r.reused for r in results),
            "samples": samples,
            "samples_train": manifest_rows.get("train", 0),
            "samples_val": manifest_rows.get("val", 0),
            "failures": errors.rows,
            "failures_permanent": sum(r.permanent for r in results),
            "failures_transient": sum(r.transient for r in results),
            "retryable": sum(r.retryable for r in results) + failed_items,
            "bytes": sum(r.bytes for r in results),
            "listing_seconds": round(listed_seconds, 3),
            "seconds": round(seconds, 3),
            "items_per_second": round(made / seconds, 2) if made else 0.0,
        }
        if failed:
            stats["failed_parts"] = {name: error for name, (_, error) in sorted(failed.items())[:20]}
        if job_stats is not None and not failed:
            manifest = pq.read_table(io.BytesIO(storage.read_bytes(join(output, "manifest.parquet"))))
            stats.update(job_stats(manifest, results))
        storage.write_json(join(output, "_stats.json"), stats)
    if failed:
        first = next(iter(sorted(failed.items())))
        raise IngestError(f"{len(failed)} of {stats['parts']} parts failed ({failed_items} items not ingested; "
                          f"first: {first[0]}: {first[1][1]}): rerun to retry them; stats in "
                          f"{join(output, '_stats.json')}")
    return stats


def _listing_progress(items: Iterable[ItemSpec], progress: bool, description: str) -> Iterator[ItemSpec]:
    """The listing as it streams, with a count and rate on the console (minutes at 10M items)."""
    bar = tqdm(desc=f"{description}: listing", unit="item", disable=not progress, mininterval=1.0)
    for item in items:
        bar.update(1)
        yield item
    bar.close()


class _ErrorsWriter:
    """errors.parquet written as parts finish (a part's failed items at a time): never all rows in memory."""

    def __init__(self, storage: Storage, uri: str):
        self.target = storage.staged_file(uri)
        self.rows = 0

    def __enter__(self) -> _ErrorsWriter:
        self.writer = pq.ParquetWriter(self.target.__enter__(), ERRORS_SCHEMA)
        return self

    def add(self, rows: list[dict]) -> None:
        if rows:
            self.writer.write_table(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA))
            self.rows += len(rows)

    def __exit__(self, kind, *rest) -> None:
        self.writer.close()
        self.target.__exit__(kind, *rest)


def _check_made_with(storage: Storage, output: str, record: dict[str, Any], redo: bool) -> None:
    """Refuse (one line naming the setting) a run whose settings, layout or kind differ from OUT's; with
    `redo`, empty OUT first (its manifest before its shards, so no reader sees a manifest of missing shards).
    Another code or decoder version is allowed and recorded (`history`): refusing every statement change in the
    ingest code would force a full rebuild for any fix, and the versions that made OUT stay on record."""
    uri = join(output, "_ingest.json")
    if storage.exists(uri):
        before = storage.read_json(uri)
        differences = _differences(before, record)
        if differences and not redo:
            raise OutputMismatch(f"{output} was made with {differences[0][1]}, this run asks for "
                                 f"{differences[0][2]}: use another output, or redo it (--redo)")
        if differences:
            _empty(storage, output)
        else:
            made = {"code": record["code"], "decoders": record["decoders"]}
            history = [h for h in before.get("history", []) if h != made]
            if {"code": before.get("code"), "decoders": before.get("decoders")} != made:
                history.append({"code": before.get("code"), "decoders": before.get("decoders")})
                print(f"atoken ingest: {output} was made by other code or decoders ({history[-1]}); parts made "
                      "from now on use these, the others stay as they are (--redo rebuilds all)", flush=True)
            if history:
                record = {**record, "history": history}
    elif storage.exists(join(output, "_parts")) or storage.exists(join(output, "manifest.parquet")):
        if not redo:
            raise OutputMismatch(f"{output} holds an ingest of an older layout (no _ingest.json): use another "
                                 "output, or redo it (--redo)")
        _empty(storage, output)
    storage.write_json(uri, record)


def _empty(storage: Storage, output: str) -> None:
    storage.delete(join(output, "manifest.parquet"))
    for folder in ("parts", "_parts", "manifests", "shards"):
        storage.delete_folder(join(output, folder))


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field, before, now) of every setting, the layout or the kind that differs, as `name=value` strings: what
    makes a rerun refuse (code and decoder versions are recorded, not compared)."""
    found = []
    for name in sorted(set(before.get("settings", {})) | set(now["settings"])):
        old, new = before.get("settings", {}).get(name), now["settings"].get(name)
        if old != new:
            found.append((name, f"{name}={old}", f"{name}={new}"))
    for name in ("format", "kind"):
        if before.get(name) != now[name]:
            found.append((name, f"{name} {before.get(name)}", f"{name} {now[name]}"))
    return found


def _committed_parts(storage: Storage, output: str) -> dict[str, dict[int, list[str]]]:
    """The committed parts' names by split and part-count bits (one listing of parts/)."""
    found: dict[str, dict[int, list[str]]] = {}
    for uri, _, _ in storage.iter_objects(join(output, "parts")):
        if not uri.endswith(".parquet"):
            continue
        name = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        split, bits, _ = parse_part_name(name)
        found.setdefault(split, {}).setdefault(bits, []).append(name)
    return found


def _overlapping(previous: dict[str, dict[int, set[str]]], plan: PartPlan) -> list[str]:
    """This part's own committed name first, then every committed part of its split whose hash range overlaps
    (by index arithmetic: ranges are aligned powers of two, so no scan of all parts)."""
    split, bits, index = parse_part_name(plan.name)
    names = [plan.name]
    for old_bits, old_names in previous.get(split, {}).items():
        if old_bits == bits:
            continue
        if old_bits > bits:
            candidates = range(index << (old_bits - bits), (index + 1) << (old_bits - bits))
        else:
            candidates = [index >> (bits - old_bits)]
        names.extend(n for n in (part_name(split, old_bits, i) for i in candidates) if n in old_names)
    return names


def _write_parts(plans: Iterator[PartPlan], bits: dict[str, int], previous, settings, storage: Storage,
                 output: str, parallelism: int, progress: bool, description: str, unit: str,
                 resources: dict[str, float] | None, errors: _ErrorsWriter, lock: RunLock
                 ) -> tuple[list[PartResult], dict[str, tuple[int, str]]]:
    """Every planned part through `write_part` on Ray, at most 2 x parallelism in flight; the parts' results
    (their failed items go to `errors` as they come) and, for parts that failed after Ray's retries,
    name → (item count, error). If the driver stops (an error, the lock lost), the tasks in flight are cancelled
    and waited for before the lock is released, so nothing writes into OUT after this driver let go of it."""
    import ray

    task = _remote(write_part).options(resources=resources or None)
    storage_ref = ray.put(storage)
    settings_ref = ray.put(settings)
    total = sum(2 ** b for b in bits.values())
    results: list[PartResult] = []
    failed: dict[str, tuple[int, str]] = {}
    in_flight: dict = {}
    window = max(1, parallelism * 2)  # a bounded window: a 10M-item job never materialises every task at once
    bar = tqdm(total=total, desc=description, unit="part", disable=not progress)
    counts = {"items": 0, "errors": 0, "made": 0}
    started = time.perf_counter()
    plans = iter(plans)
    previous_sets = {split: {b: set(names) for b, names in by_bits.items()} for split, by_bits in previous.items()}
    try:
        while True:
            lock.check()
            while len(in_flight) < window:
                plan = next(plans, None)
                if plan is None:
                    break
                ref = task.remote(plan, storage_ref, output, settings_ref, _overlapping(previous_sets, plan))
                in_flight[ref] = (plan.name, len(plan.items))
            if not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=lock.heartbeat_seconds)
            if not done:
                continue  # a long part: check the lock, then wait again
            name, item_count = in_flight.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - a part's failure is recorded; the job goes on
                cause = getattr(exc, "cause", None) or exc
                line = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:300]}"
                failed[name] = (item_count, line)
                print(f"atoken ingest: part {name} failed: {line}", flush=True)
                bar.update(1)
                continue
            errors.add(result.error_rows)
            result.error_rows = []  # written: the driver keeps counts, not rows
            results.append(result)
            counts["items"] += result.items
            counts["errors"] += result.permanent + result.transient
            counts["made"] += result.made
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(items=counts["items"], made=counts["made"], errors=counts["errors"],
                            rate=f"{counts['made'] / elapsed:.1f} {unit}/s")
    finally:
        if in_flight:
            for ref in in_flight:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - the others are still cancelled; the wait says what is left
                    pass
            _, running = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=60)
            lock.abandon = bool(running)
        bar.close()
    results.sort(key=lambda r: r.name)
    return results, failed


def _delete_superseded(storage: Storage, output: str, previous: dict[str, dict[int, list[str]]],
                       results: list[PartResult], failed: dict[str, tuple[int, str]], bits: dict[str, int]) -> None:
    """Records of another part count, once every new part over their range is committed, then every shard and
    manifest no record names (those the new ones replaced, and what a killed run left): the store holds each
    sample once. Runs after manifest.parquet is committed, so no manifest a reader can see names a deleted shard."""
    failed_ranges = [(parse_part_name(n)[0], *hash_range(*parse_part_name(n)[1:])) for n in failed]
    kept = [name for name in failed if storage.exists(record_uri(output, name))]  # not rewritten this run
    for split, by_bits in previous.items():
        for old_bits, names in by_bits.items():
            if bits.get(split) == old_bits:
                continue
            for name in names:
                low, high = hash_range(old_bits, parse_part_name(name)[2])
                if any(s == split and a < high and low < b for s, a, b in failed_ranges):
                    kept.append(name)  # its samples may still be reused by the failed part's rerun
                    continue
                storage.delete(record_uri(output, name))
    named = {r.shard for r in results if r.shard}
    for name in kept:
        try:
            named.add(PartRecord.read(storage, record_uri(output, name)).shard)
        except StorageError as exc:  # unreadable now: which shard it names is unknown, so delete none this run
            print(f"atoken ingest: kept part {name} unreadable ({exc}); stale shards are left for the next run",
                  flush=True)
            return
    for uri, _, _ in itertools.chain(storage.iter_objects(join(output, "shards")),
                                     storage.iter_objects(join(output, "manifests"))):
        shard = uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if shard not in named:
            delete_shard(storage, output, shard)
    storage.delete_folder(join(output, "_staging"))


def _gather_manifest(storage: Storage, output: str, results: list[PartResult], samples: int) -> dict[str, int]:
    """manifest.parquet from the shards' manifests, fetched 8 at a time and written one at a time, in part
    order (bounded memory); sample counts by split, and the number of distinct sample keys (from 64-bit hashes:
    8 bytes a sample, not the keys themselves)."""
    import numpy as np

    counts = {"all": 0}
    key_hashes: list[np.ndarray] = []
    shards = [r.shard for r in results if r.shard]
    with storage.staged_file(join(output, "manifest.parquet")) as path, \
            pq.ParquetWriter(path, MANIFEST_SCHEMA) as writer, ThreadPoolExecutor(8) as pool:
        for data in _ordered(pool, lambda shard: _read_retrying(storage, manifest_uri(output, shard)), shards, 16):
            table = pq.read_table(io.BytesIO(data)).cast(MANIFEST_SCHEMA)
            writer.write_table(table)
            counts["all"] += table.num_rows
            for entry in table.column("split").value_counts().to_pylist():
                counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
            key_hashes.append(np.fromiter((_key_hash(k) for k in table.column("key").to_pylist()), np.int64,
                                          table.num_rows))
        every = np.concatenate(key_hashes) if key_hashes else np.zeros(0, np.int64)
        distinct = int(len(np.unique(every)))
        # Checked before the upload (the block raises, nothing is committed): every sample the records count is
        # in it, and no key twice (64-bit blake2b: a false alarm needs ~4e9 samples).
        if counts["all"] != samples or distinct != samples:
            raise AssertionError(f"ingest manifest would hold {counts['all']} samples with {distinct} distinct keys, "
                                 f"the parts' records {samples}: not committed")
    return counts


def _read_retrying(storage: Storage, uri: str, attempts: int = 4) -> bytes:
    """A read the driver cannot do without (a shard's manifest, after every part committed): storage's own
    retries, then a few more with backoff (1, 2, 4 s) before the job fails for it."""
    for attempt in range(1, attempts + 1):
        try:
            return storage.read_bytes(uri)
        except StorageError:
            if attempt == attempts:
                raise
            time.sleep(2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def _ordered(pool: ThreadPoolExecutor, function, values: list, ahead: int) -> Iterator:
    """function(value) for each value, in order, at most `ahead` running or waiting to be consumed (unlike
    Executor.map, which runs them all and holds every result)."""
    pending: deque = deque()
    for value in values:
        pending.append(pool.submit(function, value))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class RunLock:
    """One driver per output: `_lock` is created with a conditional write (S3 If-None-Match, an atomic link
    locally) and refreshed every 30 s while it is still this driver's. A lock left by a driver that died is taken
    over: at once on the same host when its process is gone, from anywhere once its heartbeat is older than
    `stale_seconds` (or when it cannot be read at all). A driver that finds its lock taken stops (`check`), and
    deletes only a lock that is still its own. Two drivers taking over one stale lock in the same instant can
    still race (no compare-and-delete on S3): the heartbeat's ownership check then stops one of them."""

    def __init__(self, storage: Storage, output: str, stale_seconds: float = 300.0, heartbeat_seconds: float = 30.0):
        self.storage = storage
        self.uri = join(output, "_lock")
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.lost: str | None = None
        self.last_beat = time.time()
        self.abandon = False  # set when tasks may still write after this driver stops: leave the lock to go stale
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict | None:
        """The lock's content; {} when it is there but unreadable; None when it is gone."""
        try:
            return json.loads(self.storage.read_bytes(self.uri))
        except StorageError:
            if not self.storage.exists(self.uri):
                return None
            raise  # there but not readable now (throttled, timed out): not a reason to think its driver dead
        except ValueError:
            return {}  # not ours to parse: an older or foreign lock file

    def _ours(self, holder: dict | None) -> bool:
        return bool(holder) and all(holder.get(k) == v for k, v in self.owner.items())

    def __enter__(self) -> RunLock:
        for _ in range(3):
            if self.storage.create_exclusive(self.uri, self._body()):
                break
            holder = self._holder()
            if holder is None:
                continue  # released between the two calls
            if not self._stale(holder):
                raise StorageError(f"{self.uri.rsplit('/_lock', 1)[0]} is being written by another ingest "
                                   f"(host {holder.get('host')}, pid {holder.get('pid')}, heartbeat "
                                   f"{time.time() - holder.get('heartbeat', 0):.0f} s ago); wait for it, or "
                                   f"delete {self.uri} if it is gone")
            self.storage.delete(self.uri)
        else:
            raise StorageError(f"cannot take {self.uri}: another driver keeps taking it")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="atoken-ingest-lock")
        self._thread.start()
        return self

    def _stale(self, holder: dict) -> bool:
        if self._ours(holder):
            return True  # our own: a conditional PUT whose answer was lost and was retried (412 on the retry)
        if not holder:
            return True
        if holder.get("host") == self.owner["host"] and holder.get("pid") != self.owner["pid"]:
            try:
                os.kill(int(holder.get("pid", 0)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, TypeError):
                pass
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_seconds

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                holder = self._holder()
                if holder and not self._ours(holder):
                    self.lost = f"host {holder.get('host')}, pid {holder.get('pid')}"
                    return
                self.storage.write_bytes(self.uri, self._body())
                self.last_beat = time.time()
            except StorageError:
                pass  # the next beat tries again; `check` stops the driver if no beat lands for long

    def check(self) -> None:
        """Raise if another driver has taken this output over (this one was silent past stale_seconds)."""
        if self.lost:
            raise StorageError(f"{self.uri}: taken over by another ingest ({self.lost}); this driver stops")
        silent = time.time() - self.last_beat
        if silent > self.stale_seconds / 2:
            raise StorageError(f"{self.uri}: no heartbeat has landed for {silent:.0f} s, so another driver may "
                               "take this output over; this driver stops")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.abandon:
            print(f"atoken ingest: parts may still be running; {self.uri} is left to go stale", flush=True)
            return
        try:
            if self._ours(self._holder()):
                self.storage.delete(self.uri)
        except StorageError as error:
            print(f"atoken ingest: cannot release {self.uri} ({error}); it goes stale in "
                  f"{self.stale_seconds:.0f} s", flush=True)


@functools.cache
def _remote(function):
    """One Ray remote function per function for the process: Ray exports (and disassembles) each new one.
    A task whose node dies, or that raises a storage or transient error, is retried twice (Ray)."""
    import ray

    return ray.remote(num_cpus=1, max_retries=2,
                      retry_exceptions=[StorageError, OSError, ConnectionError])(function)
