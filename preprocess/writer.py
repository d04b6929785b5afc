"""One part of an ingest: its planned items → one committed shard, reusing every sample that is still current.

A part (preprocess/plan.py) is the items whose key hashes into one range; its shard holds their samples in
(hash, key) order. `write_part` commits in three writes, the last being the commit marker:

1. `shards/<part>-<version>.tar`, written locally, re-read, then uploaded; `<version>` hashes the identities of
   the items it holds, so a shard's name changes whenever its content does and a reader never sees a shard
   change under a name it already read;
2. `manifests/<part>-<version>.parquet`: one row per sample;
3. `parts/<part>.parquet`: one row per planned item (its identity, outcome, attempts and the byte range of its
   samples in the shard), the part's *record*. It names the shard.

A kill at any point leaves either the old record (and its shard, still whole) or the new one: nothing is lost,
nothing is used twice, and what the kill left unreferenced is deleted by the next run (preprocess/job.py).

A rerun compares the items planned for a part with its record, by identity (key, locator, caption, split and
the source's fingerprint: size and mtime, or ETag):
- the same items, nothing retryable → skipped, nothing read;
- otherwise a new shard: the samples of unchanged items are copied from the old shards as byte ranges (one
  coalesced ranged read per run of neighbours: each old shard read at most once, nothing decoded again),
  changed and new items are made, removed ones are left out, and items that failed for a passing reason
  (`transient`: storage, network, timeout) are tried again, up to MAX_ATTEMPTS runs. Items that can never
  succeed (`permanent`: undecodable, a bomb, unsupported, a quality drop) are recorded once and not retried
  until their source changes.
The data set is stored once: a part's shard is a final shard (no staging copy, no repack); sample counts per
shard vary around `samples_per_shard` (hash ranges), which the loader reads from the manifest.
Tars are written with fixed headers (mtime 0), and neither a sample nor its manifest row holds a fact of the
run that made it (seconds, absolute paths: `ShardSample.measured` carries those to the stats), so the same
inputs give the same shard bytes on every run, wherever the output lives.
Plain functions: preprocess/job.py maps them over Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from atoken.pipeline.storage import LocalStaging, Storage, StorageError, is_s3, join, local_path
from atoken.preprocess.images import ItemError, process_image
from atoken.preprocess.plan import PartPlan
from atoken.preprocess.sources import ItemSpec, read_item
from atoken.preprocess.videos import ClipSettings, clip_video

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("caption", pa.string()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("bytes", pa.int64()),
    # video clips only (null for images): where in the source the clip lies
    ("source_key", pa.string()), ("start_seconds", pa.float64()), ("end_seconds", pa.float64()),
    ("fps", pa.float64()), ("frames", pa.int32()),
    # 3D assets only (null for images and clips): views rendered, occupied voxels, quality flags
    # (preprocess/voxels.py FLAGS), the asset's licence where its source has one
    ("views", pa.int32()), ("voxels", pa.int32()), ("flags", pa.list_(pa.string())), ("license", pa.string()),
])
ERRORS_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("locator", pa.string()), ("stage", pa.string()),
    ("error", pa.string()), ("kind", pa.string()), ("attempts", pa.int32()),
])
# A part's record: one row per planned item. `first_sample`/`samples` index its rows in the shard's manifest,
# `begin`/`end` its samples' bytes in the shard's tar.
RECORD_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("locator", pa.string()), ("identity", pa.string()),
    ("status", pa.string()),  # ok | permanent | transient
    ("stage", pa.string()), ("error", pa.string()), ("attempts", pa.int32()),
    ("first_sample", pa.int32()), ("samples", pa.int32()), ("begin", pa.int64()), ("end", pa.int64()),
    ("limits", pa.string()),  # the per-item limits a failure happened under: raised limits retry it
])
MAX_ATTEMPTS = 3  # runs that try a transiently failing item
ITEM_TRIES = 3  # tries of a transient failure within one run, with backoff (0.5 s, 1 s)


def failure_kind(exc: BaseException) -> str:
    """`permanent` (the item itself is bad or not there: retrying cannot help) or `transient` (the world was:
    storage, network, a timeout; retry). Decided by the exception and its causes, never by message text."""
    if isinstance(exc, ItemError):
        # Blender timing out or crashing may pass on another worker; bad bytes never do.
        return "transient" if getattr(exc, "stage", None) in ("timeout", "crash") else "permanent"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, FileNotFoundError | IsADirectoryError | PermissionError | NotADirectoryError):
            return "permanent"
        if isinstance(cause, StorageError) and cause.permanent:
            return "permanent"
        if isinstance(cause, urllib.error.HTTPError):
            return "transient" if cause.code in (408, 425, 429) or cause.code >= 500 else "permanent"
        cause = cause.__cause__ or cause.__context__
    return "transient"


def item_limits(settings) -> str:
    """The per-item limits of a job's settings, as recorded with a failure."""
    return json.dumps({"max_item_bytes": getattr(settings, "max_item_bytes", None),
                       "decode_timeout_s": getattr(settings, "decode_timeout_s", None)})


