"""pipeline/storage.py: one storage layer over a local folder and s3:// (a real moto S3 server on loopback)."""

from __future__ import annotations

import json
import pickle
import time
import uuid
from pathlib import Path

import boto3
import pytest
import webdataset as wds
from botocore.exceptions import ResponseStreamingError
from faults import Fault, FaultProxy

from atoken.pipeline import storage as storage_module
from atoken.pipeline.config import StorageSection
from atoken.pipeline.storage import (
    LocalStaging,
    Storage,
    StorageError,
    join,
    register_webdataset_opener,
    split_s3,
)
from atoken.train.data import read_shard


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


# -- helpers ------------------------------------------------------------------------------------------


def test_join_and_split():
    assert join("s3://bucket/prefix/", "/a/", "b.json") == "s3://bucket/prefix/a/b.json"
    assert join("/tmp/run", "x") == "/tmp/run/x"
    assert split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert split_s3("s3://bucket") == ("bucket", "")


def test_local_staging_is_removed_on_exit(tmp_path):
    with LocalStaging(tmp_path) as folder:
        (folder / "x.tar").write_bytes(b"x")
        assert folder.is_dir() and folder.parent == tmp_path
    assert not folder.exists()


# -- local --------------------------------------------------------------------------------------------


def test_local_write_read_list_exists_delete(tmp_path):
    storage = Storage()
    root = str(tmp_path / "run")

    storage.write_bytes(join(root, "a", "b", "data.bin"), b"\x00\x01bytes")
    storage.write_json(join(root, "state.json"), {"z": 1, "a": [1, 2]})
    storage.write_bytes(join(root, "a", "c.txt"), b"c")

    assert storage.read_bytes(join(root, "a", "b", "data.bin")) == b"\x00\x01bytes"
    assert storage.read_json(join(root, "state.json")) == {"z": 1, "a": [1, 2]}
    assert list(json.loads((tmp_path / "run" / "state.json").read_text())) == ["a", "z"], "keys are sorted"
    assert storage.list(root) == [join(root, "a", "b", "data.bin"), join(root, "a", "c.txt"), join(root, "state.json")]
    assert storage.list(join(root, "a", "b")) == [join(root, "a", "b", "data.bin")]
    assert storage.list(join(root, "missing")) == []
    assert storage.exists(join(root, "a", "c.txt")) and not storage.exists(join(root, "a", "nope"))
    with storage.open_read(join(root, "a", "c.txt")) as handle:
        assert handle.read() == b"c"

    storage.delete(join(root, "a", "c.txt"))
    storage.delete(join(root, "a", "c.txt"))  # deleting what is gone is not an error
    assert not storage.exists(join(root, "a", "c.txt"))
    assert join(root, "a", "c.txt") not in storage.list(root)


def test_local_file_uri_and_overwrite(tmp_path):
    storage = Storage()
    uri = f"file://{tmp_path}/x/y.bin"
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second")
    assert (tmp_path / "x" / "y.bin").read_bytes() == b"second"
    assert storage.read_bytes(uri) == b"second"


def test_local_upload_and_download(tmp_path):
    storage = Storage()
    source = tmp_path / "source.tar"
    source.write_bytes(b"tar bytes" * 1000)

    storage.upload(source, str(tmp_path / "run" / "shards" / "train-000000.tar"))
    copied = storage.download(str(tmp_path / "run" / "shards" / "train-000000.tar"), tmp_path / "dl" / "copy.tar")

    assert (tmp_path / "run" / "shards" / "train-000000.tar").read_bytes() == source.read_bytes()
    assert copied.read_bytes() == source.read_bytes()


def test_local_copy_links_the_object_and_a_replace_leaves_the_copy_alone(tmp_path):
    storage = Storage()
    source, target = str(tmp_path / "parts" / "a.tar"), str(tmp_path / "shards" / "a.tar")
    storage.write_bytes(source, b"part bytes" * 100)

    storage.copy(source, target)

    assert Path(target).read_bytes() == b"part bytes" * 100 and storage.size(target) == 1000
    assert Path(target).stat().st_ino == Path(source).stat().st_ino, "a hard link, not a second copy"
    storage.write_bytes(source, b"rebuilt")  # objects are replaced, never changed in place
    assert Path(target).read_bytes() == b"part bytes" * 100
    assert temp_files(tmp_path) == []
    with pytest.raises(StorageError, match="cannot write"):
        storage.copy(str(tmp_path / "parts" / "missing.tar"), target)
    with pytest.raises(StorageError, match="cannot read"):
        storage.size(str(tmp_path / "parts" / "missing.tar"))


