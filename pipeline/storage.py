"""One storage layer over URIs: a local folder (the embedded default) or s3://bucket/prefix (boto3).

Every write is a commit: local files are written beside their target and renamed into place, S3 objects
appear whole on PUT, or on completing a multipart upload (bodies over `multipart_chunk_mb`). Stages talk to
each other only through this layer, which is what makes skip, resume and cluster runs work the same on a
laptop and on a bucket.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from atoken.pipeline.config import StorageSection


class StorageError(RuntimeError):
    """A storage failure with one line that says what and where (never which credentials). `permanent`: the
    object is not there or not ours to read (no such key or bucket, access denied), so retrying cannot help."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


# Tries of an S3 GET whose body is cut mid-way, and the first backoff (doubled after each try). A streaming read
# (open_read) counts only the tries in a row that brought no new byte.
BODY_ATTEMPTS = 4
BODY_BACKOFF_S = 0.2


def _body_errors() -> tuple[type[BaseException], ...]:
    """What reading a cut body raises: botocore's wrappers (ResponseStreamingError around urllib3's
    ProtocolError, IncompleteReadError when fewer bytes than Content-Length arrived, ReadTimeoutError) and the
    unwrapped ones, should a path not wrap them."""
    import http.client

    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as URLLib3ReadTimeoutError

    return (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, ProtocolError, URLLib3ReadTimeoutError,
            http.client.IncompleteRead, ConnectionError)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    base = uri.rstrip("/")
    for part in parts:
        base = f"{base}/{part.strip('/')}"
    return base


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