def item_identity(item: ItemSpec, split: str) -> str:
    """What a sample was made from: a changed caption, split or source fingerprint makes a new sample."""
    text = "\0".join((item.key, item.locator, item.caption, split, item.fingerprint))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def planned_digest(identities: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(identities)).encode()).hexdigest()[:32]


@dataclass
class PartResult:
    name: str
    shard: str  # "" when no item of the part has a sample
    items: int
    ok: int
    permanent: int
    transient: int
    retryable: int  # transient failures a rerun will try again
    samples: int
    bytes: int
    seconds: float
    skipped: bool = False
    made: int = 0  # items made this run (the others were skipped, reused or settled)
    landed: int = 0  # of those, the items that became samples (the others failed again)
    reused: int = 0  # items whose samples were copied from an older shard
    measured: dict[str, float] = field(default_factory=dict)  # its samples' `ShardSample.measured`, summed
    error_rows: list[dict] = field(default_factory=list)  # its failed items, as ERRORS_SCHEMA rows

    @property
    def errors(self) -> int:
        return self.permanent + self.transient


@dataclass(frozen=True)
class ShardSample:
    key: str
    files: dict[str, bytes]  # extension → bytes, e.g. {"png": ...} or {"mp4": ...}
    meta: dict
    # What making it measured (seconds, views rendered, renders reused): facts of this run, not of the sample,
    # so they stay out of its bytes and its manifest row (the same inputs give the same shards on every run and
    # wherever the output lives) and reach the job's stats through PartResult.measured.
    measured: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageSettings:
    resolution: int | None  # square crop at this size; None: native aspect (max_resolution)
    max_pixels: int
    max_item_bytes: int | None = 256 << 20  # ingest.max_item_mb
    max_resolution: int | None = None  # ingest.max_resolution: the `resize` side capped, aspect kept
    resize: str = "long"  # ingest.resize
    encoding: str = "png"  # ingest.encoding, of the train split (for_split)
    quality: int = 95  # ingest.quality (jpg, webp)

    def for_split(self, split: str) -> ImageSettings:
        """The settings a part of `split` is made with: the validation split keeps a lossless PNG copy whatever
        the training encoding, so its reconstruction metrics score the tokenizer, not JPEG's artefacts."""
        if split == "train" or self.encoding == "png":
            return self
        return dataclasses.replace(self, encoding="png")

    def process(self, data: bytes | Path, item: ItemSpec) -> list[ShardSample]:
        data = data if isinstance(data, bytes) else data.read_bytes()
        sample = process_image(data, item.key, self.resolution, self.max_pixels, max_resolution=self.max_resolution,
                               resize=self.resize, encoding=self.encoding, quality=self.quality)
        return [ShardSample(sample.key, {sample.extension: sample.data}, sample.meta)]


@dataclass(frozen=True)
class VideoSettings:
    clips: ClipSettings
    max_item_bytes: int | None = 4096 << 20  # videos.max_item_mb
    spool_bytes: int | None = 64 << 20  # videos.spool_mb: larger videos are decoded from a local file
    decode_timeout_s: float | None = 600.0  # videos.decode_timeout_s

    def process(self, data: bytes | Path, item: ItemSpec) -> list[ShardSample]:
        clips = clip_video(data, item.key, self.clips, timeout_s=self.decode_timeout_s)
        return [ShardSample(c.key, {c.extension: c.data}, c.meta) for c in clips]


def shard_uri(output: str, name: str) -> str:
    return join(output, "shards", f"{name}.tar")


def manifest_uri(output: str, name: str) -> str:
    return join(output, "manifests", f"{name}.parquet")


def record_uri(output: str, part: str) -> str:
    return join(output, "parts", f"{part}.parquet")