def test_local_staged_file_commits_on_success_and_leaves_nothing_on_error(tmp_path):
    storage = Storage()
    target = tmp_path / "out" / "shards" / "train-000000.tar"
    with storage.staged_file(str(target)) as path:
        assert path.parent == target.parent, "written beside its target, so the commit is a rename"
        path.write_bytes(b"whole")
        assert not target.exists(), "nothing is committed before the block ends"
    assert target.read_bytes() == b"whole"

    with pytest.raises(RuntimeError, match="verification"):
        with storage.staged_file(str(target)) as path:
            path.write_bytes(b"half")
            raise RuntimeError("failed verification")
    assert target.read_bytes() == b"whole" and temp_files(tmp_path) == []


def test_local_commit_leaves_no_temp_files_and_list_ignores_them(tmp_path):
    storage = Storage()
    for i in range(5):
        storage.write_bytes(str(tmp_path / "out" / f"{i}.bin"), bytes([i]) * 100)
    storage.write_json(str(tmp_path / "out" / "s.json"), {"ok": True})
    assert temp_files(tmp_path) == []

    # A temp file left by a killed writer is never listed as an output.
    (tmp_path / "out" / f"5.bin.tmp-{uuid.uuid4().hex}").write_bytes(b"half")
    listed = storage.list(str(tmp_path / "out"))
    assert len(listed) == 6 and all(".tmp-" not in uri for uri in listed)


def test_local_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    storage = Storage()
    target = tmp_path / "out" / "model.bin"
    storage.write_bytes(str(target), b"old")

    with pytest.raises(StorageError, match="cannot write"):
        storage.upload(tmp_path / "does-not-exist.tar", str(target))

    assert target.read_bytes() == b"old", "a failed commit must not touch the committed file"
    assert temp_files(tmp_path) == []


def test_local_unwritable_path_under_a_regular_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where a folder should be")
    storage = Storage()

    with pytest.raises(StorageError) as caught:
        storage.write_bytes(str(blocker / "sub" / "x.json"), b"{}")
    message = str(caught.value)
    assert message.startswith("cannot write ") and str(blocker / "sub" / "x.json") in message
    assert len(message.splitlines()) == 1

    with pytest.raises(StorageError, match="cannot write"):
        storage.check_writable(str(blocker))


def test_local_read_range_and_delete_folder(tmp_path):
    storage = Storage()
    root = str(tmp_path / "ckpt")
    storage.write_bytes(join(root, "step-1", "shards", "a.bin"), bytes(range(100)))
    storage.write_bytes(join(root, "step-2", "b.bin"), b"kept")

    assert storage.read_range(join(root, "step-1", "shards", "a.bin"), 10, 5) == bytes(range(10, 15))
    assert storage.read_range(join(root, "step-1", "shards", "a.bin"), 10, 0) == b""
    with pytest.raises(StorageError, match="truncated"):
        storage.read_range(join(root, "step-1", "shards", "a.bin"), 98, 5)
    storage.delete_folder(join(root, "step-1"))
    storage.delete_folder(join(root, "step-1"))  # deleting what is gone is not an error
    assert storage.list(root) == [join(root, "step-2", "b.bin")] and not (tmp_path / "ckpt" / "step-1").exists()


def test_local_read_missing_names_the_uri(tmp_path):
    with pytest.raises(StorageError, match=f"cannot read {tmp_path / 'missing.bin'}"):
        Storage().read_bytes(str(tmp_path / "missing.bin"))
    with pytest.raises(StorageError, match="cannot read"):
        Storage().open_read(str(tmp_path / "missing.bin"))


def test_local_check_writable_leaves_nothing(tmp_path):
    storage = Storage()
    storage.check_writable(str(tmp_path / "run"))
    assert storage.list(str(tmp_path / "run")) == []
    assert temp_files(tmp_path) == []