class Storage:
    """Reads and writes URIs. Picklable (the boto3 client is rebuilt in each process), so Ray tasks
    get a copy of the driver's storage settings without credentials travelling with it."""

    def __init__(self, section: StorageSection | None = None):
        self.section = section or StorageSection()
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"section": self.section}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.section = state["section"]
        self._client = None

    @property
    def endpoint_url(self) -> str | None:
        return self.section.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.section.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=Config(
                    connect_timeout=self.section.connect_timeout_s,
                    read_timeout=self.section.read_timeout_s,
                    retries={"total_max_attempts": self.section.max_attempts, "mode": "standard"},
                ),
            )
        return self._client

    @property
    def transfer_config(self):
        """boto3's managed transfer: multipart (and parallel parts) for objects over one part."""
        from boto3.s3.transfer import TransferConfig

        part = self.section.multipart_chunk_mb * 1024 * 1024
        return TransferConfig(multipart_threshold=part, multipart_chunksize=part)

    # -- reads -----------------------------------------------------------------------------------

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object. `max_bytes`: refuse (permanently) an object larger than that, from its
        Content-Length, before its body is read."""
        if is_s3(uri):
            return self._get_body(uri, max_bytes=max_bytes)
        try:
            return local_path(uri).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        """`length` bytes from `start`: one ranged GET on S3, so a reader fetches only the part it needs."""
        if length == 0:
            return b""
        if is_s3(uri):
            data = self._get_body(uri, Range=f"bytes={start}-{start + length - 1}")
        else:
            try:
                with open(local_path(uri), "rb") as handle:
                    handle.seek(start)
                    data = handle.read(length)
            except OSError as exc:
                raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc
        if len(data) != length:
            raise StorageError(f"{uri}: asked for {length} bytes at {start}, got {len(data)} (truncated object)")
        return data

    def _get_body(self, uri: str, max_bytes: int | None = None, **extra: Any) -> bytes:
        """One GET's whole body. botocore retries a request that fails, not the reading of a body cut mid-way
        (the connection closed after the headers): that is retried here, BODY_ATTEMPTS tries with backoff
        (0.2 s, 0.4 s, 0.8 s), and a body shorter than its Content-Length is never returned."""
        bucket, key = split_s3(uri)
        cut_errors = _body_errors()
        for attempt in range(1, BODY_ATTEMPTS + 1):
            with self._s3_errors(uri):
                answer = self.client.get_object(Bucket=bucket, Key=key, **extra)
            expected = answer.get("ContentLength")
            if max_bytes is not None and expected is not None and expected > max_bytes:
                answer["Body"].close()
                raise StorageError(f"{uri}: {expected:,} bytes, over the {max_bytes:,}-byte cap (max_item_mb)",
                                   permanent=True)
            try:
                data = answer["Body"].read()
                if expected is None or len(data) == expected:
                    return data
                problem = "a short body"
            except cut_errors as exc:
                problem = type(exc).__name__
            finally:
                answer["Body"].close()
            if attempt < BODY_ATTEMPTS:
                time.sleep(BODY_BACKOFF_S * 2 ** (attempt - 1))
        # No byte counts in the line: callers classify failures by the codes a message names.
        raise StorageError(f"cannot read {uri}: its body was cut off on {BODY_ATTEMPTS} tries (last: {problem})")

    def open_read(self, uri: str) -> BinaryIO:
        """A streaming reader: the whole object is never held in memory. On S3 a body cut mid-way is resumed from
        the byte it stopped at (see _S3ObjectReader), and a read that cannot be completed raises StorageError:
        it never ends early."""
        if is_s3(uri):
            return io.BufferedReader(_S3ObjectReader(self, uri))
        try:
            return open(local_path(uri), "rb")
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            from botocore.exceptions import ClientError

            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise self._translate(uri, exc) from exc
            except Exception as exc:  # noqa: BLE001 - connection errors become one clear line
                raise self._translate(uri, exc) from exc
        return local_path(uri).exists()

    def list(self, prefix: str) -> list[str]:
        """Every object under a folder URI, recursively, as full URIs in sorted order."""
        if is_s3(prefix):
            bucket, key = split_s3(prefix.rstrip("/") + "/")
            found: list[str] = []
            with self._s3_errors(prefix):
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                    found.extend(f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", []))
            return sorted(found)
        root = local_path(prefix)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name)

    def iter_objects(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(URI, size, version) of every object under a folder URI, a listing page (1,000 keys) at a time, so a
        10M-object prefix is never held whole. The version says when the bytes changed: the ETag on S3,
        "size:mtime_ns" locally. Key order on S3; locally, name order within each folder."""
        if is_s3(prefix):
            bucket, key = split_s3(prefix.rstrip("/") + "/")
            with self._s3_errors(prefix):
                pages = iter(self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key))
            while True:
                # Only the page fetch is guarded: a consumer that stops early closes this generator at a
                # yield, and that must not read as a storage error.
                with self._s3_errors(prefix):
                    page = next(pages, None)
                if page is None:
                    return
                for item in page.get("Contents", []):
                    yield f"s3://{bucket}/{item['Key']}", item["Size"], item["ETag"].strip('"')
        root = local_path(prefix)

        def unreadable(error: OSError) -> None:
            if isinstance(error, FileNotFoundError) and Path(error.filename) == root:
                return  # no folder: nothing under it
            raise StorageError(f"cannot list {error.filename}: {error.strerror or error}")

        for folder, folders, files in os.walk(root, onerror=unreadable):
            folders.sort()
            for name in sorted(files):
                if ".tmp-" in name:
                    continue
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # deleted while listing
                yield str(path), stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}"

    def local_copy(self, uri: str) -> LocalCopy:
        """A local path holding the object's bytes (the file itself when local, a download otherwise), for
        readers that need a seekable file (parquet, CSV); use as a context manager to remove the download."""
        if not is_s3(uri):
            path = local_path(uri)
            if not path.is_file():
                raise StorageError(f"cannot read {uri}: no such file")
            return LocalCopy(path, None)
        staging = LocalStaging()
        return LocalCopy(self.download(uri, staging.path / Path(split_s3(uri)[1]).name), staging)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Write `data` only if nothing is at `uri` yet; False when something is (S3: a conditional PUT,
        If-None-Match: *; locally: O_CREAT | O_EXCL). The primitive under a run lock."""
        if is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = split_s3(uri)
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                 "ConditionalRequestConflict"):
                    return False
                raise self._translate(uri, exc) from exc
            except Exception as exc:  # noqa: BLE001 - connection errors become one clear line
                raise self._translate(uri, exc) from exc
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written whole beside it, then hard-linked into place (link fails if the name exists): a reader never
        # finds it empty, whatever instant the writer is killed at.
        tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    # -- writes ----------------------------------------------------------------------------------

    def write_bytes(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                if len(data) > self.section.multipart_chunk_mb * 1024 * 1024:
                    self.client.upload_fileobj(io.BytesIO(data), bucket, key, Config=self.transfer_config)
                else:
                    self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        target = local_path(uri)
        self._commit_local(target, lambda tmp: tmp.write_bytes(data))

    def write_json(self, uri: str, value: Any) -> None:
        self.write_bytes(uri, json.dumps(value, indent=2, sort_keys=True).encode())

    def upload(self, source: str | Path, uri: str) -> None:
        """Copy a finished local file to its URI as one commit."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                self.client.upload_file(str(source), bucket, key, Config=self.transfer_config)
            return
        self._commit_local(local_path(uri), lambda tmp: shutil.copyfile(source, tmp))

    def move_into(self, source: str | Path, uri: str) -> None:
        """Commit a finished local file to its URI and remove the local one: a rename when both are on one
        local file system (no second copy of a shard), an upload otherwise."""
        source = Path(source)
        if not is_s3(uri):
            target = local_path(uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(source, target)
                return
            except OSError:
                pass  # another file system: copy, then remove
        self.upload(source, uri)
        source.unlink(missing_ok=True)

    @contextlib.contextmanager
    def staged_file(self, uri: str) -> Iterator[Path]:
        """A local path to write a file at, committed to `uri` as one commit when the block ends cleanly.

        For a local `uri` the file is written beside its target and renamed into place (no second copy of
        what may be gigabytes); for S3 it is written to a temp folder and uploaded. On an exception nothing
        is committed and the file is removed.
        """
        if is_s3(uri):
            with LocalStaging() as staging:
                path = staging / uri.rsplit("/", 1)[-1]
                yield path
                self.upload(path, uri)
            return
        target = local_path(uri)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
        tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            yield tmp
            self._commit_local(target, lambda _: None, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def copy(self, source: str, uri: str) -> None:
        """Copy an object to another URI of the same store as one commit, without its bytes passing through
        this process where the store allows: a hard link locally (objects are never changed in place, only
        replaced, so sharing the inode is safe), a server-side copy on S3."""
        if is_s3(source) != is_s3(uri):
            raise StorageError(f"cannot copy {source} to {uri}: one is on S3, the other not")
        if is_s3(uri):
            source_bucket, source_key = split_s3(source)
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                # The managed copy: multipart for objects over 5 GB, which a single CopyObject refuses.
                self.client.copy({"Bucket": source_bucket, "Key": source_key}, bucket, key)
            return
        target = local_path(uri)

        def link_or_copy(tmp: Path) -> None:
            try:
                os.link(local_path(source), tmp)
            except OSError:  # another file system, or one without hard links
                shutil.copyfile(local_path(source), tmp)
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())

        # A link's bytes are the source's, synced when it was committed: only a real copy needs an fsync.
        self._commit_local(target, link_or_copy, sync=False)

    def size(self, uri: str) -> int:
        """Bytes of an object."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        try:
            return local_path(uri).stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc

    def download(self, uri: str, target: str | Path) -> Path:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                self.client.download_file(bucket, key, str(target), Config=self.transfer_config)
        else:
            shutil.copyfile(local_path(uri), target)
        return target

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                self.client.delete_object(Bucket=bucket, Key=key)
            return
        local_path(uri).unlink(missing_ok=True)

    def delete_folder(self, uri: str) -> None:
        """Everything under a folder URI; a missing folder is not an error."""
        if is_s3(uri):
            bucket, _ = split_s3(uri)
            keys = [split_s3(found)[1] for found in self.list(uri)]
            with self._s3_errors(uri):
                for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
                    answer = self.client.delete_objects(Bucket=bucket, Delete={
                        "Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True})
                    if answer.get("Errors"):
                        failed = answer["Errors"][0]
                        raise StorageError(f"cannot delete s3://{bucket}/{failed['Key']}: {failed.get('Code', '?')}")
            return
        try:
            shutil.rmtree(local_path(uri))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {exc.strerror or exc}") from exc

    def check_writable(self, root: str) -> None:
        """Fail in seconds, with one line, when the run root cannot be written (before any work)."""
        probe = join(root, "_state", f".probe-{uuid.uuid4().hex}")
        self.write_bytes(probe, b"ok")
        if self.read_bytes(probe) != b"ok":
            raise StorageError(f"{root}: a probe object read back different bytes")
        self.delete(probe)

    # -- internals -------------------------------------------------------------------------------

    def _commit_local(self, target: Path, write, tmp: Path | None = None, sync: bool = True) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp or target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
            try:
                write(tmp)
                if sync:
                    with open(tmp, "rb+") as handle:
                        os.fsync(handle.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc

    def _s3_errors(self, uri: str):
        storage = self

        class _Guard:
            def __enter__(self):
                return self

            def __exit__(self, kind, exc, tb):
                if exc is not None and not isinstance(exc, StorageError):
                    raise storage._translate(uri, exc) from exc
                return False

        return _Guard()

    def _translate(self, uri: str, exc: BaseException) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"{uri} (endpoint {self.endpoint_url or 'AWS default'})"
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            return StorageError(f"cannot reach the S3 endpoint for {where}")
        if isinstance(exc, ReadTimeoutError):
            return StorageError(f"S3 read timed out for {where}")
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"no S3 credentials found for {where} (set AWS_* or ~/.aws)")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(f"access denied ({code}) to {where}", permanent=True)
            if code in ("NoSuchBucket",):
                return StorageError(f"no such bucket for {where}", permanent=True)
            if code in ("404", "NoSuchKey", "NotFound"):
                return StorageError(f"no such object {uri}", permanent=True)
            return StorageError(f"S3 error {code} for {where}")
        return StorageError(f"storage error for {where}: {type(exc).__name__}: {exc}")


class _S3ObjectReader(io.RawIOBase):
    """One S3 object's body as a stream that outlives a cut connection. botocore retries a GET that fails (5xx,
    503 SlowDown), not the reading of a body cut after its headers, and its StreamingBody raises mid-read (the
    IncompleteReadError that stopped training behind a proxy cutting 10% of GETs, issue 19). This reader keeps its
    byte offset, the first answer's Content-Length and ETag, and on a cut (an error of _body_errors(), or the
    body ending before the object's size) asks again for the rest, `Range: bytes=<offset>-` and If-Match the
    ETag: a replaced object fails that GET (412) and raises a permanent StorageError, so the bytes read are one
    version of the object, never two stitched together. BODY_ATTEMPTS tries in a row that bring no new byte, with
    backoff, then a StorageError; a try that brings bytes starts the count again, so a long read with the odd cut
    completes."""

    def __init__(self, storage: Storage, uri: str):
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._offset = 0
        self._failures = 0  # tries in a row that brought no new byte
        self._body = None  # before the first GET, which may raise: close() (run by __del__ too) reads it
        answer = self._get()
        self._size: int = answer["ContentLength"]
        self._etag: str | None = answer.get("ETag")
        self._body = answer["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        from botocore.exceptions import FlexibleChecksumError

        while len(buffer) > 0 and self._body is not None:
            problem = "the body ended before its Content-Length"
            try:
                count = self._body.readinto(buffer)
            except _body_errors() as exc:
                count, problem = 0, type(exc).__name__
            except FlexibleChecksumError as exc:
                raise StorageError(f"cannot read {self._uri}: its bytes do not match the checksum S3 sent") from exc
            if count:
                self._offset += count
                self._failures = 0
                return count
            if self._offset >= self._size:  # the object's end, read up to the body's own: botocore checked it there
                self._close_body()
                return 0
            self._resume(problem)
        return 0

    def close(self) -> None:
        self._close_body()
        super().close()

    def _resume(self, problem: str) -> None:
        """A GET for the rest of the object from the current offset, after backoff; raises when BODY_ATTEMPTS
        tries in a row have brought nothing."""
        self._close_body()
        if self._etag is None:  # nothing to hold the rest to the same version: never stitch
            raise StorageError(f"cannot read {self._uri}: its body was cut off ({problem}) and it has no ETag to "
                               "resume it by")
        while True:
            self._failures += 1
            if self._failures >= BODY_ATTEMPTS:
                # No byte counts in the line: callers classify failures by the codes a message names.
                raise StorageError(f"cannot read {self._uri}: its body was cut off on {BODY_ATTEMPTS} tries in a "
                                   f"row (last: {problem})")
            time.sleep(BODY_BACKOFF_S * 2 ** (self._failures - 1))
            try:
                answer = self._get(Range=f"bytes={self._offset}-", IfMatch=self._etag)
            except StorageError as exc:
                if exc.permanent:
                    raise
                problem = str(exc)  # botocore's own retries of this GET were spent: one more try of ours
                continue
            if answer.get("ETag") != self._etag:  # a store that ignores If-Match
                answer["Body"].close()
                raise self._changed()
            if not answer.get("ContentRange", "").startswith(f"bytes {self._offset}-"):
                answer["Body"].close()
                raise StorageError(f"cannot read {self._uri}: a resumed GET did not answer the range it asked for")
            self._body = answer["Body"]
            return

    def _get(self, **extra: Any) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(self._uri)
        with self._storage._s3_errors(self._uri):
            try:
                return self._storage.client.get_object(Bucket=bucket, Key=key, **extra)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                    raise self._changed() from exc
                raise

    def _changed(self) -> StorageError:
        return StorageError(f"cannot read {self._uri}: the object changed while it was read (its ETag no longer "
                            "matches), so its rest was not read", permanent=True)

    def _close_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None


def register_webdataset_opener(storage: Storage) -> None:
    """webdataset has no s3:// opener: route its reads of s3:// URLs through this storage."""
    from webdataset.gopen import gopen_schemes

    def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
        if mode != "rb":
            raise ValueError("shards are written locally and committed with Storage.upload")
        return storage.open_read(url)

    gopen_schemes["s3"] = open_s3


class LocalCopy:
    """A local file with an object's bytes; removes its download (if any) when the block ends."""

    def __init__(self, path: Path, staging: LocalStaging | None):
        self.path = path
        self.staging = staging

    def __enter__(self) -> LocalCopy:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.staging is not None:
            self.staging.__exit__()


class LocalStaging:
    """A local temp folder for files about to be committed to storage (e.g. a tar being written)."""

    def __init__(self, parent: str | Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix="atoken-", dir=parent))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