@dataclass
class PartRecord:
    """A committed part, read back: its rows and the shard it names."""
    table: pa.Table
    shard: str
    planned: str

    @staticmethod
    def read(storage: Storage, uri: str) -> PartRecord:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        meta = table.schema.metadata or {}
        for missing in (f for f in RECORD_SCHEMA if f.name not in table.column_names):
            table = table.append_column(missing, pa.nulls(table.num_rows, missing.type))  # an older record
        table = table.select(RECORD_SCHEMA.names)
        return PartRecord(table.cast(RECORD_SCHEMA), meta.get(b"shard", b"").decode(),
                          meta.get(b"planned", b"").decode())

    def failed_under_other(self, limits: str) -> bool:
        """Whether an item failed under other per-item limits than `limits` (then it is tried again)."""
        rows = self.table.select(["status", "limits"]).to_pylist()
        return any(r["status"] != "ok" and r["limits"] != limits for r in rows)

    def retryable(self) -> int:
        rows = self.table.select(["status", "attempts"]).to_pylist()
        return sum(r["status"] == "transient" and r["attempts"] < MAX_ATTEMPTS for r in rows)


@dataclass
class _Reusable:
    shard: str
    begin: int
    end: int
    first_sample: int
    samples: int


def write_part(plan: PartPlan, storage: Storage, output: str, settings, previous: list[str]) -> PartResult:
    """Commit `plan`'s shard and record (see the module docstring). `previous`: the parts whose records may hold
    samples of these items (this part's own name, and the parts of another part count whose hash ranges
    overlap this one's)."""
    started = time.perf_counter()
    if isinstance(settings, ImageSettings):
        settings = settings.for_split(plan.split)
    identities = [item_identity(item, plan.split) for item in plan.items]
    digest = planned_digest(identities)
    records = {name: PartRecord.read(storage, record_uri(output, name)) for name in dict.fromkeys(previous)
               if storage.exists(record_uri(output, name))}
    own = records.get(plan.name)
    limits = item_limits(settings)
    if own is not None and own.planned == digest and own.retryable() == 0 and not own.failed_under_other(limits) \
            and (not own.shard or _shard_present(storage, output, own.shard)):
        return _result_of(plan.name, own, time.perf_counter() - started, skipped=True)

    reusable: dict[str, _Reusable] = {}
    failed_before: dict[str, dict] = {}  # identity → its last failure
    for record in records.values():
        # A record whose shard is gone (a lifecycle rule, an operator, a partial restore) has nothing to reuse:
        # its items are made again rather than failing the part on every run.
        has_shard = bool(record.shard) and _shard_present(storage, output, record.shard)
        for row in record.table.to_pylist():
            if row["status"] == "ok" and not has_shard:
                continue
            if row["status"] == "ok":
                reusable[row["identity"]] = _Reusable(record.shard, row["begin"], row["end"], row["first_sample"],
                                                      row["samples"])
            else:
                failed_before[row["identity"]] = row
    with LocalStaging(_staging_parent(output)) as staging:
        tar_path = staging / f"{plan.name}.tar"
        builder = _ShardBuilder(tar_path, storage, output, plan.split, limits)
        with TarSink(tar_path) as sink:
            builder.sink = sink
            for item, identity in zip(plan.items, identities, strict=True):
                if identity in reusable:
                    builder.reuse(item, identity, reusable[identity])
                    continue
                before = failed_before.get(identity)
                if before is not None and before["limits"] == limits \
                        and (before["status"] == "permanent" or before["attempts"] >= MAX_ATTEMPTS):
                    builder.rows.append({**before, "key": item.key})  # settled: recorded once, not tried again
                    continue
                if before is not None and before["limits"] != limits:
                    before = None  # failed under other limits (a raised max_item_mb): a fresh try
                builder.make(item, identity, settings, attempt=before["attempts"] + 1 if before else 1)
            builder.flush()
        rows = builder.rows
        held = "\n".join(r["identity"] for r in rows if r["status"] == "ok" and r["samples"])
        # Named by what it holds (64 bits: no two contents of one part share a name).
        shard = f"{plan.name}-{hashlib.sha256(held.encode()).hexdigest()[:16]}" if held else ""
        if shard:
            _verify_tar(tar_path, [m["key"] for m in builder.manifest], sum(m["bytes"] for m in builder.manifest))
            # The same name as the shard it had and nothing made: the tar is a copy of that shard's bytes, so the
            # upload is skipped. Anything made (a retried item, a missing manifest) replaces it: making a sample
            # again need not give the same bytes (another decoder version), and the record's offsets are this tar's.
            same = own is not None and own.shard == shard and builder.made == 0 \
                and _shard_present(storage, output, shard)
            if not same:
                storage.move_into(tar_path, shard_uri(output, shard))
            manifest = pa.Table.from_pylist([{**m, "shard": shard} for m in builder.manifest],
                                            schema=MANIFEST_SCHEMA)
            storage.write_bytes(manifest_uri(output, shard), _parquet_table(manifest))
    record_table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA).replace_schema_metadata(
        {"shard": shard, "planned": digest})
    storage.write_bytes(record_uri(output, plan.name), _parquet_table(record_table))  # the commit
    # The shard it replaces is deleted by the job once its new manifest.parquet is committed, not here: until
    # then the job's previous manifest still names it, and readers of OUT keep working during a rerun.
    result = _result_of(plan.name, PartRecord(record_table, shard, digest), time.perf_counter() - started)
    result.reused = builder.reused
    result.made = builder.made
    result.landed = builder.landed
    result.measured = builder.measured
    return result


