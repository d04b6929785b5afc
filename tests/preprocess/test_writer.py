"""preprocess/writer.py and the planning half of preprocess/job.py: shards committed once, bad items recorded."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from atoken.pipeline.config import IngestSection, SourceSection
from atoken.pipeline.storage import Storage
from atoken.preprocess.job import list_items, plan_image_shards
from atoken.preprocess.sources import ItemSpec, list_folder
from atoken.preprocess.writer import (
    ImageSettings,
    ShardPlan,
    errors_uri,
    manifest_uri,
    shard_uri,
    write_shard,
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


def test_write_shard_commits_good_items_once_and_records_bad_ones(photo_folder, tmp_path):
    items = list_folder(str(photo_folder))
    assert len(items) == 8
    storage, output = Storage(), str(tmp_path / "out")
    plan = ShardPlan("train-000000", "train", items)

    result = write_shard(plan, storage, output, SETTINGS)

    assert (result.name, result.samples, result.errors, result.skipped) == ("train-000000", 5, 3, False)
    errors = read_parquet(storage, errors_uri(output, plan.name))
    assert errors == result.error_rows
    assert {stem_of(row["key"]) for row in errors} == BAD
    for row in errors:
        assert row["stage"] == "decode" and row["source"] == f"folder:{photo_folder}"
        assert Path(row["locator"]).parent == photo_folder
    by_stem = {stem_of(row["key"]): row["error"] for row in errors}
    assert by_stem["empty"] == "empty file"
    assert by_stem["corrupt"].startswith("cannot decode image")
    assert by_stem["notes"].startswith("cannot decode image")

    members = tar_members(storage.read_bytes(shard_uri(output, plan.name)))
    good_keys = [item.key for item in items if stem_of(item.key) not in BAD]
    png_keys = [name.removesuffix(".png") for name in members if name.endswith(".png")]
    assert sorted(png_keys) == sorted(good_keys) and len(png_keys) == len(set(png_keys))
    assert sorted(members) == sorted([f"{k}.png" for k in good_keys] + [f"{k}.json" for k in good_keys])

    manifest = read_parquet(storage, manifest_uri(output, plan.name))
    assert [row["key"] for row in manifest] == png_keys, "manifest rows in shard order"
    for row in manifest:
        png = members[f"{row['key']}.png"]
        meta = json.loads(members[f"{row['key']}.json"])
        assert row["split"] == "train" and row["shard"] == "train-000000"
        assert row["sha256"] == hashlib.sha256(png).hexdigest() == meta["sha256"]
        assert row["bytes"] == len(png)
        assert (row["width"], row["height"]) == (16, 16)
        assert (meta["split"], meta["key"]) == ("train", row["key"])
    assert result.bytes == sum(row["bytes"] for row in manifest)
    astronaut = next(row for row in manifest if stem_of(row["key"]) == "astronaut")
    assert (astronaut["original_width"], astronaut["original_height"]) == (512, 512)


def test_a_missing_file_fails_at_the_read_stage(tmp_path):
    good = ItemSpec("good", "test", str(SKIMAGE_DATA / "astronaut.png"))
    gone = ItemSpec("gone", "test", str(tmp_path / "deleted.jpg"))

    result = write_shard(ShardPlan("val-000000", "val", [gone, good]), Storage(), str(tmp_path / "o"), SETTINGS)

    assert result.samples == 1 and result.errors == 1
    assert result.error_rows[0]["key"] == "gone" and result.error_rows[0]["stage"] == "read"
    assert "No such file" in result.error_rows[0]["error"]


def test_a_committed_shard_is_skipped_without_rewriting(photo_folder, tmp_path):
    from atoken.preprocess.writer import MAX_ATTEMPTS

    storage, output = Storage(), str(tmp_path / "out")
    plan = ShardPlan("train-000000", "train", list_folder(str(photo_folder)))
    for _ in range(MAX_ATTEMPTS):  # the folder's bad files are retried, then left alone
        first = write_shard(plan, storage, output, SETTINGS)
    paths = [Path(shard_uri(output, plan.name)), Path(manifest_uri(output, plan.name)),
             Path(errors_uri(output, plan.name))]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}

    second = write_shard(plan, storage, output, SETTINGS)

    assert second.skipped and not first.skipped
    assert (second.samples, second.errors, second.bytes) == (first.samples, first.errors, first.bytes)
    assert second.error_rows == first.error_rows
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths} == before


@pytest.mark.parametrize("leftover", ["complete tar", "garbage tar"])
def test_a_shard_without_its_manifest_is_rebuilt_to_the_same_keys(photo_folder, tmp_path, leftover):
    storage, output = Storage(), str(tmp_path / "out")
    plan = ShardPlan("train-000000", "train", list_folder(str(photo_folder)))
    write_shard(plan, storage, output, SETTINGS)
    tar_path = Path(shard_uri(output, plan.name))
    first_members = tar_members(tar_path.read_bytes())
    first_manifest = read_parquet(storage, manifest_uri(output, plan.name))
    # A kill after the tar commit and before the manifest commit; or in the middle of a non-atomic copy.
    Path(manifest_uri(output, plan.name)).unlink()
    if leftover == "garbage tar":
        tar_path.write_bytes(tar_path.read_bytes()[:1000])

    rebuilt = write_shard(plan, storage, output, SETTINGS)

    assert not rebuilt.skipped and rebuilt.samples == 5 and rebuilt.errors == 3
    members = tar_members(tar_path.read_bytes())
    assert list(members) == list(first_members)
    assert members == first_members, "same items, same processed bytes"
    assert read_parquet(storage, manifest_uri(output, plan.name)) == first_manifest
    assert not list(Path(output).rglob("*.tmp-*"))


# -- preprocess/job.py: planning ----------------------------------------------------------------------


def numbered_folder(root: Path, count: int) -> Path:
    root.mkdir()
    for i in range(count):
        (root / f"img{i:02d}.png").write_bytes(b"x")  # planning never decodes
    return root


def test_plan_image_shards_splits_every_nth_item_and_sizes_shards(tmp_path):
    folder = numbered_folder(tmp_path / "imgs", 11)
    section = IngestSection(sources=[SourceSection(kind="folder", path=str(folder))], samples_per_shard=3,
                            val_every=4)
    items = list_items(section)

    plans = plan_image_shards(section)

    assert [(p.name, p.split, len(p.items)) for p in plans] == [
        ("train-000000", "train", 3), ("train-000001", "train", 3), ("train-000002", "train", 2),
        ("val-000000", "val", 3),
    ]
    val = [item for p in plans if p.split == "val" for item in p.items]
    assert val == [items[0], items[4], items[8]]
    train = [item for p in plans if p.split == "train" for item in p.items]
    assert train == [item for i, item in enumerate(items) if i % 4 != 0], "stable order within a split"
    assert sorted(item.key for p in plans for item in p.items) == sorted(item.key for item in items)


def test_plan_image_shards_is_deterministic(tmp_path):
    folder = numbered_folder(tmp_path / "imgs", 23)
    section = IngestSection(sources=[SourceSection(kind="builtin", name="skimage-photos", limit=10),
                                     SourceSection(kind="folder", path=str(folder))],
                            samples_per_shard=4, val_every=5)

    first, second = plan_image_shards(section), plan_image_shards(section)

    assert first == second
    assert sum(len(p.items) for p in first) == 33
    assert all(len(p.items) <= 4 for p in first)
    assert first[0].items[0].key.startswith("skimage_"), "sources in config order"
    assert len({p.name for p in first}) == len(first)


def test_list_items_refuses_a_source_listed_twice(tmp_path):
    folder = numbered_folder(tmp_path / "imgs", 2)
    source = SourceSection(kind="folder", path=str(folder))
    with pytest.raises(ValueError, match="same item keys"):
        list_items(IngestSection(sources=[source, source]))


def test_folder_keys_are_stable_and_dot_free(tmp_path):
    folder = numbered_folder(tmp_path / "imgs", 3)
    (folder / "sub").mkdir()
    (folder / "sub" / "a.b c.JPG").write_bytes(b"x")
    (folder / "readme.txt").write_text("not listed")
    keys = [item.key for item in list_folder(str(folder))]
    assert keys == [item.key for item in list_folder(str(folder))]
    assert len(keys) == 4 and all("." not in key for key in keys)


def test_failed_items_are_retried_on_rerun_and_land_once_they_work(tmp_path):
    from atoken.preprocess.writer import MAX_ATTEMPTS

    folder = tmp_path / "in"
    folder.mkdir()
    photo = (SKIMAGE_DATA / "astronaut.png").read_bytes()
    (folder / "a.png").write_bytes(photo)
    (folder / "late.png").write_bytes(b"")  # still being copied when the job first runs
    (folder / "broken.png").write_bytes(b"never an image")
    items = list_folder(str(folder))
    plan = ShardPlan("train-000000", "train", items)
    storage, output = Storage(), str(tmp_path / "out")
    first = write_shard(plan, storage, output, SETTINGS)
    assert (first.samples, first.errors) == (1, 2)
    (folder / "late.png").write_bytes(photo)  # the copy finished
    second = write_shard(plan, storage, output, SETTINGS)
    assert not second.skipped and (second.samples, second.errors) == (2, 1)
    assert second.error_rows[0]["attempts"] == 2 and second.error_rows[0]["locator"].endswith("broken.png")
    for _ in range(MAX_ATTEMPTS):
        last = write_shard(plan, storage, output, SETTINGS)
    assert last.skipped and last.error_rows[0]["attempts"] == MAX_ATTEMPTS  # a permanent failure stops retrying
    keys = [row["key"] for row in read_parquet(storage, f"{output}/manifests/train-000000.parquet")]
    assert sorted(keys) == sorted(i.key for i in items if not i.locator.endswith("broken.png"))


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

    from atoken.preprocess.writer import TarSink, sample_spans, scan_tar

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
        spans = sample_spans(source)
        assert [key for key, _, _ in spans] == list(samples)
        with TarSink(tmp_path / "b.tar") as sink:
            sink.copy_range(source, spans[2][1], spans[4][2])  # samples 2, 3, 4
    assert list(tar_members((tmp_path / "b.tar").read_bytes())) == [f"s{i}.{e}" for i in (2, 3, 4) for e in ("json",
                                                                                                           "png")]
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[spans[1][1] + 10] ^= 1  # one flipped bit in a header
    with pytest.raises(RuntimeError, match="bad header checksum"):
        scan_tar(io.BytesIO(bytes(data)))
    with pytest.raises(RuntimeError, match="truncated"):
        scan_tar(io.BytesIO((tmp_path / "a.tar").read_bytes()[:spans[3][1] + 100]))
