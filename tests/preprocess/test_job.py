"""preprocess/job.py end to end on a local Ray: every current item exactly once while the sources gain, lose and
edit files between runs; the same bytes after a real SIGKILL and a rerun; failures retried only when they can
pass; other settings refused; a part that fails is recorded while the others commit."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atoken.pipeline.config import IngestSection, SourceSection
from atoken.pipeline.storage import Storage, StorageError
from atoken.preprocess.job import IngestError, OutputMismatch, RunLock, list_items, run_image_job
from atoken.preprocess.sources import list_fashion_mnist, read_item_bytes
from atoken.preprocess.writer import MAX_ATTEMPTS

from helpers import shard_members

PER_PART = 4


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def image_folder(root: Path, count: int, bad: dict[int, bytes] | None = None) -> Path:
    """`count` real Fashion-MNIST photos as PNG files; the indices in `bad` hold those bytes instead."""
    bad = bad or {}
    root.mkdir(parents=True)
    for index, item in enumerate(list_fashion_mnist(count)):
        (root / f"img{index:03d}.png").write_bytes(bad.get(index, read_item_bytes(item.locator)))
    return root


def section_for(*folders: Path, resolution: int = 16) -> IngestSection:
    return IngestSection(sources=[SourceSection(kind="folder", path=str(f)) for f in folders],
                         resolution=resolution, samples_per_shard=PER_PART, val_every=5, parallelism=2)


def manifest(output: Path) -> list[dict]:
    return pq.read_table(output / "manifest.parquet").to_pylist()


def shard_files(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes()
            for folder in ("shards", "manifests") for p in sorted((output / folder).iterdir())}


def samples_on_disk(output: Path) -> dict[str, bytes]:
    """key → PNG bytes of every sample in every tar under shards/ (a key twice fails the test)."""
    return shard_members(output, "png")


def key_of(folder: Path, name: str, section: IngestSection) -> str:
    return next(item.key for item in list_items(section) if item.locator == str(folder / name))


def assert_exactly_once(output: Path, section: IngestSection, bad_names: set[str]) -> None:
    """Every current good file once in the manifest and in the shards, nothing else; every bad one an error."""
    items = list_items(section)
    good = {i.key for i in items if Path(i.locator).name not in bad_names}
    rows = manifest(output)
    assert sorted(r["key"] for r in rows) == sorted(good)
    on_disk = samples_on_disk(output)
    assert set(on_disk) == good
    assert {r["key"]: r["sha256"] for r in rows} == {k: hashlib.sha256(v).hexdigest() for k, v in on_disk.items()}
    errors = pq.read_table(output / "errors.parquet").to_pylist()
    assert sorted(r["key"] for r in errors) == sorted(i.key for i in items if Path(i.locator).name in bad_names)
    # Nothing the records do not name: no orphan shard, manifest or staging file.
    named = {r["shard"] for r in rows}
    assert {p.stem for p in (output / "shards").glob("*.tar")} == named
    assert {p.stem for p in (output / "manifests").glob("*.parquet")} == named
    assert not (output / "_staging").exists() or not any((output / "_staging").iterdir())


def test_sources_that_gain_lose_and_edit_files_land_every_current_file_exactly_once(local_ray, tmp_path):
    folder = image_folder(tmp_path / "in", 40, {5: b"not an image"})
    section, output = section_for(folder), tmp_path / "out"
    first = run_image_job(section, Storage(), str(output), progress=False)
    assert first["items"] == 40 and first["samples"] == 39 and first["failures_permanent"] == 1
    assert_exactly_once(output, section, {"img005.png"})
    before = shard_files(output)
    edited_key = key_of(folder, "img010.png", section)

    # Two files whose names sort first (the positional plan lost two images here), two removed, one edited.
    photos = list_fashion_mnist(60)
    (folder / "aaa0.png").write_bytes(read_item_bytes(photos[50].locator))
    (folder / "aaa1.png").write_bytes(read_item_bytes(photos[51].locator))
    (folder / "img003.png").unlink()
    (folder / "img020.png").unlink()
    (folder / "img010.png").write_bytes(read_item_bytes(photos[52].locator))
    second = run_image_job(section, Storage(), str(output), progress=False)

    assert_exactly_once(output, section, {"img005.png"})
    assert second["items"] == 40 - 2 + 2 and second["samples"] == second["items"] - 1
    # Only what changed was made; the bad file was not tried again; unchanged neighbours were copied.
    assert second["items_made"] == 3 and second["failures_permanent"] == 1
    touched = second["parts"] - second["parts_skipped"]
    assert 1 <= touched <= 5 and second["items_reused"] > 0
    after = shard_files(output)
    assert len(set(before) & set(after)) >= len(before) - 2 * touched, "untouched parts' shards stay as they were"
    edited = next(r for r in manifest(output) if r["key"] == edited_key)
    new_png = samples_on_disk(output)[edited_key]
    assert edited["sha256"] == hashlib.sha256(new_png).hexdigest()
    assert new_png != dict(samples_on_disk_from(before))[edited_key], "the edit reached the sample"

    third = run_image_job(section, Storage(), str(output), progress=False)
    assert third["parts_skipped"] == third["parts"] and third["items_made"] == 0
    assert shard_files(output) == after


def samples_on_disk_from(files: dict[str, bytes]):
    for name, data in files.items():
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".png"):
                        yield member.name.split(".", 1)[0], tar.extractfile(member).read()


def test_growing_past_the_part_count_re_cuts_the_parts_without_decoding_anything_again(local_ray, tmp_path):
    folder = image_folder(tmp_path / "in", 12)
    section, output = section_for(folder), tmp_path / "out"
    first = run_image_job(section, Storage(), str(output), progress=False)
    photos = list_fashion_mnist(60)
    for index in range(12, 60):
        (folder / f"img{index:03d}.png").write_bytes(read_item_bytes(photos[index].locator))

    second = run_image_job(section, Storage(), str(output), progress=False)

    parts = sorted(p.stem for p in (output / "parts").glob("*.parquet"))
    assert second["parts"] > first["parts"] and len(parts) == second["parts"], "old records are gone"
    assert len({name.rsplit("-of-", 1)[1] for name in parts if name.startswith("train")}) == 1
    assert second["items_made"] == 48 and second["items_reused"] == 12
    assert_exactly_once(output, section, set())


def test_two_folders_with_one_layout_do_not_collide(local_ray, tmp_path):
    a, b = image_folder(tmp_path / "a", 6), image_folder(tmp_path / "b", 6)
    stats = run_image_job(section_for(a, b), Storage(), str(tmp_path / "out"), progress=False)
    assert stats["samples"] == 12 and len({r["key"] for r in manifest(tmp_path / "out")}) == 12


def test_the_same_images_from_another_folder_keep_the_evaluation_data_identity(local_ray, tmp_path):
    """Evaluation protocols name their data by content (evaluate/protocols.py DataIdentity): the same files at
    another path (other keys, other source paths in the samples' json) are the same data; one edited file is not."""
    from atoken.evaluate.protocols import DataIdentity
    from atoken.pipeline.storage import Storage as Store
    from atoken.train.data import shard_samples

    folders = [image_folder(tmp_path / "a", 6), image_folder(tmp_path / "mnt" / "b", 6)]
    folders.append(image_folder(tmp_path / "c", 6, bad={2: image_variant(folders[0] / "img002.png")}))
    identities, keys = [], []
    for index, folder in enumerate(folders):
        output = tmp_path / f"out{index}"
        run_image_job(section_for(folder), Store(), str(output), progress=False)
        identity, found = DataIdentity(), set()
        for tar in sorted((output / "shards").glob("*.tar")):
            for sample in shard_samples(Store(), str(tar)):
                identity.add(sample)
                found.add(sample["__key__"])
        identities.append(identity.digest())
        keys.append(found)
    assert not keys[0] & keys[1], "the control: other keys, and other source paths in every sample's json"
    assert identities[0] == identities[1] and identities[0].startswith("6 samples")
    assert identities[2] != identities[0], "one edited image is other data"


def image_variant(path: Path) -> bytes:
    """The image with one pixel changed, as PNG."""
    from PIL import Image

    pixels = np.array(Image.open(path))
    pixels.flat[0] ^= 1
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


INGEST_SCRIPT = """
import sys, ray
from atoken.pipeline.config import IngestSection, SourceSection
from atoken.pipeline.storage import Storage
from atoken.preprocess.job import run_image_job
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
section = IngestSection(sources=[SourceSection(kind="folder", path=sys.argv[1])], resolution=16,
                        samples_per_shard=4, val_every=5, parallelism=1)
run_image_job(section, Storage(), sys.argv[2], progress=False)
"""


def test_a_sigkill_mid_ingest_then_a_rerun_gives_the_bytes_of_an_uninterrupted_run(local_ray, tmp_path):
    folder = image_folder(tmp_path / "in", 60, {7: b""})
    section = section_for(folder)
    clean = tmp_path / "clean"
    run_image_job(section, Storage(), str(clean), progress=False)

    killed = tmp_path / "killed"
    # A real driver with its own Ray, killed (its whole process group) once a few parts are committed.
    process = subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT, str(folder), str(killed)],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "parts").glob("*.parquet"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    committed = len(list((killed / "parts").glob("*.parquet")))
    assert 3 <= committed < 16, "killed mid-job"
    assert (killed / "_lock").exists(), "the killed driver held the lock"

    stats = run_image_job(section, Storage(), str(killed), progress=False)  # takes over the dead driver's lock

    assert stats["parts_skipped"] >= 3
    assert shard_files(killed) == shard_files(clean), "the same shards, byte for byte, in another output"
    assert manifest(killed) == manifest(clean)
    assert_exactly_once(killed, section, {"img007.png"})
    assert not (killed / "_lock").exists()


class FlakyServer:
    """Images over HTTP on loopback: some paths fail with 503 for their first `flaky` requests, some are 404."""

    def __init__(self, photos: dict[str, bytes], flaky: dict[str, int], missing: set[str]):
        self.photos, self.flaky, self.missing = photos, dict(flaky), missing
        self.requests: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                name = self.path.lstrip("/")
                server.requests[name] = server.requests.get(name, 0) + 1
                if name in server.missing:
                    self.send_error(404)
                elif server.flaky.get(name, 0) > 0:
                    server.flaky[name] -= 1
                    self.send_error(503)
                else:
                    body = server.photos[name]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


def test_transient_failures_are_retried_permanent_ones_never_and_good_items_are_not_made_again(local_ray, tmp_path):
    photos = {f"p{i}.png": read_item_bytes(item.locator) for i, item in enumerate(list_fashion_mnist(12))}
    photos["corrupt.png"] = b"\x89PNG\r\n\x1a\n" + bytes(100)
    # p1 fails twice then works (within one run's retries); p2 fails for the whole first run (3 tries) and the
    # first try of the second; p3 is a 404 and corrupt.png is not an image (permanent: never asked for again).
    server = FlakyServer(photos, {"p1.png": 2, "p2.png": 4}, {"p3.png"})
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.Table.from_pylist([{"url": f"{server.url}/{name}", "caption": name} for name in photos]),
                   listing)
    section = IngestSection(sources=[SourceSection(kind="list", path=str(listing))], resolution=16,
                            samples_per_shard=PER_PART, val_every=5)
    output = tmp_path / "out"

    first = run_image_job(section, Storage(), str(output), progress=False)

    keys = {r["caption"] for r in manifest(output)}
    assert "p1.png" in keys and "p2.png" not in keys and first["retryable"] == 1
    errors = {r["locator"].rsplit("/", 1)[1]: r for r in pq.read_table(output / "errors.parquet").to_pylist()}
    assert {name: (r["kind"], r["attempts"]) for name, r in errors.items()} == {
        "p2.png": ("transient", 1), "p3.png": ("permanent", 1), "corrupt.png": ("permanent", 1)}
    assert server.requests["p1.png"] == 3 and server.requests["p2.png"] == 3 and server.requests["p3.png"] == 1
    requests_before = dict(server.requests)

    second = run_image_job(section, Storage(), str(output), progress=False)

    assert second["items_made"] == 1 and second["retryable"] == 0 and "p2.png" in {r["caption"] for r in
                                                                                     manifest(output)}
    changed = {n for n in server.requests if server.requests[n] != requests_before.get(n)}
    assert changed == {"p2.png"}, "only the transient failure was asked for again"
    assert second["samples"] == 11 and second["failures"] == 2

    third = run_image_job(section, Storage(), str(output), progress=False)
    assert third["parts_skipped"] == third["parts"] and server.requests == {**requests_before, "p2.png": 5}


