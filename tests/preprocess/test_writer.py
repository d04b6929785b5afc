"""preprocess/writer.py and preprocess/plan.py: a part committed once, bad items recorded, unchanged samples
reused byte for byte, and an item's split and part a function of its key alone."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from atoken.pipeline.config import StorageSection
from atoken.pipeline.storage import Storage
from atoken.preprocess.plan import PartPlan, Planner, part_bits, part_name
from atoken.preprocess.sources import ItemSpec, list_folder, safe_key
from atoken.preprocess.writer import (
    ImageSettings,
    PartRecord,
    manifest_uri,
    record_uri,
    shard_uri,
    write_part,
)

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"
PHOTOS = ["astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "camera.png"]
SETTINGS = ImageSettings(resolution=16, max_pixels=89_478_485)


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """Five real photos, and three files that only look like images."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copyfile(SKIMAGE_DATA / name, folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(2000))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo, despite the suffix\n")
    return folder


BAD = {"corrupt", "empty", "notes"}


def stem_of(key: str) -> str:
    return key.removeprefix("file_").rsplit("_", 1)[0]


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def read_parquet(storage: Storage, uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


PART = "train-000000-of-000001"


def write(items, storage, output, previous=(PART,), name=PART, split="train"):
    return write_part(PartPlan(name, split, items), storage, output, SETTINGS, list(previous))


def test_write_part_commits_good_items_once_and_records_bad_ones(photo_folder, tmp_path):
    items = list(list_folder(str(photo_folder)))
    assert len(items) == 8
    storage, output = Storage(), str(tmp_path / "out")

    result = write(items, storage, output)

    assert (result.name, result.samples, result.errors, result.skipped, result.made) == (PART, 5, 3, False, 8)
    assert result.shard.startswith(PART + "-") and result.permanent == 3
    record = PartRecord.read(storage, record_uri(output, PART))
    assert record.shard == result.shard and record.table.num_rows == 8, "one row per planned item"
    assert [r["key"] for r in record.table.to_pylist()] == [i.key for i in items], "plan order"
    errors = result.error_rows
    assert {stem_of(row["key"]) for row in errors} == BAD
    for row in errors:
        assert row["stage"] == "decode" and row["source"] == f"folder:{photo_folder}" and row["kind"] == "permanent"
        assert Path(row["locator"]).parent == photo_folder
    by_stem = {stem_of(row["key"]): row["error"] for row in errors}
    assert by_stem["empty"] == "ItemError: empty file"
    assert "cannot decode image" in by_stem["corrupt"] and "cannot decode image" in by_stem["notes"]

    data = storage.read_bytes(shard_uri(output, result.shard))
    members = tar_members(data)
    good_keys = [item.key for item in items if stem_of(item.key) not in BAD]
    png_keys = [name.removesuffix(".png") for name in members if name.endswith(".png")]
    assert png_keys == good_keys
    assert list(members) == [f"{k}.{e}" for k in good_keys for e in ("json", "png")]
    manifest = read_parquet(storage, manifest_uri(output, result.shard))
    assert [row["key"] for row in manifest] == png_keys, "manifest rows in shard order"
    for row, record_row in zip(manifest, [r for r in record.table.to_pylist() if r["status"] == "ok"], strict=True):
        png = members[f"{row['key']}.png"]
        meta = json.loads(members[f"{row['key']}.json"])
        assert row["split"] == "train" and row["shard"] == result.shard
        assert row["sha256"] == hashlib.sha256(png).hexdigest() == meta["sha256"]
        assert row["bytes"] == len(png) and (row["width"], row["height"]) == (16, 16)
        assert (meta["split"], meta["key"]) == ("train", row["key"])
        # The record's byte range is exactly the sample's two members.
        assert tar_members(data[record_row["begin"]:record_row["end"]] + bytes(1024)) == {
            f"{row['key']}.json": members[f"{row['key']}.json"], f"{row['key']}.png": png}
    astronaut = next(row for row in manifest if stem_of(row["key"]) == "astronaut")
    assert (astronaut["original_width"], astronaut["original_height"]) == (512, 512)


def test_a_missing_file_fails_at_the_read_stage_and_is_permanent(tmp_path):
    good = ItemSpec("good", "test", str(SKIMAGE_DATA / "astronaut.png"))
    gone = ItemSpec("gone", "test", str(tmp_path / "deleted.jpg"))

    result = write([gone, good], Storage(), str(tmp_path / "o"), name="val-000000-of-000001", split="val",
                   previous=["val-000000-of-000001"])

    assert result.samples == 1 and result.errors == 1 and result.retryable == 0
    row = result.error_rows[0]
    assert row["key"] == "gone" and row["stage"] == "read" and row["kind"] == "permanent"
    assert "No such file" in row["error"]


def test_a_committed_part_is_skipped_without_reading_or_rewriting_anything(photo_folder, tmp_path):
    storage, output = Storage(), str(tmp_path / "out")
    items = list(list_folder(str(photo_folder)))
    first = write(items, storage, output)
    files = sorted(Path(output).rglob("*"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files if p.is_file()}

    second = write(items, storage, output)

    assert second.skipped and not first.skipped and second.made == 0
    assert (second.samples, second.errors, second.bytes, second.shard) == (first.samples, first.errors, first.bytes,
                                                                           first.shard)
    assert second.error_rows == first.error_rows, "permanent failures are not tried again"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files if p.is_file()} == before


@pytest.mark.parametrize("leftover", ["complete tar", "garbage tar"])
def test_a_shard_committed_without_its_record_is_rebuilt_to_the_same_bytes(photo_folder, tmp_path, leftover):
    storage, output = Storage(), str(tmp_path / "out")
    items = list(list_folder(str(photo_folder)))
    first = write(items, storage, output)
    tar_path = Path(shard_uri(output, first.shard))
    first_tar = tar_path.read_bytes()
    first_manifest = read_parquet(storage, manifest_uri(output, first.shard))
    # A kill after the tar and manifest commits and before the record's; or in the middle of a non-atomic copy.
    Path(record_uri(output, PART)).unlink()
    if leftover == "garbage tar":
        tar_path.write_bytes(first_tar[:1000])

    rebuilt = write(items, storage, output)

    assert not rebuilt.skipped and rebuilt.made == 8 and rebuilt.shard == first.shard
    assert tar_path.read_bytes() == first_tar, "same items, same bytes"
    assert read_parquet(storage, manifest_uri(output, first.shard)) == first_manifest
    assert not list(Path(output).rglob("*.tmp-*"))


@pytest.fixture(params=["local", "s3"])
def any_storage(request, tmp_path):
    if request.param == "local":
        return Storage(), str(tmp_path / "out")
    endpoint = request.getfixturevalue("s3_endpoint")
    request.getfixturevalue("s3_credentials")
    storage = Storage(StorageSection(endpoint_url=endpoint))
    bucket = f"reuse-{os.urandom(4).hex()}"
    storage.client.create_bucket(Bucket=bucket)
    return storage, f"s3://{bucket}/out"


def test_a_changed_part_copies_its_unchanged_samples_byte_for_byte_and_makes_only_the_new(photo_folder, tmp_path,
                                                                                        any_storage):
    storage, output = any_storage
    items = sorted(list_folder(str(photo_folder)), key=lambda i: i.key)
    good = [i for i in items if stem_of(i.key) not in BAD]
    write(good[:2] + good[3:], storage, output)  # the rocket is new next time

    second = write(good, storage, output)

    assert (second.made, second.reused, second.samples) == (1, 4, 5)
    fresh_output = str(tmp_path / "fresh")
    fresh = write(good, Storage(), fresh_output)
    assert second.shard == fresh.shard
    assert storage.read_bytes(shard_uri(output, second.shard)) == Path(shard_uri(fresh_output, fresh.shard)
                                                                        ).read_bytes()
    assert read_parquet(storage, manifest_uri(output, second.shard)) == read_parquet(
        Storage(), manifest_uri(fresh_output, fresh.shard))
    assert storage.read_bytes(record_uri(output, PART)) == Path(record_uri(fresh_output, PART)).read_bytes()
    # The shard it replaced stays until the job commits its new manifest.parquet (preprocess/job.py), so a reader
    # of the previous manifest finds every shard it lists during the rerun.
    assert len([u for u in storage.list(output) if "/shards/" in u]) == 2


class _ShardReads:
    """What a test's storage and the writer's own file opens read of any shard: whole reads (read_bytes,
    open_read, local_copy, download) and byte-range reads with their lengths."""

    def __init__(self, monkeypatch, storage: Storage):
        import builtins

        from atoken.preprocess import writer

        self.whole: list[str] = []
        self.ranges: list[int] = []
        def whole_read(call):
            def whole(uri, *args, **kwargs):
                if "/shards/" in str(uri):
                    self.whole.append(str(uri))
                return call(uri, *args, **kwargs)
            return whole

        for name in ("read_bytes", "open_read", "local_copy", "download"):
            monkeypatch.setattr(storage, name, whole_read(getattr(storage, name)))

        def ranged(uri, start, length, _call=storage.read_range):
            if "/shards/" in str(uri):
                self.ranges.append(length)
            return _call(uri, start, length)
        monkeypatch.setattr(storage, "read_range", ranged)
        reads = self

        class Counted:  # a local shard the writer opens itself (TarSink.copy_from): each read() is one range read
            def __init__(self, file):
                self.file = file

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

            def seek(self, *args):
                return self.file.seek(*args)

            def read(self, size=-1):
                data = self.file.read(size)
                reads.ranges.append(len(data))
                return data

        def opened(path, mode="r", *args, **kwargs):
            file = builtins.open(path, mode, *args, **kwargs)
            return Counted(file) if "/shards/" in str(path) and "r" in mode else file
        monkeypatch.setattr(writer, "open", opened, raising=False)


def test_reuse_copies_each_contiguous_run_of_the_old_shard_in_one_range_read(photo_folder, any_storage,
                                                                            monkeypatch):
    """A changed part copies its kept samples from the old shard by byte range: one read per contiguous run of
    kept samples (not one per sample), never the old shard whole."""
    storage, output = any_storage
    items = sorted(list_folder(str(photo_folder)), key=lambda i: i.key)
    good = [i for i in items if stem_of(i.key) not in BAD]
    first = write(good, storage, output)
    old_size = len(storage.read_bytes(shard_uri(output, first.shard)))
    reads = _ShardReads(monkeypatch, storage)

    second = write(good[:2] + good[3:], storage, output)  # the middle one gone: two runs, [0, 1] and [3, 4]

    assert (second.made, second.reused) == (0, 4)
    assert reads.whole == [], "the old shard was read whole"
    assert len(reads.ranges) == 2, f"{len(reads.ranges)} range reads for 2 runs of 4 samples"
    kept = sum(r["end"] - r["begin"] for r in PartRecord.read(storage, record_uri(output, PART)).table.to_pylist())
    assert sum(reads.ranges) == kept < old_size


def test_samples_move_between_parts_when_the_part_count_changes_without_being_made_again(photo_folder, tmp_path):
    storage, output = Storage(), str(tmp_path / "out")
    items = sorted(list_folder(str(photo_folder)), key=lambda i: i.key)
    write(items, storage, output)
    halves = [[i for i in items if (int(i.key.rsplit("_", 1)[1], 16) % 2) == h] for h in (0, 1)]

    results = [write(half, storage, output, name=part_name("train", 1, index), previous=[part_name("train", 1, index),
                                                                                       PART])
               for index, half in enumerate(halves)]

    assert [r.made for r in results] == [0, 0], "every sample (and every settled failure) came from the old part"
    assert sum(r.samples for r in results) == 5 and sum(r.errors for r in results) == 3


# -- preprocess/plan.py ---------------------------------------------------------------------------------------


def synthetic_items(count: int, start: int = 0, source: str = "s") -> list[ItemSpec]:
    return [ItemSpec(f"item_{i:07d}", source, f"/data/{i}.png") for i in range(start, start + count)]


def plan_of(items, per_part: int = 8, val_every: int = 5, chunk_items: int = 262_144, previous=None):
    planner = Planner(val_every, per_part, chunk_items=chunk_items)
    planner.add(items)
    try:
        planner.check_unique()
        bits = planner.bits(previous)
        return {p.name: [i.key for i in p.items] for p in planner.parts(bits)}, bits
    finally:
        planner.close()


def test_an_items_split_and_part_follow_from_its_key_alone():
    items = synthetic_items(1000)
    parts, bits = plan_of(items)
    assert bits == {"train": 7, "val": 5}, "about 800 train and 200 val items, at most 8 a part on average"
    keys = [k for names in parts.values() for k in names]
    assert sorted(keys) == sorted(i.key for i in items), "every item once"
    val = [k for name, names in parts.items() if name.startswith("val") for k in names]
    assert 150 < len(val) < 250, "one in val_every, by hash"

    # The same plan from shuffled input, from tiny spill chunks, and with 100 more items (the parts of the old
    # items keep them: an addition touches only the parts the new items hash into).
    shuffled, _ = plan_of(list(reversed(items)), chunk_items=37)
    assert shuffled == parts
    grown, _ = plan_of(items + synthetic_items(50, start=5000), previous=bits)
    changed = [name for name in parts if grown[name] != parts[name]]
    assert all(set(parts[name]) <= set(grown[name]) for name in parts)
    assert 0 < len(changed) <= 50 < len(parts)
    # Negative control: a positional plan (the old one) would have moved almost every item.
    assert sum(grown[name] == parts[name] for name in parts) > len(parts) - 50


def test_pinned_splits_are_kept_and_a_key_listed_twice_is_refused():
    pinned = [ItemSpec(f"held_{i}", "h", "/x", split="val") for i in range(20)]
    parts, _ = plan_of(synthetic_items(30) + pinned)
    assert all(k.startswith("held_") is False for name, keys in parts.items() if name.startswith("train")
               for k in keys)
    with pytest.raises(ValueError, match="item_0000003' is listed twice"):
        plan_of(synthetic_items(10) + synthetic_items(1, start=3))


def test_the_part_count_keeps_its_value_within_the_hysteresis_band():
    assert part_bits(1000, 8) == 7 and part_bits(9, 8) == 1 and part_bits(0, 8) == 0
    assert part_bits(1500, 8, previous_bits=7) == 7, "up to 2x per part: kept"
    assert part_bits(2100, 8, previous_bits=7) == 9, "past 2x: re-cut"
    assert part_bits(300, 8, previous_bits=7) == 7 and part_bits(200, 8, previous_bits=7) == 5


def test_folder_keys_are_stable_dot_free_and_qualified_by_their_source(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i:02d}.png").write_bytes(b"x")  # listing never decodes
    (folder / "sub").mkdir()
    (folder / "sub" / "a.b c.JPG").write_bytes(b"x")
    (folder / "readme.txt").write_text("not listed")
    keys = [item.key for item in list_folder(str(folder))]
    assert keys == [item.key for item in list_folder(str(folder))]
    assert len(keys) == 4 and all("." not in key for key in keys)
    shutil.copytree(folder, tmp_path / "copy")
    assert not set(keys) & {item.key for item in list_folder(str(tmp_path / "copy"))}
    first = next(iter(list_folder(str(folder))))
    assert first.fingerprint == f"1:{(folder / 'img00.png').stat().st_mtime_ns}", "size and mtime"


@pytest.mark.parametrize("key", ["/etc/cron_d/evil", "../x", "a\x00b", "k" * 200, "with.dot", "é"])
def test_unsafe_keys_become_safe_and_distinct(key):
    safe = safe_key(key)
    assert safe != key and 1 <= len(safe) <= 80 and all(c.isalnum() or c in "_-" for c in safe)
    assert safe_key(key + "!") != safe
    assert safe_key("fine_key-1") == "fine_key-1"


# -- the tar format ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), [("a.png", 0), ("file_coffee_0123456789.json", 12345), ("k.mp4", 10**9)])
def test_tar_headers_are_the_ones_tarfile_writes(name, size):
    from atoken.preprocess.writer import tar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
    assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        tar_header("k" * 101, 1)


def test_tar_sink_is_read_back_by_tarfile_and_webdataset_and_copies_byte_ranges(tmp_path):
    import webdataset as wds

    from atoken.preprocess.writer import TarSink, scan_tar

    samples = {f"s{i}": {"json": b'{"i": %d}' % i, "png": bytes(range(i * 37 % 256)) * (i + 1)} for i in range(6)}
    with TarSink(tmp_path / "a.tar") as sink:
        for key, files in samples.items():
            for extension in sorted(files):
                sink.add(f"{key}.{extension}", files[extension])
    assert (tmp_path / "a.tar").stat().st_size % 10240 == 0
    read = {s["__key__"]: {"json": s["json"], "png": s["png"]} for s in wds.WebDataset(str(tmp_path / "a.tar"),
                                                                                         shardshuffle=False)}
    assert read == samples
    with open(tmp_path / "a.tar", "rb") as source:
        members = scan_tar(source)  # (name, header offset, size), two members a sample
    spans = [(name.split(".")[0], offset, members[i + 1][1] + 512 + -(-members[i + 1][2] // 512) * 512)
             for i, (name, offset, _) in enumerate(members) if i % 2 == 0]
    assert [key for key, _, _ in spans] == list(samples)
    with TarSink(tmp_path / "b.tar") as sink:
        sink.copy_from(Storage(), str(tmp_path / "a.tar"), spans[2][1], spans[4][2], chunk=1000)  # samples 2-4
    assert list(tar_members((tmp_path / "b.tar").read_bytes())) == [f"s{i}.{e}" for i in (2, 3, 4) for e in ("json",
                                                                                                           "png")]
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[spans[1][1] + 10] ^= 1  # one flipped bit in a header
    with pytest.raises(RuntimeError, match="bad header checksum"):
        scan_tar(io.BytesIO(bytes(data)))
    with pytest.raises(RuntimeError, match="truncated"):
        scan_tar(io.BytesIO((tmp_path / "a.tar").read_bytes()[:spans[3][1] + 100]))


def test_native_jpeg_training_shards_keep_a_lossless_png_validation_copy(photo_folder, tmp_path):
    """encoding: jpg writes the train split's samples as .jpg, the val split's as .png (lossless for the
    evaluation), both at native aspect with their sizes in the sample JSON and the manifest."""
    items = [i for i in list_folder(str(photo_folder)) if stem_of(i.key) not in BAD]
    storage, output = Storage(), str(tmp_path / "out")
    settings = ImageSettings(resolution=None, max_pixels=89_478_485, max_resolution=128, encoding="jpg", quality=90)
    val = "val-000000-of-000001"
    for split, name, extension in (("train", PART, "jpg"), ("val", val, "png")):
        result = write_part(PartPlan(name, split, items), storage, output, settings, [name])
        members = tar_members(storage.read_bytes(shard_uri(output, result.shard)))
        assert {n.rsplit(".", 1)[1] for n in members} == {"json", extension}, split
        manifest = {row["key"]: row for row in read_parquet(storage, manifest_uri(output, result.shard))}
        for key, row in manifest.items():
            image = Image.open(io.BytesIO(members[f"{key}.{extension}"]))
            meta = json.loads(members[f"{key}.json"])
            assert image.format == {"jpg": "JPEG", "png": "PNG"}[extension]
            assert image.size == (row["width"], row["height"]) == (meta["width"], meta["height"])
            assert max(image.size) == min(128, max(row["original_width"], row["original_height"]))
            ratio = row["original_width"] / row["original_height"]
            assert abs(image.width / image.height - ratio) < ratio / min(image.size), "aspect within rounding"
        chelsea = next(row for key, row in manifest.items() if stem_of(key) == "chelsea")
        assert (chelsea["original_width"], chelsea["original_height"], chelsea["width"], chelsea["height"]) == \
            (451, 300, 128, 85)