def _shard_present(storage: Storage, output: str, shard: str) -> bool:
    return storage.exists(shard_uri(output, shard)) and storage.exists(manifest_uri(output, shard))


def delete_shard(storage: Storage, output: str, shard: str) -> None:
    """A shard no record names any more: its manifest first, so nothing lists a shard that is gone."""
    storage.delete(manifest_uri(output, shard))
    storage.delete(shard_uri(output, shard))


def _result_of(name: str, record: PartRecord, seconds: float, skipped: bool = False) -> PartResult:
    rows = record.table.to_pylist()
    statuses = [r["status"] for r in rows]
    errors = [{"key": r["key"], "source": r["source"], "locator": r["locator"], "stage": r["stage"],
               "error": r["error"], "kind": r["status"], "attempts": r["attempts"]}
              for r in rows if r["status"] != "ok"]
    return PartResult(
        name, record.shard, items=len(rows), ok=statuses.count("ok"), permanent=statuses.count("permanent"),
        transient=statuses.count("transient"), retryable=record.retryable(),
        samples=sum(r["samples"] or 0 for r in rows),
        bytes=sum((r["end"] or 0) - (r["begin"] or 0) for r in rows), seconds=seconds, skipped=skipped,
        error_rows=errors)


class _ShardBuilder:
    """Writes one part's tar in plan order: reused samples as coalesced byte-range copies, the others made."""

    def __init__(self, tar_path, storage: Storage, output: str, split: str, limits: str):
        self.tar_path = tar_path
        self.limits = limits
        self.storage = storage
        self.output = output
        self.split = split
        self.sink: TarSink | None = None
        self.rows: list[dict] = []  # record rows
        self.manifest: list[dict] = []  # manifest rows (shard set at commit)
        self.measured: dict[str, float] = {}
        self.made = self.reused = self.landed = 0
        self._run: tuple[str, int, int] | None = None  # (old shard, begin, end) of the copy run being gathered
        self._old_manifests: dict[str, list[dict]] = {}

    def reuse(self, item: ItemSpec, identity: str, old: _Reusable) -> None:
        if self._run is not None and (self._run[0] != old.shard or self._run[2] != old.begin):
            self.flush()
        run_begin = old.begin if self._run is None else self._run[1]
        self._run = (old.shard, run_begin, old.end)
        # Its new offsets: where the run lands plus its offset within the run.
        offset = self.sink.tell() + (old.begin - run_begin)
        if old.shard not in self._old_manifests:
            table = pq.read_table(io.BytesIO(self.storage.read_bytes(manifest_uri(self.output, old.shard))))
            self._old_manifests[old.shard] = table.cast(MANIFEST_SCHEMA).to_pylist()
        samples = self._old_manifests[old.shard][old.first_sample:old.first_sample + old.samples]
        self.rows.append(_record_row(item, identity, "ok", None, None, 1, len(self.manifest), old.samples,
                                     offset, offset + old.end - old.begin))
        self.manifest.extend(samples)
        self.reused += 1

    def flush(self) -> None:
        if self._run is None:
            return
        shard, begin, end = self._run
        self._run = None
        self.sink.copy_from(self.storage, shard_uri(self.output, shard), begin, end)

    def make(self, item: ItemSpec, identity: str, settings, attempt: int) -> None:
        self.flush()
        self.made += 1
        stage = "read"
        data: bytes | Path = b""
        try:
            data = _read_with_retries(item, self.storage, settings, self.tar_path.parent)
            stage = "decode"
            samples = settings.process(data, item)
        except Exception as exc:  # noqa: BLE001 - any failure of one item is recorded, never the job's
            self.rows.append({**_record_row(item, identity, failure_kind(exc), getattr(exc, "stage", stage),
                                            f"{type(exc).__name__}: {exc}"[:500], attempt, None, 0, None, None),
                              "limits": self.limits})
            return
        finally:
            if isinstance(data, Path) and data.parent == self.tar_path.parent:
                data.unlink(missing_ok=True)  # a spooled download
        begin = self.sink.tell()
        first = len(self.manifest)
        self.landed += 1
        for sample in samples:
            meta = {**sample.meta, "caption": item.caption, "source": item.source, "split": self.split}
            _add_sample(self.sink, sample.key, {**sample.files, "json": json.dumps(meta).encode()})
            self.manifest.append(_manifest_row(sample, meta, self.split))
            for name, value in sample.measured.items():
                self.measured[name] = self.measured.get(name, 0) + value
        self.rows.append(_record_row(item, identity, "ok", None, None, attempt, first, len(samples), begin,
                                     self.sink.tell()))