def test_storage_pickles_its_section_not_its_client():
    section = StorageSection(endpoint_url="http://127.0.0.1:1", region="eu-west-1", max_attempts=2)
    storage = Storage(section)
    assert storage.client is not None  # built once, so there is a client to leave behind

    copy = pickle.loads(pickle.dumps(storage))

    assert copy.section == section
    assert copy._client is None
    assert copy.client.meta.region_name == "eu-west-1"
    assert copy.client.meta.endpoint_url == "http://127.0.0.1:1"
    assert copy.client is not storage.client


def test_endpoint_from_the_standard_variable(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert Storage().endpoint_url == "http://127.0.0.1:2"
    assert Storage(StorageSection(endpoint_url="http://127.0.0.1:3")).endpoint_url == "http://127.0.0.1:3"


# -- S3 -----------------------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3_endpoint, s3_credentials) -> str:
    name = f"atoken-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_storage(s3_endpoint, s3_credentials) -> Storage:
    return Storage(StorageSection(endpoint_url=s3_endpoint))


def test_s3_write_read_list_exists_delete(s3_storage, bucket):
    root = f"s3://{bucket}/run"

    s3_storage.write_bytes(join(root, "a", "b", "data.bin"), b"\x00\x01bytes")
    s3_storage.write_json(join(root, "state.json"), {"z": 1, "a": [1, 2]})
    s3_storage.write_bytes(join(root, "a", "c.txt"), b"c")
    s3_storage.write_bytes(f"s3://{bucket}/run2/other.txt", b"not under run/")

    assert s3_storage.read_bytes(join(root, "a", "b", "data.bin")) == b"\x00\x01bytes"
    assert s3_storage.read_json(join(root, "state.json")) == {"z": 1, "a": [1, 2]}
    assert s3_storage.list(root) == [join(root, "a", "b", "data.bin"), join(root, "a", "c.txt"),
                                     join(root, "state.json")]
    assert s3_storage.list(root + "/") == s3_storage.list(root)
    assert s3_storage.list(join(root, "missing")) == []
    assert s3_storage.exists(join(root, "a", "c.txt")) and not s3_storage.exists(join(root, "a", "nope"))
    assert s3_storage.open_read(join(root, "a", "c.txt")).read() == b"c"

    s3_storage.delete(join(root, "a", "c.txt"))
    assert not s3_storage.exists(join(root, "a", "c.txt"))
    assert join(root, "a", "c.txt") not in s3_storage.list(root)


def test_s3_upload_download_and_missing_object(s3_storage, bucket, tmp_path):
    source = tmp_path / "shard.tar"
    source.write_bytes(bytes(range(256)) * 500)
    uri = f"s3://{bucket}/shards/train-000000.tar"

    s3_storage.upload(source, uri)
    copied = s3_storage.download(uri, tmp_path / "dl" / "copy.tar")

    assert s3_storage.read_bytes(uri) == source.read_bytes()
    assert copied.read_bytes() == source.read_bytes()
    with pytest.raises(StorageError, match=f"no such object s3://{bucket}/shards/missing.tar"):
        s3_storage.read_bytes(f"s3://{bucket}/shards/missing.tar")


def test_s3_large_bodies_go_up_in_parts(s3_endpoint, s3_credentials, bucket, tmp_path):
    """One PUT is refused over 5 GB: bodies over multipart_chunk_mb go through the managed multipart transfer
    (an object's ETag ends in -<parts> when it was uploaded in parts)."""
    storage = Storage(StorageSection(endpoint_url=s3_endpoint, multipart_chunk_mb=5))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    body = bytes(range(256)) * (11 * 4096)  # 11 MiB: parts of 5, 5 and 1 MiB
    source = tmp_path / "big.bin"
    source.write_bytes(body)

    storage.write_bytes(f"s3://{bucket}/written.bin", body)
    storage.upload(source, f"s3://{bucket}/uploaded.bin")
    storage.write_bytes(f"s3://{bucket}/small.json", b"{}")

    for key in ("written.bin", "uploaded.bin"):
        assert client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-3"), key
        assert storage.read_bytes(f"s3://{bucket}/{key}") == body
    assert "-" not in client.head_object(Bucket=bucket, Key="small.json")["ETag"]
    assert storage.download(f"s3://{bucket}/written.bin", tmp_path / "back.bin").read_bytes() == body


def test_s3_read_range_and_delete_folder(s3_storage, bucket):
    root = f"s3://{bucket}/ckpt"
    s3_storage.write_bytes(join(root, "step-1", "shards", "a.bin"), bytes(range(100)))
    s3_storage.write_bytes(join(root, "step-1", "b.json"), b"{}")
    s3_storage.write_bytes(join(root, "step-10", "c.bin"), b"not under step-1/")

    assert s3_storage.read_range(join(root, "step-1", "shards", "a.bin"), 10, 5) == bytes(range(10, 15))
    s3_storage.delete_folder(join(root, "step-1"))
    s3_storage.delete_folder(join(root, "step-1"))
    assert s3_storage.list(root) == [join(root, "step-10", "c.bin")]


def test_s3_copy_staged_file_and_size(s3_storage, bucket):
    source, target = f"s3://{bucket}/parts/a.tar", f"s3://{bucket}/shards/a.tar"
    s3_storage.write_bytes(source, bytes(range(256)) * 40)

    s3_storage.copy(source, target)
    assert s3_storage.read_bytes(target) == bytes(range(256)) * 40 and s3_storage.size(target) == 10240

    staged = f"s3://{bucket}/shards/b.tar"
    with pytest.raises(RuntimeError):
        with s3_storage.staged_file(staged) as path:
            path.write_bytes(b"half")
            raise RuntimeError("failed verification")
    assert not s3_storage.exists(staged)
    with s3_storage.staged_file(staged) as path:
        path.write_bytes(b"whole")
    assert s3_storage.read_bytes(staged) == b"whole"
    with pytest.raises(StorageError, match="no such object"):
        s3_storage.size(f"s3://{bucket}/parts/missing.tar")
    with pytest.raises(StorageError, match="one is on S3"):
        s3_storage.copy(source, "/tmp/elsewhere.tar")


def test_s3_webdataset_shard_reads_through_the_registered_opener(s3_storage, bucket, tmp_path):
    local = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(local)) as sink:
        for i in range(4):
            sink.write({"__key__": f"sample_{i}", "png": bytes([i]) * 10, "json": json.dumps({"i": i}).encode()})
    uri = f"s3://{bucket}/ingest/shards/train-000000.tar"
    s3_storage.upload(local, uri)

    register_webdataset_opener(s3_storage)
    samples = read_shard(s3_storage, uri)

    assert [s["__key__"] for s in samples] == [f"sample_{i}" for i in range(4)]
    assert [s["png"] for s in samples] == [bytes([i]) * 10 for i in range(4)]
    assert [json.loads(s["json"])["i"] for s in samples] == [0, 1, 2, 3]


