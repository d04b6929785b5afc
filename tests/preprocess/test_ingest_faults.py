"""The image ingest against S3 that misbehaves: a fault-injecting proxy (tests/faults.py) on loopback between the
job (driver and Ray workers) and moto answers 5xx, throttles, cuts GETs mid-body and holds PUTs while the job
runs. Nothing is lost, nothing is duplicated, no partial shard is accepted, and the shards are the bytes an
ingest without the proxy writes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import boto3
import pyarrow.parquet as pq
import pytest
from faults import Fault, FaultProxy

from atoken.pipeline.config import IngestSection, SourceSection, StorageSection
from atoken.pipeline.storage import Storage
from atoken.preprocess.job import IngestError, list_items, run_image_job
from atoken.preprocess.sources import list_fashion_mnist, read_item_bytes

# Fixed, and free of digits: preprocess/writer.py's failure_kind reads "403"/"404" in a message as permanent.
BUCKET = "atoken-ingest-faults"
IMAGES = 30
CORRUPT = "src/img-corrupt.png"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "atoken-test-key-id", "AWS_SECRET_ACCESS_KEY": "atoken-faults-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def faults() -> list[Fault]:
    """Every kind, often enough that each fires in one run (~200 requests), rarely enough that botocore's
    retries (max_attempts 5) get each request through."""
    return [
        Fault("cut_get", method="GET", path="/src/", every=4),  # workers reading source images
        Fault("cut_get", method="GET", path="/out/", every=3),  # records and manifests the driver gathers
        Fault("throttle", method="GET", every=7),
        Fault("error_5xx", method="PUT", every=5),
        Fault("error_5xx", method="HEAD", every=6, status=503),
        Fault("error_5xx", every=23),  # any method: DELETE and POST too
        Fault("slow_put", method="PUT", path="/shards/", every=2, delay=0.3),
    ]


@pytest.fixture(scope="module")
def ray_with_credentials():
    """A local Ray whose workers get the test's throwaway S3 credentials (moto accepts any)."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def source(s3_endpoint, ray_with_credentials) -> str:
    """IMAGES real Fashion-MNIST PNGs and one corrupt file under s3://BUCKET/src/, put straight into moto."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for index, item in enumerate(list_fashion_mnist(IMAGES)):
        client.put_object(Bucket=BUCKET, Key=f"src/img{index:03d}.png", Body=read_item_bytes(item.locator))
    client.put_object(Bucket=BUCKET, Key=CORRUPT, Body=b"\x89PNG\r\n\x1a\n" + bytes(200))
    return f"s3://{BUCKET}/src"


@pytest.fixture(scope="module")
def clean(s3_endpoint, source) -> dict[str, bytes]:
    """The objects of an ingest of the source straight into moto, without the proxy."""
    stats = run_image_job(section_for(source), Storage(StorageSection(endpoint_url=s3_endpoint)),
                          f"s3://{BUCKET}/clean", progress=False)
    assert stats["samples"] == IMAGES and stats["parts_failed"] == 0
    return objects(boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1"), "clean")


def section_for(source: str) -> IngestSection:
    return IngestSection(sources=[SourceSection(kind="s3", path=source)], resolution=16, samples_per_shard=4,
                         val_every=6, parallelism=2)


def objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` (relative key → bytes), read straight from moto."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for entry in page.get("Contents", []):
            found[entry["Key"].removeprefix(prefix + "/")] = client.get_object(
                Bucket=BUCKET, Key=entry["Key"])["Body"].read()
    return found


def table(data: bytes) -> list[dict]:
    return pq.read_table(io.BytesIO(data)).to_pylist()


def shard_objects(found: dict[str, bytes]) -> dict[str, bytes]:
    return {key: data for key, data in found.items() if key.startswith(("shards/", "manifests/"))}


def keys_of(source: str, s3_endpoint: str) -> tuple[list[str], str]:
    """The good images' keys (sorted) and the corrupt one's."""
    items = list_items(section_for(source), Storage(StorageSection(endpoint_url=s3_endpoint)))
    corrupt = next(item.key for item in items if item.locator.endswith(CORRUPT))
    good = sorted(item.key for item in items if item.key != corrupt)
    assert len(good) == IMAGES
    return good, corrupt


def test_ingest_through_faults_loses_nothing_duplicates_nothing_and_writes_the_clean_run_bytes(
        s3_endpoint, source, clean):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    section = section_for(source)
    good, corrupt = keys_of(source, s3_endpoint)

    with FaultProxy(s3_endpoint, faults()) as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url, max_attempts=5))
        output = f"s3://{BUCKET}/out"
        runs = []
        for _ in range(3):
            try:
                runs.append(run_image_job(section, storage, output, progress=False))
                break
            except IngestError as exc:  # a part that failed after every retry: a rerun must complete it
                runs.append(str(exc))
                proxy.healthy()
        stats = runs[-1]
        assert isinstance(stats, dict), runs
        print(f"fault proxy: {dict(proxy.injected)} injected over {dict(proxy.requests)} requests; runs {runs}")
        # The negative control: every kind of fault did happen, the cuts on both the workers' and the driver's
        # reads, and the 5xx on more than one method.
        assert all(proxy.injected[kind] >= 1 for kind in ("error_5xx", "throttle", "cut_get", "slow_put")), \
            proxy.injected
        cuts = [target for kind, _, target in proxy.log if kind == "cut_get"]
        assert any("/src/" in t for t in cuts) and any("/out/" in t for t in cuts), cuts
        assert len({method for kind, method, _ in proxy.log if kind == "error_5xx"}) >= 2, proxy.log

        out = objects(client, "out")
        manifest = table(out["manifest.parquet"])
        assert sorted(row["key"] for row in manifest) == good, "every good image exactly once"
        errors = table(out["errors.parquet"])
        assert [(row["key"], row["kind"]) for row in errors] == [(corrupt, "permanent")]
        assert stats["samples"] == IMAGES and stats["failures"] == 1 and stats["failures_transient"] == 0

        # Every shard in the bucket is whole and is the one its manifest describes; nothing unreferenced.
        named = {row["shard"] for row in manifest}
        shards = {key.removeprefix("shards/").removesuffix(".tar") for key in out if key.startswith("shards/")}
        manifests = {key.removeprefix("manifests/").removesuffix(".parquet") for key in out
                     if key.startswith("manifests/")}
        assert shards == manifests == named, (shards, manifests, named)
        records = [table(data) for key, data in out.items() if key.startswith("parts/")]
        assert sorted(row["key"] for rows in records for row in rows) == sorted([*good, corrupt])
        for shard in sorted(shards):
            rows = table(out[f"manifests/{shard}.parquet"])
            with tarfile.open(fileobj=io.BytesIO(out[f"shards/{shard}.tar"])) as tar:
                members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
            assert sorted(members) == sorted(f"{row['key']}.{ext}" for row in rows for ext in ("json", "png"))
            for row in rows:
                png, meta = members[f"{row['key']}.png"], json.loads(members[f"{row['key']}.json"])
                assert len(png) == row["bytes"], (shard, row["key"])
                assert meta["sha256"] == row["sha256"] == hashlib.sha256(png).hexdigest(), (shard, row["key"])
                assert row["shard"] == shard

        # The same shards, names and bytes, as the ingest that never met the proxy.
        assert shard_objects(out) == shard_objects(clean)

        # A rerun through the healthy proxy skips every part and changes no byte.
        proxy.healthy()
        again = run_image_job(section, storage, output, progress=False)
        assert again["parts_skipped"] == again["parts"] == stats["parts"] and again["items_made"] == 0
        assert json.loads(client.get_object(Bucket=BUCKET, Key="out/_stats.json")["Body"].read()) == again
        after = objects(client, "out")
        assert {k: v for k, v in after.items() if k != "_stats.json"} == \
            {k: v for k, v in out.items() if k != "_stats.json"}


def test_a_part_whose_commit_fails_after_every_retry_is_recorded_and_a_rerun_completes_it(
        s3_endpoint, source, clean):
    """Every PUT of the validation part's record answered 500: botocore's tries and Ray's retries of the part
    are spent, the job records the part as failed and raises after writing its stats, without committing a
    manifest that leaves the part out; a rerun through the healthy proxy makes that part alone, to the clean run's
    bytes, and no shard that no record names is left."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    section = section_for(source)
    good, corrupt = keys_of(source, s3_endpoint)
    val_keys = sorted(row["key"] for row in table(clean["manifest.parquet"]) if row["split"] == "val")
    assert val_keys, "val_every gives the source a validation part"
    output = f"s3://{BUCKET}/failed"

    with FaultProxy(s3_endpoint, [Fault("error_5xx", method="PUT", path="/failed/parts/val-", every=1)]) as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url, max_attempts=2))
        with pytest.raises(IngestError, match="1 of .* parts failed .*first: val-"):
            run_image_job(section, storage, output, progress=False)
        assert proxy.injected["error_5xx"] >= 2 * 2, "both botocore tries, on more than one Ray try of the part"

        stats = json.loads(client.get_object(Bucket=BUCKET, Key="failed/_stats.json")["Body"].read())
        assert stats["parts_failed"] == 1 and list(stats["failed_parts"]) == ["val-000000-of-000001"]
        out = objects(client, "failed")
        assert not any(key.startswith("parts/val-") for key in out)
        # No manifest without the failed part's samples is committed (a rerun's previous one would stay whole); the
        # failed part's shard, written before its record failed, is removed by the next run that completes.
        assert "manifest.parquet" not in out

        proxy.healthy()
        again = run_image_job(section, storage, output, progress=False)
        assert again["parts_failed"] == 0 and again["parts_skipped"] == again["parts"] - 1
        assert again["items_made"] == len(val_keys)
        out = objects(client, "failed")
        assert sorted(row["key"] for row in table(out["manifest.parquet"])) == good
        assert [row["key"] for row in table(out["errors.parquet"])] == [corrupt]
        assert shard_objects(out) == shard_objects(clean)