def _read_with_retries(item: ItemSpec, storage: Storage, settings, spool_folder: Path) -> bytes | Path:
    """The item's bytes (or a local file past the settings' spool size), within the settings' size cap; a
    transient read failure is tried ITEM_TRIES times with backoff (0.5 s, 1 s). Only reads: a decode or render
    that timed out is tried again on the next run, not three times in this one."""
    for tries in range(1, ITEM_TRIES + 1):
        try:
            return read_item(item.locator, storage, max_bytes=getattr(settings, "max_item_bytes", None),
                             spool_bytes=getattr(settings, "spool_bytes", None), spool_folder=spool_folder)
        except Exception as exc:
            if failure_kind(exc) == "permanent" or tries == ITEM_TRIES:
                raise
            time.sleep(0.5 * tries)
    raise AssertionError("unreachable")


def _record_row(item: ItemSpec, identity: str, status: str, stage: str | None, error: str | None, attempts: int,
                first_sample: int | None, samples: int, begin: int | None, end: int | None) -> dict:
    return {"key": item.key, "source": item.source, "locator": item.locator, "identity": identity,
            "status": status, "stage": stage, "error": error, "attempts": attempts, "first_sample": first_sample,
            "samples": samples, "begin": begin, "end": end, "limits": None}


def _staging_parent(output: str) -> Path | None:
    """Where a part's tar is written before its commit: beside the output when it is local (the commit is then
    a rename, not a second copy), the system's temp folder otherwise."""
    if is_s3(output):
        return None
    parent = local_path(join(output, "_staging"))
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _manifest_row(sample: ShardSample, meta: dict, split: str) -> dict:
    return {
        "key": sample.key, "split": split, "shard": None, "source": meta["source"],
        "caption": meta["caption"],
        "original_width": meta.get("original_width", meta.get("source_width")),
        "original_height": meta.get("original_height", meta.get("source_height")),
        "width": meta["width"], "height": meta["height"], "sha256": meta["sha256"],
        "bytes": sum(len(b) for b in sample.files.values()),
        "source_key": meta.get("source_key"), "start_seconds": meta.get("start_seconds"),
        "end_seconds": meta.get("end_seconds"), "fps": meta.get("fps"), "frames": meta.get("frames"),
        "views": meta.get("views"), "voxels": meta.get("voxels"), "flags": meta.get("flags"),
        "license": meta.get("license"),
    }


# -- tar files --------------------------------------------------------------------------------------------------
# Written and scanned here rather than with tarfile (or webdataset's TarWriter, which wraps it): tarfile's
# header code costs 0.15-0.25 ms per member in Python (profiled: more than making a 28-px sample, and a
# shard is written, re-read, copied and re-read again), and importing webdataset imports torch (~2 s per
# worker start). A ustar header is one fixed 512-byte block (POSIX.1-1988); tarfile and webdataset read
# these files back in the tests. Headers are fixed (mtime 0, mode 0444, owner "bigdata" as webdataset
# writes), so the same samples always give the same bytes.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_RECORD = 20 * _BLOCK  # tar's record size: the archive is padded to a whole record, as tar(1) and tarfile do


def _header_template() -> bytearray:
    header = bytearray(_BLOCK)
    header[100:124] = b"0000444\x000000000\x000000000\x00"  # mode, uid, gid
    header[136:148] = b"00000000000\x00"  # mtime
    header[148:156] = b" " * 8  # the checksum counts itself as spaces
    header[156:157] = b"0"  # a regular file
    header[257:265] = b"ustar\x0000"
    header[265:272] = header[297:304] = b"bigdata"
    return header