def test_a_transient_failure_is_given_up_after_max_attempts_runs(local_ray, tmp_path):
    server = FlakyServer({"p0.png": read_item_bytes(list_fashion_mnist(1)[0].locator)}, {"p0.png": 10 ** 6}, set())
    listing = tmp_path / "list.csv"
    listing.write_text(f"url\n{server.url}/p0.png\n")
    section = IngestSection(sources=[SourceSection(kind="list", path=str(listing))], resolution=16)
    output = tmp_path / "out"
    for run in range(1, MAX_ATTEMPTS + 1):
        stats = run_image_job(section, Storage(), str(output), progress=False)
        assert stats["retryable"] == (0 if run == MAX_ATTEMPTS else 1)
        assert (stats["items_made"], stats["items_landed"]) == (1, 0), "tried again, and failed again"
    asked = server.requests["p0.png"]
    stats = run_image_job(section, Storage(), str(output), progress=False)
    assert stats["parts_skipped"] == stats["parts"] and server.requests["p0.png"] == asked


def test_other_settings_are_refused_naming_the_setting_and_redo_rebuilds(local_ray, tmp_path):
    folder = image_folder(tmp_path / "in", 8)
    output = tmp_path / "out"
    run_image_job(section_for(folder), Storage(), str(output), progress=False)

    with pytest.raises(OutputMismatch, match="made with resolution=16, this run asks for resolution=32"):
        run_image_job(section_for(folder, resolution=32), Storage(), str(output), progress=False)
    assert {r["width"] for r in manifest(output)} == {16}, "the refusal changed nothing"

    stats = run_image_job(section_for(folder, resolution=32), Storage(), str(output), progress=False, redo=True)
    assert stats["items_made"] == 8 and {r["width"] for r in manifest(output)} == {32}
    assert {p.stem for p in (output / "shards").glob("*.tar")} == {r["shard"] for r in manifest(output)}