def test_s3_a_get_cut_mid_body_is_retried_and_a_truncated_body_never_returned(s3_endpoint, s3_credentials, bucket,
                                                                               monkeypatch):
    """A GET whose connection closes after half its body (a fault proxy between the client and moto): botocore
    retries failed requests, not the reading of a cut body; read_bytes and read_range retry it themselves."""
    uri = f"s3://{bucket}/cut/object.bin"
    body = bytes(range(256)) * 400
    Storage(StorageSection(endpoint_url=s3_endpoint)).write_bytes(uri, body)
    with FaultProxy(s3_endpoint, [Fault("cut_get", method="GET", path="/cut/", at=(1, 2))]) as proxy:
        storage = Storage(StorageSection(endpoint_url=proxy.url))

        assert storage.read_bytes(uri) == body
        assert proxy.injected["cut_get"] == 2 and proxy.requests["GET"] == 3, "cut twice, whole on the third GET"
        proxy.faults = [Fault("cut_get", method="GET", path="/cut/", at=(1,))]
        assert storage.read_range(uri, 1000, 50_000) == body[1000:51_000]
        assert proxy.injected["cut_get"] == 3

        # Cut on every try: an error naming the object, never the bytes that did arrive.
        proxy.faults = [Fault("cut_get", method="GET", path="/cut/", every=1)]
        before = proxy.requests["GET"]
        with pytest.raises(StorageError, match=f"cannot read {uri}: its body was cut off on 4 tries"):
            storage.read_bytes(uri)
        assert proxy.requests["GET"] - before == storage_module.BODY_ATTEMPTS == 4

        # Negative controls: the same cut, botocore alone and read_bytes without its retries, fails.
        proxy.faults = [Fault("cut_get", method="GET", path="/cut/", at=(1,))]
        answer = storage.client.get_object(Bucket=bucket, Key="cut/object.bin")
        with pytest.raises(ResponseStreamingError, match="IncompleteRead"):
            answer["Body"].read()
        monkeypatch.setattr(storage_module, "BODY_ATTEMPTS", 1)
        for read in (lambda: storage.read_bytes(uri), lambda: storage.read_range(uri, 10, 20_000)):
            proxy.faults = [Fault("cut_get", method="GET", path="/cut/", at=(1,))]
            with pytest.raises(StorageError, match="cut off"):
                read()
        assert proxy.injected["cut_get"] == 3 + 4 + 3