_HEADER_TEMPLATE = _header_template()
_HEADER_TEMPLATE_SUM = sum(_HEADER_TEMPLATE)


def tar_header(name: str, size: int) -> bytes:
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes (a shorter item key is needed)")
    size_field = b"%011o\x00" % size
    header = bytearray(_HEADER_TEMPLATE)
    header[0:len(encoded)] = encoded
    header[124:136] = size_field
    # The template is zero where name and size go, so the checksum is its sum plus theirs.
    header[148:156] = b"%06o\x00 " % (_HEADER_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return bytes(header)


class TarSink:
    """A tar file written member by member, or by copying byte ranges of other such tars (whole samples)."""

    def __init__(self, path):
        # A large buffer: samples of a few KB would otherwise cost a write(2) each.
        self.file = open(path, "wb", buffering=1 << 20)

    def add(self, name: str, data: bytes) -> None:
        self.file.write(tar_header(name, len(data)))
        self.file.write(data)
        self.file.write(_ZERO_BLOCK[:-len(data) % _BLOCK])

    def tell(self) -> int:
        return self.file.tell()

    def copy_from(self, storage: Storage, uri: str, begin: int, end: int, chunk: int = 1 << 26) -> None:
        """Bytes [begin, end) of another such tar in storage: ranged reads of at most `chunk` bytes (64 MiB), so
        a large run is never held whole; a short read raises (Storage.read_range), it is never written."""
        if not is_s3(uri):
            try:
                with open(local_path(uri), "rb") as source:
                    source.seek(begin)
                    while begin < end:
                        data = source.read(min(chunk, end - begin))
                        if not data:
                            raise StorageError(f"{uri}: ends before byte {end}")
                        self.file.write(data)
                        begin += len(data)
            except OSError as exc:
                raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc
            return
        while begin < end:
            length = min(chunk, end - begin)
            self.file.write(storage.read_range(uri, begin, length))
            begin += length

    def __enter__(self) -> TarSink:
        return self

    def __exit__(self, *exc) -> None:
        written = self.file.tell() + 2 * _BLOCK  # two zero blocks end the archive
        self.file.write(bytes(2 * _BLOCK + (-written % _RECORD)))
        self.file.close()


def scan_tar(source: BinaryIO) -> list[tuple[str, int, int]]:
    """(name, header offset, size) of every member, from the headers alone; checksums checked."""
    members = []
    offset = 0
    source.seek(0)
    while True:
        header = source.read(_BLOCK)
        if len(header) < _BLOCK:
            raise RuntimeError(f"{getattr(source, 'name', 'tar')}: truncated at byte {offset}")
        if header == _ZERO_BLOCK:
            return members
        stored = int(header[148:156].strip(b" \x00") or b"0", 8)
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:  # the checksum field counts as 8 spaces
            raise RuntimeError(f"{getattr(source, 'name', 'tar')}: bad header checksum at byte {offset}")
        size = int(header[124:136].strip(b" \x00") or b"0", 8)
        members.append((header[:100].split(b"\x00", 1)[0].decode(), offset, size))
        padded = size + (-size % _BLOCK)
        offset += _BLOCK + padded
        # Small members are read past (the buffer already holds them); a seek would drop the buffer.
        if padded <= 1 << 16:
            source.read(padded)
        else:
            source.seek(offset)


def _add_sample(sink: TarSink, key: str, files: dict[str, bytes]) -> None:
    for extension in sorted(files):  # the member order webdataset writes
        sink.add(f"{key}.{extension}", files[extension])


def _verify_tar(path, expected_keys: list[str], expected_media_bytes: int) -> None:
    """Re-read the tar's headers before commit: every sample once, in order, with its metadata and all its
    media bytes. Headers only: decoding every sample again would cost as much as making it."""
    with open(path, "rb") as handle:
        members = scan_tar(handle)
    keys = [name.rsplit(".", 1)[0] for name, _, _ in members if name.endswith(".json")]
    media_bytes = sum(size for name, _, size in members if not name.endswith(".json"))
    if keys != expected_keys or media_bytes != expected_media_bytes:
        raise RuntimeError(f"shard {path.name} failed verification: {len(keys)} of {len(expected_keys)} samples, "
                           f"{media_bytes} of {expected_media_bytes} media bytes")


def _parquet_table(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