def test_a_redo_whose_listing_fails_part_way_leaves_out_as_it_was(local_ray, tmp_path, monkeypatch):
    """--redo empties OUT only once the whole listing is in: a source that breaks after a few items (a corrupt
    metadata file deep in a mirror) stops the job and OUT keeps its samples."""
    from atoken.preprocess import job

    folder = image_folder(tmp_path / "in", 8)
    output = tmp_path / "out"
    run_image_job(section_for(folder), Storage(), str(output), progress=False)
    before = shard_files(output), manifest(output), (output / "_ingest.json").read_bytes()
    listed = job.iter_items

    def breaking(section, storage):
        for index, item in enumerate(listed(section, storage)):
            if index == 3:
                raise OSError("metadata/000-159.json.gz: not a gzipped file")
            yield item

    monkeypatch.setattr(job, "iter_items", breaking)
    with pytest.raises(OSError, match="not a gzipped file"):
        run_image_job(section_for(folder, resolution=32), Storage(), str(output), progress=False, redo=True)
    assert (shard_files(output), manifest(output), (output / "_ingest.json").read_bytes()) == before

    monkeypatch.setattr(job, "iter_items", listed)  # control: the same redo with a whole listing rebuilds
    run_image_job(section_for(folder, resolution=32), Storage(), str(output), progress=False, redo=True)
    assert {r["width"] for r in manifest(output)} == {32}


