"""pipeline/storage.py's streaming read (open_read, what webdataset reads shards through) against S3 that
misbehaves: a fault-injecting proxy (tests/faults.py) on loopback between the product's boto3 client and moto cuts
GETs mid-body, stalls them, throttles and answers 5xx. Every read returns the object's exact bytes or raises
StorageError: never a short stream, never two versions of an object stitched together."""

from __future__ import annotations

import random
import uuid

import boto3
import pytest
from faults import Fault, FaultProxy

from atoken.pipeline import storage as storage_module
from atoken.pipeline.config import StorageSection
from atoken.pipeline.storage import Storage, StorageError

# A few MB, and no multiple of the reader's buffer or of the chunks the tests read in.
SIZE = 4 * 1024 * 1024 + 12_345
CHUNK = 64 * 1024
KEY = "obj/object.bin"


@pytest.fixture
def client(s3_endpoint, s3_credentials):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def stored(client) -> tuple[str, bytes]:
    """SIZE random bytes at s3://<a new bucket>/KEY, put straight into moto."""
    bucket = f"atoken-read-faults-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    body = random.Random(0).randbytes(SIZE)
    client.put_object(Bucket=bucket, Key=KEY, Body=body)
    return f"s3://{bucket}/{KEY}", body


def read_all(storage: Storage, uri: str) -> bytes:
    """The object through open_read, CHUNK bytes a call, as tarfile reads a shard: streamed, not read() whole."""
    chunks = []
    with storage.open_read(uri) as stream:
        while chunk := stream.read(CHUNK):
            chunks.append(chunk)
    return b"".join(chunks)


def gets(proxy: FaultProxy) -> list[dict[str, str]]:
    """The headers (names lower-cased) of every GET of the object the proxy received, in order."""
    return [{k.lower(): v for k, v in headers.items()} for method, target, headers in proxy.received
            if method == "GET" and KEY in target]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9])
def test_a_get_cut_on_every_second_request_is_resumed_by_range_to_the_exact_bytes(s3_credentials, s3_endpoint,
                                                                                  client, stored, fraction):
    uri, body = stored
    etag = client.head_object(Bucket=uri.split("/")[2], Key=KEY)["ETag"]
    with FaultProxy(s3_endpoint, [Fault("cut_get", method="GET", path=KEY, every=2, fraction=fraction)]) as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url))
        for _ in range(3):
            assert read_all(storage, uri) == body
        # GET 1 whole; GETs 2 and 4 cut, each resumed by the next (3, 5) from the byte the cut stopped at, on the
        # version first read (If-Match its ETag).
        assert proxy.injected["cut_get"] == 2 and proxy.requests["GET"] == 5, proxy.log
        headers = gets(proxy)
        cut_at = int(SIZE * fraction)
        assert [h.get("range") for h in headers] == [None, None, f"bytes={cut_at}-", None, f"bytes={cut_at}-"]
        assert [h.get("if-match") for h in headers] == [None, None, etag, None, etag]


def test_a_long_read_cut_on_every_get_completes_while_each_try_brings_bytes(s3_credentials, s3_endpoint, stored):
    """Twice BODY_ATTEMPTS cuts in one read, each after half of what was left: only tries in a row that bring
    nothing count against the read."""
    uri, body = stored
    cuts = 2 * storage_module.BODY_ATTEMPTS
    with FaultProxy(s3_endpoint, [Fault("cut_get", method="GET", path=KEY, every=1, limit=cuts)]) as proxy:
        assert read_all(Storage(StorageSection(endpoint_url=proxy.url)), uri) == body
        assert proxy.injected["cut_get"] == cuts and proxy.requests["GET"] == cuts + 1
        starts, left = [], SIZE
        for _ in range(cuts):
            starts.append(SIZE - left + left // 2)
            left -= left // 2
        assert [h.get("range") for h in gets(proxy)] == [None, *(f"bytes={start}-" for start in starts)]


def test_throttles_and_5xx_on_the_first_and_the_resumed_gets_are_retried(s3_credentials, s3_endpoint, stored):
    """A throttle (503 SlowDown) and a 500 on the GETs that resume a cut body: botocore retries them (max_attempts
    3), and the bytes are the object's."""
    uri, body = stored
    faults = [Fault("throttle", method="GET", path=KEY, at=(1, 3)),
              Fault("cut_get", method="GET", path=KEY, at=(2, 4), fraction=0.3),
              Fault("error_5xx", method="GET", path=KEY, at=(5,))]
    with FaultProxy(s3_endpoint, faults) as proxy:
        assert read_all(Storage(StorageSection(endpoint_url=proxy.url)), uri) == body
        assert proxy.injected == {"throttle": 2, "cut_get": 2, "error_5xx": 1}, proxy.log
        # 1 throttled, 2 cut, 3 (ranged) throttled, 4 (ranged, botocore's retry) cut, 5 (ranged) 500, 6 whole.
        ranges = [h.get("range") for h in gets(proxy)]
        assert ranges[:2] == [None, None] and all(r and r.startswith("bytes=") for r in ranges[2:])
        assert len(ranges) == 6 and ranges[2] == ranges[3] != ranges[4] == ranges[5]


def test_a_resumed_get_throttled_past_botocores_retries_is_tried_again(s3_credentials, s3_endpoint, stored):
    uri, body = stored
    faults = [Fault("cut_get", method="GET", path=KEY, at=(1,)), Fault("throttle", method="GET", path=KEY, at=(2, 3))]
    with FaultProxy(s3_endpoint, faults) as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url, max_attempts=2))
        assert read_all(storage, uri) == body
        assert proxy.injected == {"cut_get": 1, "throttle": 2} and proxy.requests["GET"] == 4, proxy.log


