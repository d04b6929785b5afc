"""preprocess/job.py end to end on a local Ray: parts repacked into shards of equal sample counts, once each,
the same bytes after a kill and a rerun, failed items landing on a rerun, shards split evenly over workers."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from atoken.pipeline.config import IngestSection, SourceSection
from atoken.pipeline.storage import Storage
from atoken.preprocess.job import list_items, plan_repack, run_image_job
from atoken.preprocess.sources import list_fashion_mnist, read_item_bytes
from atoken.preprocess.writer import MAX_ATTEMPTS, ShardPlan, shard_uri
from atoken.train.data import ShardInfo, ShardStream

PER_SHARD = 4


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def image_folder(root: Path, count: int, bad: dict[int, bytes]) -> Path:
    """`count` real Fashion-MNIST photos as PNG files; the indices in `bad` hold those bytes instead."""
    root.mkdir()
    for index, item in enumerate(list_fashion_mnist(count)):
        (root / f"img{index:03d}.png").write_bytes(bad.get(index, read_item_bytes(item.locator)))
    return root


def section_for(folder: Path) -> IngestSection:
    # Groups of PER_SHARD items, so every group that holds a failure makes an uneven part.
    return IngestSection(sources=[SourceSection(kind="folder", path=str(folder))], resolution=16,
                         samples_per_shard=PER_SHARD, val_every=6, parallelism=2)


def tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [name.rsplit(".", 1)[0] for name in tar.getnames() if name.endswith(".json")]


def shard_files(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes()
            for folder in ("shards", "manifests") for p in sorted((output / folder).iterdir())}


def manifest(output: Path) -> list[dict]:
    return pq.read_table(output / "manifest.parquet").to_pylist()


def test_every_shard_holds_the_same_number_of_samples_and_every_good_item_lands_once(local_ray, tmp_path):
    bad = {1: b"", 5: b"not an image", 6: b"\x89PNG\r\n\x1a\n" + bytes(300), 13: b""}
    folder = image_folder(tmp_path / "in", 40, bad)
    section, output = section_for(folder), tmp_path / "out"
    items = list_items(section)

    stats = run_image_job(section, Storage(), str(output), progress=False)

    rows = manifest(output)
    good = {item.key for i, item in enumerate(items) if i not in bad}
    assert sorted(row["key"] for row in rows) == sorted(good), "each good item once, no bad one"
    assert stats["samples"] == len(good) == 36 and stats["failures"] == 4
    errors = pq.read_table(output / "errors.parquet").to_pylist()
    assert sorted(row["key"] for row in errors) == sorted(items[i].key for i in bad)
    for split in ("train", "val"):
        shards = sorted(p for p in (output / "shards").glob(f"{split}-*.tar"))
        counts = [len(tar_keys(p)) for p in shards]
        assert counts[:-1] == [PER_SHARD] * (len(counts) - 1) and 0 < counts[-1] <= PER_SHARD, (split, counts)
        split_rows = [row for row in rows if row["split"] == split]
        assert sum(counts) == len(split_rows)
        # Shard order is the listing's order: the split's samples, read shard after shard, are in item order.
        assert [k for p in shards for k in tar_keys(p)] == [row["key"] for row in split_rows]
        for path in shards:
            per_shard = pq.read_table(output / "manifests" / f"{path.stem}.parquet").to_pylist()
            assert [row["key"] for row in per_shard] == tar_keys(path)
            assert {row["shard"] for row in per_shard} == {path.stem}
    parts = [len(pq.read_table(p)) for p in sorted((output / "_parts" / "manifests").glob("train-*.parquet"))]
    assert len(set(parts)) > 1, "the parts were uneven, so the repack did the evening out"
    assert stats["shards"] == len(list((output / "shards").glob("*.tar")))
    assert list((output / "_parts" / "shards").glob("*.tar")), "retryable failures keep the parts for a rerun"


def test_with_no_failure_every_shard_is_its_part_linked_not_copied(local_ray, tmp_path):
    folder = image_folder(tmp_path / "in", 18, {})
    section, output = section_for(folder), tmp_path / "out"

    stats = run_image_job(section, Storage(), str(output), progress=False)

    shards = sorted((output / "shards").glob("*.tar"))
    assert stats["failures"] == 0 and len(shards) == stats["shards"] == stats["parts"]
    # No item can be retried, so the parts' tars are gone; the shards (links to them) stay whole and readable.
    assert not list((output / "_parts" / "shards").glob("*.tar"))
    assert [k for p in shards for k in tar_keys(p)] == [row["key"] for row in manifest(output)]
    assert all(p.stat().st_nlink == 1 for p in shards)

    # A shard to rebuild whose part is gone says what to do, in one line.
    (output / "manifests" / "train-000000.parquet").unlink()
    with pytest.raises(Exception, match="is gone, so shard train-000000 cannot be rebuilt"):
        run_image_job(section, Storage(), str(output), progress=False)


def test_a_kill_at_any_point_then_a_rerun_gives_the_same_shards(local_ray, tmp_path):
    folder = image_folder(tmp_path / "in", 30, {2: b"", 9: b"broken"})
    section, output = section_for(folder), tmp_path / "out"
    run_image_job(section, Storage(), str(output), progress=False)
    first = shard_files(output)
    first_manifest = manifest(output)

    # What a SIGKILL in the middle of the repack leaves: some shards committed, one tar without its
    # manifest (cut mid-copy), later ones never written; and one part rebuilt half-way.
    (output / "manifests" / "train-000001.parquet").unlink()
    tar = output / "shards" / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    for name in ("train-000002", "train-000003"):
        (output / "manifests" / f"{name}.parquet").unlink()
        (output / "shards" / f"{name}.tar").unlink()
    (output / "_parts" / "manifests" / "train-000003.parquet").unlink()
    (output / "manifest.parquet").unlink()
    # And a shard from an older, longer run of this output, which must not survive.
    (output / "shards" / "train-000099.tar").write_bytes(b"stale")
    (output / "manifests" / "train-000099.parquet").write_bytes(b"stale")

    stats = run_image_job(section, Storage(), str(output), progress=False)

    assert shard_files(output) == first, "the same shards, byte for byte"
    assert manifest(output) == first_manifest
    # Rebuilt: the part cut half-way, and the two parts whose failed item was tried once more.
    assert stats["parts_skipped"] == stats["parts"] - 3
    assert stats["shards_skipped"] == stats["shards"] - 3


def test_a_failed_item_that_works_on_a_rerun_lands_once_and_shards_stay_full(local_ray, tmp_path):
    photo = read_item_bytes(list_fashion_mnist(1)[0].locator)
    folder = image_folder(tmp_path / "in", 30, {7: b"", 20: b"never an image"})
    section, output = section_for(folder), tmp_path / "out"
    items = list_items(section)
    run_image_job(section, Storage(), str(output), progress=False)
    before = shard_files(output)
    assert items[7].key not in {row["key"] for row in manifest(output)}

    (folder / "img007.png").write_bytes(photo)  # the copy finished after the first run
    stats = run_image_job(section, Storage(), str(output), progress=False)

    keys = [row["key"] for row in manifest(output)]
    assert keys.count(items[7].key) == 1 and items[20].key not in keys and len(keys) == 29
    assert stats["failures"] == 1
    train_counts = [len(tar_keys(p)) for p in sorted((output / "shards").glob("train-*.tar"))]
    assert train_counts[:-1] == [PER_SHARD] * (len(train_counts) - 1)
    after = shard_files(output)
    # Item 7 is the 6th training item: shard 0 stays as it was, every shard after the new sample is rebuilt.
    assert after["shards/train-000000.tar"] == before["shards/train-000000.tar"]
    assert after["shards/train-000001.tar"] != before["shards/train-000001.tar"]
    assert {k: v for k, v in after.items() if "val-" in k} == {k: v for k, v in before.items() if "val-" in k}

    for _ in range(MAX_ATTEMPTS):  # the broken file is retried, then given up on: the parts' tars go
        run_image_job(section, Storage(), str(output), progress=False)
    assert not list((output / "_parts" / "shards").glob("*.tar"))
    assert shard_files(output) == after
    again = run_image_job(section, Storage(), str(output), progress=False)
    assert again["shards_skipped"] == again["shards"] and again["parts_skipped"] == again["parts"]
    assert shard_files(output) == after


@pytest.mark.parametrize("workers", [2, 3])
def test_shards_split_evenly_over_loader_workers(local_ray, tmp_path, workers):
    folder = image_folder(tmp_path / "in", 47, {3: b"", 4: b"", 17: b""})  # 39 train items, 36 good: 9 full shards
    output = tmp_path / "out"
    run_image_job(section_for(folder), Storage(), str(output), progress=False)
    rows = [row for row in manifest(output) if row["split"] == "train"]
    counts = {row["shard"]: 0 for row in rows}
    for row in rows:
        counts[row["shard"]] += 1
    assert set(counts.values()) == {PER_SHARD} and len(counts) == 9
    shards = [ShardInfo(shard_uri(str(output), name), n) for name, n in sorted(counts.items())]

    per_rank = [_first_epoch(shards, rank, workers) for rank in range(workers)]

    assert len({len(keys) for keys in per_rank}) == 1, "every worker reads the same number of samples"
    assert len(per_rank[0]) == (9 // workers) * PER_SHARD
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)), "workers read disjoint samples"


def _first_epoch(shards: list[ShardInfo], rank: int, workers: int) -> list[str]:
    stream = ShardStream(shards, Storage(), seed=3, rank=rank, world_size=workers)
    size = sum(s.samples for s in stream._epoch_shards(0))
    samples = stream.samples()
    return [next(samples)["__key__"] for _ in range(size)]


def test_plan_repack_cuts_parts_into_equal_shards_in_order():
    import pyarrow as pa

    from atoken.preprocess.writer import MANIFEST_SCHEMA

    def part(keys: list[str]) -> pa.Table:
        return pa.Table.from_pylist([{"key": k, "split": "train", "shard": "p", "bytes": 1} for k in keys],
                                    schema=MANIFEST_SCHEMA)

    items = list_fashion_mnist(9)
    plans = [ShardPlan(f"train-{i:06d}", "train", items[3 * i:3 * i + 3]) for i in range(3)]
    tables = {"train-000000": part(["a", "b"]), "train-000001": part([]), "train-000002": part(["c", "d", "e", "f"])}

    repacks = plan_repack(plans, tables, 4)

    assert [(r.name, r.pieces) for r in repacks] == [
        ("train-000000", [("train-000000", 0, 2), ("train-000002", 0, 2)]),  # the empty part adds nothing
        ("train-000001", [("train-000002", 2, 4)]),
    ]
    assert [r.manifest.column("key").to_pylist() for r in repacks] == [["a", "b", "c", "d"], ["e", "f"]]
    assert [set(r.manifest.column("shard").to_pylist()) for r in repacks] == [{"train-000000"}, {"train-000001"}]
    assert [r.whole_part for r in repacks] == [False, False], "a tail of a part is not the whole part"

    # Parts of exactly one shard each (no item failed): every shard is a whole part, copied as it is.
    tables = {"train-000000": part(["a", "b"]), "train-000001": part(["c", "d"]), "train-000002": part(["e"])}
    repacks = plan_repack(plans, tables, 2)
    assert [(r.pieces, r.whole_part) for r in repacks] == [
        ([("train-000000", 0, 2)], True), ([("train-000001", 0, 2)], True), ([("train-000002", 0, 1)], True)]