def test_s3_check_writable_leaves_nothing(s3_storage, bucket):
    s3_storage.check_writable(f"s3://{bucket}/run")
    assert s3_storage.list(f"s3://{bucket}/run") == []


def test_s3_missing_bucket(s3_storage, s3_credentials):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"

    with pytest.raises(StorageError, match="no such bucket") as caught:
        s3_storage.write_bytes(join(uri, "x.json"), b"{}")
    assert uri in str(caught.value)
    with pytest.raises(StorageError, match="no such bucket"):
        s3_storage.check_writable(uri)
    with pytest.raises(StorageError, match="no such bucket"):
        s3_storage.list(uri)
    assert s3_credentials["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)


def test_s3_unreachable_endpoint_fails_fast_in_one_line(s3_credentials):
    storage = Storage(StorageSection(endpoint_url="http://127.0.0.1:9"))
    started = time.monotonic()

    with pytest.raises(StorageError) as caught:
        storage.check_writable("s3://bucket/run")

    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "cannot reach the S3 endpoint" in message and "http://127.0.0.1:9" in message
    assert len(message.splitlines()) == 1
    assert s3_credentials["AWS_SECRET_ACCESS_KEY"] not in message
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        storage.exists("s3://bucket/run/x")


def test_s3_storage_survives_a_pickle_round_trip(s3_storage, bucket):
    s3_storage.write_bytes(f"s3://{bucket}/p.bin", b"before")
    assert s3_storage._client is not None

    copy = pickle.loads(pickle.dumps(s3_storage))

    assert copy.section == s3_storage.section and copy._client is None
    assert copy.read_bytes(f"s3://{bucket}/p.bin") == b"before"
    copy.write_bytes(f"s3://{bucket}/p.bin", b"after")
    assert s3_storage.read_bytes(f"s3://{bucket}/p.bin") == b"after"



@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_exclusive_writes_once_and_iter_objects_pages_with_versions(where, request, tmp_path):
    if where == "s3":
        storage, bucket = request.getfixturevalue("s3_storage"), request.getfixturevalue("bucket")
        root = f"s3://{bucket}/out"
    else:
        storage, root = Storage(), str(tmp_path / "out")
    assert storage.create_exclusive(f"{root}/_lock", b"first")
    assert not storage.create_exclusive(f"{root}/_lock", b"second"), "a second writer is refused"
    assert storage.read_bytes(f"{root}/_lock") == b"first"
    storage.delete(f"{root}/_lock")
    assert storage.create_exclusive(f"{root}/_lock", b"third")

    for index in range(3):
        storage.write_bytes(f"{root}/items/{index}.bin", bytes(index + 1))
    listed = list(storage.iter_objects(f"{root}/items"))
    assert [(uri.rsplit("/", 1)[1], size) for uri, size, _ in listed] == [("0.bin", 1), ("1.bin", 2), ("2.bin", 3)]
    versions = {uri: version for uri, _, version in listed}
    storage.write_bytes(f"{root}/items/1.bin", b"edited")
    if where == "local":
        time.sleep(0.01)
    again = {uri: version for uri, _, version in storage.iter_objects(f"{root}/items")}
    assert again[listed[1][0]] != versions[listed[1][0]] and again[listed[0][0]] == versions[listed[0][0]]
    # A consumer that stops early is not a storage error (the generator is closed at a yield).
    objects = storage.iter_objects(f"{root}/items")
    next(objects)
    objects.close()
