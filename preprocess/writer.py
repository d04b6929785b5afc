"""Shards in two steps, each committed the same way: write the tar, re-read it, then write its manifest.

1. `write_shard`: a planned group of items (images, videos, 3D assets) → one tar of their samples. A
   job writes these as *parts* (a staging area), because a group's sample count is only known after
   the work: items fail, a video gives a variable number of clips.
2. `repack_shard`: consecutive samples of the committed parts → one final shard of exactly
   `samples_per_shard` samples (only a split's last shard may hold fewer), so shards split evenly
   over loader workers. The tar members are copied, never decoded again.

The manifest is written last and is the commit marker: a tar with a manifest is done and a rerun skips
it; one without is rebuilt from scratch, so a kill at any point loses nothing and duplicates nothing.
A done part with failed items is rebuilt on a rerun (up to MAX_ATTEMPTS), so an item that failed for a
passing reason (a timeout, a file still being copied) lands the next time; a final shard is skipped only
if its manifest equals the one planned from the parts, so the shards after a newly landed item are
rebuilt. Tars are written with fixed headers (mtime 0), and neither a sample nor its manifest row holds a
fact of the run that made it (seconds, absolute paths: `ShardSample.measured` carries those to the stats), so
the same inputs give the same shard bytes on every run, wherever the output lives.
Plain functions: preprocess/job.py maps them over Ray.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from atoken.pipeline.storage import LocalStaging, Storage, StorageError, is_s3, join, local_path
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
    # (preprocess/voxels.py FLAGS), the asset's licence where its source has one
    ("views", pa.int32()), ("voxels", pa.int32()), ("flags", pa.list_(pa.string())), ("license", pa.string()),
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

    def __reduce__(self):
        # Items travel to Ray workers as plain tuples: Ray's cloudpickle runs a Python hook for every object
        # that is not a plain str/tuple/list, which made pickling the plans most of the driver's CPU time.
        items = [(i.key, i.source, i.locator, i.caption) for i in self.items]
        return _shard_plan, (self.name, self.split, items)


def _shard_plan(name: str, split: str, items: list[tuple[str, str, str, str]]) -> ShardPlan:
    return ShardPlan(name, split, [ItemSpec(*item) for item in items])


@dataclass
class RepackPlan:
    name: str  # the final shard, e.g. "train-000003"
    split: str
    pieces: list[tuple[str, int, int]]  # (part name, first sample, end sample), in stream order
    manifest: pa.Table  # the rows the shard will hold, `shard` already set to `name`
    whole_part: bool = False  # the shard is exactly one part's samples: a copy of its tar

    def __reduce__(self):
        return _with_manifest, (RepackPlan, {**self.__dict__, "manifest": _ipc_bytes(self.manifest)})


@dataclass
class ShardResult:
    name: str
    samples: int
    errors: int
    bytes: int
    seconds: float
    skipped: bool = False
    error_rows: list[dict] = field(default_factory=list)
    manifest: pa.Table | None = None  # a part's committed rows, so the job plans shards without reading them back
    measured: dict[str, float] = field(default_factory=dict)  # its samples' `ShardSample.measured`, summed

    def __reduce__(self):
        return _with_manifest, (ShardResult, {**self.__dict__, "manifest": _ipc_bytes(self.manifest)})


# Manifests cross between the driver and Ray workers as one Arrow IPC buffer: Ray's own Arrow serialisation
# copies every column's buffers in Python, a few ms a table, which a job pays twice per shard.
def _ipc_bytes(table: pa.Table | None) -> bytes | None:
    if table is None:
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _with_manifest(kind: type, fields: dict):
    data = fields["manifest"]
    return kind(**{**fields, "manifest": None if data is None else pa.ipc.open_stream(data).read_all()})


@dataclass(frozen=True)
class ShardSample:
    key: str
    files: dict[str, bytes]  # extension → bytes, e.g. {"png": ...} or {"mp4": ...}
    meta: dict
    # What making it measured (seconds, views rendered, renders reused): facts of this run, not of the sample,
    # so they stay out of its bytes and its manifest row (the same inputs give the same shards on every run and
    # wherever the output lives) and reach the job's stats through ShardResult.measured.
    measured: dict[str, float] = field(default_factory=dict)


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
        table = _read_manifest(storage, manifest_uri(output, plan.name))
        errors = pq.read_table(io.BytesIO(storage.read_bytes(errors_uri(output, plan.name))))
        attempt = max(errors.column("attempts").to_pylist(), default=0) + 1
        if errors.num_rows == 0 or attempt > MAX_ATTEMPTS:
            return ShardResult(plan.name, table.num_rows, errors.num_rows,
                               int(sum(table.column("bytes").to_pylist())), 0.0, skipped=True,
                               error_rows=errors.to_pylist(), manifest=table)
        # Uncommit first: a kill during the rebuild then leaves a shard without manifest, rebuilt next time.
        storage.delete(manifest_uri(output, plan.name))

    rows: list[dict] = []
    error_rows: list[dict] = []
    measured: dict[str, float] = {}
    with storage.staged_file(shard_uri(output, plan.name)) as tar_path:
        with TarSink(tar_path) as sink:
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
                    _add_sample(sink, sample.key, {**sample.files, "json": json.dumps(meta).encode()})
                    rows.append(_manifest_row(sample, meta, plan))
                    for name, value in sample.measured.items():
                        measured[name] = measured.get(name, 0) + value
        _verify_tar(tar_path, [row["key"] for row in rows], sum(row["bytes"] for row in rows))
    # The manifest's measure (bytes of the samples' media), so a skipped shard reports the same number.
    size = sum(row["bytes"] for row in rows)
    manifest = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    storage.write_bytes(errors_uri(output, plan.name), _parquet(error_rows, ERRORS_SCHEMA))
    storage.write_bytes(manifest_uri(output, plan.name), _parquet_table(manifest))
    return ShardResult(plan.name, len(rows), len(error_rows), size, time.perf_counter() - started,
                       error_rows=error_rows, manifest=manifest, measured=measured)


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
        "license": meta.get("license"),
    }


def repack_shard(plan: RepackPlan, storage: Storage, output: str, parts_output: str) -> ShardResult:
    """Copy the planned slices of committed parts into one final shard; skip it if already committed as planned."""
    started = time.perf_counter()
    size = int(sum(plan.manifest.column("bytes").to_pylist()))
    if storage.exists(manifest_uri(output, plan.name)):
        committed = _read_manifest(storage, manifest_uri(output, plan.name))
        if committed.equals(plan.manifest):
            return ShardResult(plan.name, plan.manifest.num_rows, 0, size, 0.0, skipped=True)
        # Planned differently (a retried item landed before it): uncommit first, as write_shard does.
        storage.delete(manifest_uri(output, plan.name))
    if plan.whole_part:
        _copy_whole_part(plan, storage, output, parts_output)
    else:
        _copy_ranges(plan, storage, output, parts_output, size)
    storage.write_bytes(manifest_uri(output, plan.name), _parquet_table(plan.manifest))
    return ShardResult(plan.name, plan.manifest.num_rows, 0, size, time.perf_counter() - started)


def _copy_whole_part(plan: RepackPlan, storage: Storage, output: str, parts_output: str) -> None:
    """The common case (no item failed, one sample per item): the shard is its part's tar, byte for byte,
    so the store copies it (a hard link locally, server-side on S3) instead of this process. Those bytes
    were verified when the part was committed; the copy is checked to be whole."""
    part_uri = shard_uri(parts_output, plan.pieces[0][0])
    target = shard_uri(output, plan.name)
    try:
        expected = storage.size(part_uri)
    except StorageError as exc:
        raise _part_gone(part_uri, plan.name) from exc
    storage.copy(part_uri, target)
    if storage.size(target) != expected:
        storage.delete(target)
        raise RuntimeError(f"shard {plan.name} failed verification: its copy is not {expected} bytes")


def _copy_ranges(plan: RepackPlan, storage: Storage, output: str, parts_output: str, size: int) -> None:
    with LocalStaging() as staging, storage.staged_file(shard_uri(output, plan.name)) as tar_path:
        with TarSink(tar_path) as sink:
            for part, start, end in plan.pieces:
                with _open_part(storage, shard_uri(parts_output, part), staging, plan.name) as source:
                    # A sample's members are contiguous, and so are consecutive samples: one byte range per piece.
                    spans = sample_spans(source)
                    if len(spans) < end:
                        raise RuntimeError(f"part {part} holds {len(spans)} samples, its manifest more than {end}")
                    sink.copy_range(source, spans[start][1], spans[end - 1][2])
        _verify_tar(tar_path, plan.manifest.column("key").to_pylist(), size)


def _open_part(storage: Storage, uri: str, staging, shard: str) -> BinaryIO:
    if not is_s3(uri):
        try:
            return open(local_path(uri), "rb")
        except OSError as exc:
            raise _part_gone(uri, shard) from exc
    try:
        return open(storage.download(uri, staging / "part.tar"), "rb")
    except StorageError as exc:
        raise _part_gone(uri, shard) from exc


def _part_gone(uri: str, shard: str) -> StorageError:
    parts = uri.rsplit("/shards/", 1)[0]
    return StorageError(f"part {uri} is gone, so shard {shard} cannot be rebuilt; delete {parts} and rerun to "
                        "rebuild every part")


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
    """A tar file written member by member, or by copying byte ranges of other such tars."""

    def __init__(self, path):
        # A large buffer: samples of a few KB would otherwise cost a write(2) each.
        self.file = open(path, "wb", buffering=1 << 20)

    def add(self, name: str, data: bytes) -> None:
        self.file.write(tar_header(name, len(data)))
        self.file.write(data)
        self.file.write(_ZERO_BLOCK[:-len(data) % _BLOCK])

    def copy_range(self, source: BinaryIO, begin: int, end: int, chunk: int = 1 << 22) -> None:
        source.seek(begin)
        while begin < end:
            data = source.read(min(chunk, end - begin))
            if not data:
                raise RuntimeError(f"{source.name}: ends before byte {end}")
            self.file.write(data)
            begin += len(data)

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


def sample_spans(source: BinaryIO) -> list[tuple[str, int, int]]:
    """(key, first byte, end byte) of every sample: consecutive members sharing a key, as WebDataset groups."""
    spans: list[tuple[str, int, int]] = []
    for name, offset, size in scan_tar(source):
        key = name.split(".", 1)[0]
        end = offset + _BLOCK + size + (-size % _BLOCK)
        if spans and spans[-1][0] == key:
            spans[-1] = (key, spans[-1][1], end)
        else:
            spans.append((key, offset, end))
    return spans


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


def _read_manifest(storage: Storage, uri: str) -> pa.Table:
    # Parquet names a list's item "element" where pyarrow says "item": cast back, so a manifest read from
    # storage equals (and writes the same bytes as) one made in memory.
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).cast(MANIFEST_SCHEMA)


def _parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    return _parquet_table(pa.Table.from_pylist(rows, schema=schema))


def _parquet_table(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
