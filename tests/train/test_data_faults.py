"""train/data.py's sample stream reading real training shards from S3 that misbehaves: a fault-injecting proxy
(tests/faults.py) on loopback between the stream's boto3 client and moto cuts 10% of the GETs mid-body and
throttles others, as the proxy of issue 19 did when training died on an IncompleteReadError. The stream yields
exactly the samples, in order and byte for byte, of the same stream read with no proxy."""

from __future__ import annotations

import functools
import itertools
import uuid
from pathlib import Path

import boto3
import pytest
from faults import Fault, FaultProxy

from atoken.pipeline import storage as storage_module
from atoken.pipeline.config import StorageSection
from atoken.pipeline.storage import Storage, StorageError
from atoken.train import data
from atoken.train.data import ShardInfo, ShardStream

from helpers import write_training_shards

EPOCHS = 3


@pytest.fixture
def shards(tmp_path, s3_endpoint, s3_credentials) -> list[ShardInfo]:
    """Image, clip and 3D training shards as ingest writes them (tests/helpers.py), uploaded to a new bucket."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"atoken-train-faults-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    found = []
    for kind, local in write_training_shards(tmp_path / "shards").items():
        for shard in local:
            key = f"train/{kind}/{Path(shard.uri).name}"
            client.upload_file(shard.uri, bucket, key)
            found.append(ShardInfo(f"s3://{bucket}/{key}", shard.samples))
    return found


def stream(shards: list[ShardInfo], storage: Storage) -> list[dict]:
    """EPOCHS epochs of the stream (each epoch reads every shard once)."""
    count = EPOCHS * sum(shard.samples for shard in shards)
    return list(itertools.islice(ShardStream(shards, storage, seed=0).samples(), count))


def test_the_stream_through_cut_and_throttled_gets_yields_the_samples_of_a_clean_read(s3_endpoint, shards,
                                                                                     monkeypatch):
    clean = stream(shards, Storage(StorageSection(endpoint_url=s3_endpoint)))
    # One try per shard: the storage reader alone must see the shards through, not shard_samples' rereads.
    monkeypatch.setattr(data, "shard_samples", functools.partial(data.shard_samples, attempts=1))
    faults = [Fault("cut_get", method="GET", path="/train/", every=10),
              Fault("cut_get", method="GET", path="/train/", every=13, fraction=0.9),
              Fault("throttle", method="GET", path="/train/", every=7)]
    with FaultProxy(s3_endpoint, faults) as proxy:
        faulty = stream(shards, Storage(StorageSection(endpoint_url=proxy.url)))
        print(f"fault proxy: {dict(proxy.injected)} injected over {dict(proxy.requests)} requests")
        assert proxy.injected["cut_get"] >= 4 and proxy.injected["throttle"] >= 4, proxy.injected
        # Each body cut half way was resumed from where it stopped, by a ranged GET. (A cut at 90% may fall past
        # the archive's end-of-file blocks, where tarfile stops reading: then nothing needed resuming.)
        ranged = [headers for method, _, headers in proxy.received if method == "GET" and "Range" in headers]
        assert faults[0].fired >= 3 and len(ranged) >= faults[0].fired, proxy.log
    assert len(faulty) == len(clean) == EPOCHS * sum(shard.samples for shard in shards)
    assert [sample["__key__"] for sample in faulty] == [sample["__key__"] for sample in clean]
    assert faulty == clean, "every member's bytes"


def test_a_shard_cut_on_every_get_stops_the_stream_with_storage_error(s3_endpoint, shards, monkeypatch):
    """The negative control: headers and no byte of the body, on every GET of one shard. The stream raises
    (after the reader's and shard_samples' tries); it never yields a shard's samples as if the shard ended early."""
    monkeypatch.setattr(storage_module, "BODY_BACKOFF_S", 0.01)
    cut = shards[0].uri.split("/", 3)[3]
    with FaultProxy(s3_endpoint, [Fault("cut_get", method="GET", path=cut, every=1, fraction=0.0)]) as proxy:
        with pytest.raises(StorageError, match=f"cannot read shard {shards[0].uri}"):
            stream(shards, Storage(StorageSection(endpoint_url=proxy.url)))
        assert proxy.injected["cut_get"] == 3 * storage_module.BODY_ATTEMPTS, "shard_samples' 3 tries of 4 GETs"


def test_a_shard_whose_read_gives_up_part_way_is_opened_again_and_its_read_samples_not_yielded_twice(
        s3_endpoint, shards, monkeypatch):
    """The storage reader resumes a cut body by range; when it gives up (its tries in a row brought nothing) after
    part of a shard was yielded, the stream opens the shard again and passes over what it already yielded."""
    monkeypatch.setattr(storage_module, "BODY_BACKOFF_S", 0.01)
    clean = stream(shards, Storage(StorageSection(endpoint_url=s3_endpoint)))
    largest = max(shards, key=lambda shard: shard.samples)
    cut = largest.uri.split("/", 3)[3]
    given_up = tuple(range(2, storage_module.BODY_ATTEMPTS + 1))  # every resume of the first read: no byte
    faults = [Fault("cut_get", method="GET", path=cut, at=(1,), fraction=0.6),
              Fault("cut_get", method="GET", path=cut, at=given_up, fraction=0.0)]
    with FaultProxy(s3_endpoint, faults) as proxy:
        faulty = stream(shards, Storage(StorageSection(endpoint_url=proxy.url)))
        opened = [headers for method, target, headers in proxy.received
                  if method == "GET" and cut in target and "Range" not in headers]
    assert faults[0].fired == 1 and faults[1].fired == len(given_up), proxy.log
    assert len(opened) == EPOCHS + 1, "the shard was opened once more than once an epoch"
    assert [s["__key__"] for s in faulty] == [s["__key__"] for s in clean]
    assert faulty == clean, "every member's bytes, none twice"