def test_encoding_and_quality_are_recorded_so_a_change_is_refused_and_redo_rebuilds(local_ray, tmp_path):
    """ingest.encoding/quality shape every training sample: a rerun asking for others refuses, naming the setting;
    an output made before they existed (PNG) still matches its own settings."""
    folder = image_folder(tmp_path / "in", 20)
    output = tmp_path / "out"
    native = dataclasses.replace(section_for(folder), resolution=None, max_resolution=20)
    run_image_job(native, Storage(), str(output), progress=False)
    assert {(r["width"], r["height"]) for r in manifest(output)} == {(20, 20)}, "28 px capped at 20, in the manifest"
    assert "encoding" not in json.loads((output / "_ingest.json").read_text())["settings"], "PNG: as before"

    jpeg = dataclasses.replace(native, encoding="jpg", quality=95)
    with pytest.raises(OutputMismatch, match="made with encoding=None, this run asks for encoding=jpg"):
        run_image_job(jpeg, Storage(), str(output), progress=False)
    stats = run_image_job(jpeg, Storage(), str(output), progress=False, redo=True)
    assert stats["items_made"] == 20
    extensions = {split: set() for split in ("train", "val")}
    for path in (output / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            extensions[path.name.split("-")[0]] |= {m.name.rsplit(".", 1)[1] for m in tar.getmembers()}
    assert extensions == {"train": {"json", "jpg"}, "val": {"json", "png"}}, "the val split stays lossless"
    recorded = json.loads((output / "_ingest.json").read_text())["settings"]
    assert (recorded["encoding"], recorded["quality"], recorded["max_resolution"]) == ("jpg", 95, 20)

    with pytest.raises(OutputMismatch, match="made with quality=95, this run asks for quality=80"):
        run_image_job(dataclasses.replace(jpeg, quality=80), Storage(), str(output), progress=False)
    again = run_image_job(jpeg, Storage(), str(output), progress=False)
    assert again["parts_skipped"] == again["parts"], "the same settings: nothing made again"


def test_a_part_that_fails_is_recorded_the_others_commit_and_a_rerun_completes_it(local_ray, tmp_path):
    folder = image_folder(tmp_path / "in", 24)
    section, output = section_for(folder), tmp_path / "out"
    run_image_job(section, Storage(), str(output), progress=False)
    parts = sorted((output / "parts").glob("*.parquet"))
    # Break one part's commit: its record cannot be written (a directory stands where the file goes). The part
    # with the most items: keys hash the source's path, so which parts are empty changes from run to run.
    victim = max(parts, key=lambda p: pq.read_metadata(p).num_rows)
    victim.unlink()
    victim.mkdir()
    (folder / "img000.png").write_bytes(read_item_bytes(list_fashion_mnist(30)[29].locator))  # another part redone

    before = (output / "manifest.parquet").read_bytes()
    with pytest.raises(IngestError, match=rf"1 of {len(parts)} parts failed .*first: {victim.stem}"):
        run_image_job(section, Storage(), str(output), progress=False)
    # The previous manifest stays, whole: not one without the failed part's samples, and no shard it names deleted.
    assert (output / "manifest.parquet").read_bytes() == before
    assert all((output / "shards" / f"{row['shard']}.tar").is_file() for row in manifest(output))

    stats = Storage().read_json(str(output / "_stats.json"))
    assert stats["parts_failed"] == 1 and victim.stem in stats["failed_parts"] and stats["retryable"] > 0
    victim.rmdir()
    again = run_image_job(section, Storage(), str(output), progress=False)
    assert again["parts_failed"] == 0
    assert_exactly_once(output, section, set())


def test_list_keys_never_name_a_member_outside_the_sample(local_ray, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(read_item_bytes(list_fashion_mnist(1)[0].locator))
    keys = ["/etc/cron_d/evil", "../../escape", "tab\there", "x" * 120, "dotted.name", "plain_key-1"]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(f'{{"path": "{photo}", "key": {key!r}}}\n'.replace("'", '"') for key in keys))
    output = tmp_path / "out"

    stats = run_image_job(IngestSection(sources=[SourceSection(kind="list", path=str(listing))], resolution=16),
                          Storage(), str(output), progress=False)

    assert stats["samples"] == len(keys) and stats["failures"] == 0
    names = [m.name for p in (output / "shards").glob("*.tar") for m in tarfile.open(p).getmembers()]
    assert len(names) == 2 * len(keys)
    for name in names:
        assert not name.startswith("/") and ".." not in name and "/" not in name
        assert name.isprintable() and len(name) <= 100 and name.count(".") == 1
    assert "plain_key-1" in {r["key"] for r in manifest(output)}, "a safe key is kept as it is"


def test_the_run_lock_refuses_a_second_driver_and_takes_over_a_dead_ones(tmp_path):
    storage, output = Storage(), str(tmp_path / "out")
    with RunLock(storage, output):
        with pytest.raises(StorageError, match="is being written by another ingest"):
            with RunLock(storage, output):
                pass
    assert not (tmp_path / "out" / "_lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}
    storage.write_json(str(tmp_path / "out" / "_lock"), lock)
    with RunLock(storage, output):  # the same host, its process gone: taken over at once
        assert storage.read_json(str(tmp_path / "out" / "_lock"))["pid"] == os.getpid()
    storage.write_json(str(tmp_path / "out" / "_lock"), {**lock, "host": "elsewhere", "heartbeat": time.time() - 900})
    with RunLock(storage, output, stale_seconds=300):  # another host, silent for 15 minutes: stale
        pass
    storage.write_json(str(tmp_path / "out" / "_lock"), {**lock, "host": "elsewhere"})
    with pytest.raises(StorageError, match="another ingest"):  # another host, alive: refused
        with RunLock(storage, output):
            pass


def test_a_kill_before_the_new_manifest_leaves_the_previous_one_whole(local_ray, tmp_path, monkeypatch):
    from atoken.preprocess import job

    folder = image_folder(tmp_path / "in", 24)
    section, output = section_for(folder), tmp_path / "out"
    run_image_job(section, Storage(), str(output), progress=False)
    (folder / "img004.png").write_bytes(read_item_bytes(list_fashion_mnist(30)[29].locator))
    (folder / "img009.png").unlink()

    def killed(*args):
        raise KeyboardInterrupt("killed after the parts, before the manifest")

    monkeypatch.setattr(job, "_gather_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        run_image_job(section, Storage(), str(output), progress=False)
    # Every shard the manifest a reader sees lists is still there (the replaced ones are deleted only after
    # the next manifest is committed).
    assert all((output / "shards" / f"{row['shard']}.tar").is_file() for row in manifest(output))
    monkeypatch.undo()
    run_image_job(section, Storage(), str(output), progress=False)
    assert_exactly_once(output, section, set())


def test_a_folder_that_cannot_be_listed_stops_the_job_instead_of_deleting_its_samples(local_ray, tmp_path,
                                                                                      monkeypatch):
    from atoken.preprocess import sources
    from atoken.preprocess.sources import SourceError

    folder = image_folder(tmp_path / "in", 12)
    section, output = section_for(folder), tmp_path / "out"
    run_image_job(section, Storage(), str(output), progress=False)
    before = shard_files(output)
    real_walk = sources.os.walk

    def flaky_walk(top, onerror=None, **kwargs):
        if str(top) == str(folder):  # the source only, not the output
            onerror(OSError(5, "Input/output error", str(top)))
        yield from real_walk(top, onerror=onerror, **kwargs)

    monkeypatch.setattr(sources.os, "walk", flaky_walk)
    with pytest.raises(SourceError, match="cannot list .*Input/output error"):
        run_image_job(section, Storage(), str(output), progress=False)
    assert shard_files(output) == before and len(manifest(output)) == 12


def test_a_shard_deleted_from_out_is_made_again_not_failed_forever(local_ray, tmp_path):
    folder = image_folder(tmp_path / "in", 16)
    section, output = section_for(folder), tmp_path / "out"
    run_image_job(section, Storage(), str(output), progress=False)
    victim = sorted((output / "shards").glob("train-*.tar"))[0]
    lost = sum(1 for row in manifest(output) if row["shard"] == victim.stem)
    victim.unlink()

    stats = run_image_job(section, Storage(), str(output), progress=False)

    assert stats["parts_failed"] == 0 and stats["items_made"] == lost
    assert_exactly_once(output, section, set())


def test_a_key_listed_in_two_sources_is_refused_before_any_part_is_written(local_ray, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(read_item_bytes(list_fashion_mnist(1)[0].locator))
    for name in ("a", "b"):
        (tmp_path / f"{name}.csv").write_text("path,key\n" + "".join(f"{photo},k{i}\n" for i in range(4)))
    section = IngestSection(sources=[SourceSection(kind="list", path=str(tmp_path / "a.csv")),
                                     SourceSection(kind="list", path=str(tmp_path / "b.csv"), split="val")],
                            resolution=16)
    with pytest.raises(ValueError, match=r"item key 'k\d' is listed twice \(list:.*a.csv, list:.*b.csv\)"):
        run_image_job(section, Storage(), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "parts").exists()


def test_raising_the_size_cap_retries_the_items_it_refused(local_ray, tmp_path):
    from PIL import Image

    folder = image_folder(tmp_path / "in", 4)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(folder / "big.png")
    assert (folder / "big.png").stat().st_size > 1 << 20
    output = tmp_path / "out"
    small = section_for(folder)
    small.max_item_mb = 1
    first = run_image_job(small, Storage(), str(output), progress=False)
    assert first["failures_permanent"] == 1 and first["samples"] == 4
    again = run_image_job(small, Storage(), str(output), progress=False)
    assert again["parts_skipped"] == again["parts"], "refused under the same cap: not tried again"

    raised = run_image_job(section_for(folder), Storage(), str(output), progress=False)

    assert raised["items_made"] == 1 and raised["samples"] == 5 and raised["failures"] == 0


def test_the_run_lock_is_never_deleted_or_kept_by_a_driver_that_lost_it(tmp_path):
    storage, output = Storage(), str(tmp_path / "out")
    uri = str(tmp_path / "out" / "_lock")
    other = {"host": "elsewhere", "pid": 1, "started": 0.0, "heartbeat": time.time()}
    with pytest.raises(StorageError, match="taken over by another ingest"):
        with RunLock(storage, output, heartbeat_seconds=0.05) as lock:
            storage.write_json(uri, other)  # another driver took it over (this one looked dead)
            time.sleep(0.3)
            lock.check()
    assert storage.read_json(uri)["host"] == "elsewhere", "the other driver's lock is left alone"
    storage.delete(uri)
    (tmp_path / "out" / "_lock").write_bytes(b"")  # a driver killed between creating and writing it
    with RunLock(storage, output):
        assert storage.read_json(uri)["pid"] == os.getpid()


def test_out_records_the_code_and_decoders_and_a_code_change_goes_to_history_not_refused(local_ray, tmp_path,
                                                                                       monkeypatch):
    """_ingest.json says which ingest code and decoder versions made OUT; a rerun by other code (a fix) is not
    refused: the versions that made OUT before are kept in its `history`, and committed parts stay."""
    import PIL

    from atoken.pipeline import dag
    from atoken.preprocess.job import CODE

    folder = image_folder(tmp_path / "in", 8)
    output = tmp_path / "out"
    run_image_job(section_for(folder), Storage(), str(output), progress=False)
    first = json.loads((output / "_ingest.json").read_text())
    assert first["code"] == dag.code_version(CODE["images"])[:16]
    assert first["decoders"] == {"pillow": PIL.__version__}
    assert (first["kind"], first["settings"]["resolution"]) == ("images", 16) and "history" not in first

    monkeypatch.setattr(dag, "code_version", lambda packages: "f" * 64)  # a changed statement in the ingest code
    stats = run_image_job(section_for(folder), Storage(), str(output), progress=False)
    assert stats["parts_skipped"] == stats["parts"], "other code: recorded, and committed parts kept"
    second = json.loads((output / "_ingest.json").read_text())
    assert second["code"] == "f" * 16
    assert second["history"] == [{"code": first["code"], "decoders": first["decoders"]}]

    run_image_job(section_for(folder), Storage(), str(output), progress=False)  # the same code again
    assert json.loads((output / "_ingest.json").read_text())["history"] == second["history"], "once, not per run"


def test_the_preflight_reads_a_few_bytes_of_a_large_list_file(tmp_path):
    """`atoken run` preflights every source before any stage, a finished one too: a 200k-row list file is not
    read whole to learn that it lists an item; an empty one is still refused in one line."""
    from atoken.preprocess.job import first_items
    from atoken.preprocess.sources import SourceError

    big = tmp_path / "items.csv"
    big.write_text("path,caption\n" + "".join(f"/data/img{index:07d}.png,a photo\n" for index in range(200_000)))
    storage = Storage()
    read = []
    original = storage.read_range
    storage.read_range = lambda uri, start, length: read.append(length) or original(uri, start, length)
    assert first_items(IngestSection(sources=[SourceSection(kind="list", path=str(big))]), storage) == []
    assert 0 < sum(read) <= 1 << 17 < big.stat().st_size // 40
    excel = tmp_path / "excel.csv"  # a spreadsheet's export starts with a UTF-8 BOM
    excel.write_bytes(b"\xef\xbb\xbfpath,caption\n/data/a.png,a photo\n")
    assert first_items(IngestSection(sources=[SourceSection(kind="list", path=str(excel))]), Storage()) == []
    empty = tmp_path / "empty.csv"
    empty.write_text("path,caption\n")
    with pytest.raises(SourceError, match="lists no images"):
        first_items(IngestSection(sources=[SourceSection(kind="list", path=str(empty))]), Storage())