def test_a_stalled_body_times_out_and_is_resumed_and_a_slow_one_is_waited_for(s3_credentials, s3_endpoint, stored):
    uri, body = stored
    with FaultProxy(s3_endpoint, [Fault("slow_get", method="GET", path=KEY, at=(1,), fraction=0.3, delay=2.0)]) \
            as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url, read_timeout_s=0.5))
        assert read_all(storage, uri) == body
        assert proxy.injected["slow_get"] == 1 and proxy.requests["GET"] == 2
        assert gets(proxy)[1]["range"].startswith("bytes=")

        # Slower than usual but within the read timeout: one GET, waited for.
        proxy.faults = [Fault("slow_get", method="GET", path=KEY, at=(1,), fraction=0.3, delay=0.2)]
        before = proxy.requests["GET"]
        assert read_all(storage, uri) == body
        assert proxy.injected["slow_get"] == 2 and proxy.requests["GET"] - before == 1


def test_an_object_replaced_between_the_cut_and_the_resume_is_never_stitched(s3_credentials, s3_endpoint, client,
                                                                            stored):
    uri, body = stored
    bucket = uri.split("/")[2]
    first_etag = client.head_object(Bucket=bucket, Key=KEY)["ETag"]
    replacement = random.Random(1).randbytes(SIZE)  # the same size: only the ETag tells the versions apart
    with FaultProxy(s3_endpoint, [Fault("cut_get", method="GET", path=KEY, at=(1,))]) as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url))
        got = bytearray()
        with pytest.raises(StorageError, match=f"cannot read {uri}: the object changed while it was read") as error:
            with storage.open_read(uri) as stream:
                got += stream.read(CHUNK)
                client.put_object(Bucket=bucket, Key=KEY, Body=replacement)
                while chunk := stream.read(CHUNK):
                    got += chunk
        assert error.value.permanent
        assert proxy.injected["cut_get"] == 1 and proxy.requests["GET"] == 2
        assert gets(proxy)[1]["if-match"] == first_etag != client.head_object(Bucket=bucket, Key=KEY)["ETag"]
        # What was read before the error is the first version's, up to the cut: nothing of the second.
        assert bytes(got) == body[:len(got)] and len(got) <= SIZE // 2


def test_a_get_cut_on_every_try_raises_after_body_attempts_and_names_no_credentials(s3_credentials, s3_endpoint,
                                                                                   stored):
    """The negative control: the headers and no byte of the body, on every GET. Nothing is returned as if the
    object ended there."""
    uri, _ = stored
    with FaultProxy(s3_endpoint, [Fault("cut_get", method="GET", path=KEY, every=1, fraction=0.0)]) as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url))
        with pytest.raises(StorageError, match=f"cannot read {uri}: its body was cut off on 4 tries in a row") \
                as error:
            read_all(storage, uri)
        assert proxy.requests["GET"] == proxy.injected["cut_get"] == storage_module.BODY_ATTEMPTS == 4
        assert [h.get("range") for h in gets(proxy)] == [None, "bytes=0-", "bytes=0-", "bytes=0-"]
        message = str(error.value)
        assert "\n" not in message and s3_credentials["AWS_SECRET_ACCESS_KEY"] not in message
        assert s3_credentials["AWS_ACCESS_KEY_ID"] not in message


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_storage_max_attempts_is_the_number_of_requests_each_call_makes_in_all(s3_credentials, s3_endpoint, stored,
                                                                                max_attempts):
    """`storage.max_attempts` counts every request of one call, the first included (botocore's
    total_max_attempts; its `max_attempts` counts retries only, one request more than the field says)."""
    uri, _ = stored
    with FaultProxy(s3_endpoint, [Fault("error_5xx", method="HEAD", path=KEY, every=1)]) as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url, max_attempts=max_attempts))
        with pytest.raises(StorageError):
            storage.size(uri)
        assert proxy.requests["HEAD"] == max_attempts, proxy.log
