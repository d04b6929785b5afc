"""Item sources: list files (parquet, CSV, JSONL), s3:// prefixes and http(s) URLs, read like local files."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import threading
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atoken.pipeline.config import StorageSection
from atoken.pipeline.storage import Storage
from atoken.preprocess.plan import PartPlan
from atoken.preprocess.sources import SourceError, list_file, list_s3_prefix, read_item_bytes
from atoken.preprocess.writer import ImageSettings

from helpers import commit_part

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"
PHOTOS = ["astronaut.png", "coffee.png", "rocket.jpg"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_list_file_reads_paths_and_captions(tmp_path, suffix):
    rows = [{"path": str(SKIMAGE_DATA / name), "caption": f"a photo of {name.split('.')[0]}"} for name in PHOTOS]
    target = tmp_path / f"items{suffix}"
    if suffix == ".csv":
        target.write_text("path,caption\n" + "".join(f"{r['path']},{r['caption']}\n" for r in rows))
    elif suffix == ".jsonl":
        target.write_text("".join(f'{{"path": "{r["path"]}", "caption": "{r["caption"]}"}}\n' for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), target)
    items = list(list_file(str(target), Storage()))
    assert [i.caption for i in items] == [r["caption"] for r in rows]
    assert [i.locator for i in items] == [r["path"] for r in rows]
    assert len({i.key for i in items}) == 3 and all("." not in i.key for i in items)
    assert list(list_file(str(target), Storage())) == items  # stable keys
    assert len(list(list_file(str(target), Storage(), limit=2))) == 2


def test_list_file_errors_name_the_file_and_row(tmp_path):
    (tmp_path / "bad.csv").write_text("caption\nno path here\n")
    with pytest.raises(SourceError, match=r"bad.csv: row 0 has no `path` or `url`"):
        list(list_file(str(tmp_path / "bad.csv"), Storage()))
    with pytest.raises(SourceError, match="missing.csv"):
        list_file(str(tmp_path / "missing.csv"), Storage())
    (tmp_path / "items.txt").write_text("x")
    with pytest.raises(SourceError, match="expected .parquet, .csv or .jsonl"):
        list_file(str(tmp_path / "items.txt"), Storage())


def test_s3_prefix_items_are_read_through_storage_into_shards(tmp_path, s3_endpoint, s3_credentials):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="raw")
    for name in PHOTOS:
        s3.put_object(Bucket="raw", Key=f"photos/{name}", Body=(SKIMAGE_DATA / name).read_bytes())
    s3.put_object(Bucket="raw", Key="photos/readme.txt", Body=b"not listed")
    storage = Storage(StorageSection(endpoint_url=s3_endpoint))
    items = list(list_s3_prefix(storage, "s3://raw/photos"))
    assert sorted(Path(i.locator).name for i in items) == sorted(PHOTOS)
    assert all(len(i.fingerprint) == 32 for i in items), "the objects' ETags"
    result = commit_part(PartPlan("train-000000-of-000004", "train", items), storage, "s3://raw/out",
                         ImageSettings(32, 10**8))
    assert (result.samples, result.errors) == (3, 0)
    assert storage.exists(f"s3://raw/out/manifests/{result.shard}.parquet")


def test_http_urls_are_fetched_and_failures_are_item_errors(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SKIMAGE_DATA))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/astronaut.png"
        assert read_item_bytes(url) == (SKIMAGE_DATA / "astronaut.png").read_bytes()
        (tmp_path / "urls.jsonl").write_text(f'{{"url": "{url}"}}\n{{"url": "{url[:-4]}-missing.png"}}\n')
        items = list(list_file(str(tmp_path / "urls.jsonl"), Storage()))
        result = commit_part(PartPlan("train-000000-of-000004", "train", items), Storage(), str(tmp_path / "out"),
                             ImageSettings(32, 10**8))
        assert (result.samples, result.errors) == (1, 1)
        assert result.error_rows[0]["stage"] == "read" and "404" in result.error_rows[0]["error"]
        assert result.error_rows[0]["kind"] == "permanent", "a 404 is not retried"
    finally:
        server.shutdown()


def test_built_in_colour_photos_are_colour_crops_and_the_held_out_photos_never_train():
    import io

    import numpy as np
    from PIL import Image

    from atoken.preprocess.sources import HELD_OUT_PHOTOS, list_held_out_photos, list_photo_crops

    crops, held_out = list_photo_crops(), list_held_out_photos()
    assert len(crops) == 700 and len({c.key for c in crops}) == 700
    photo = lambda item: item.locator.split(":")[1]  # noqa: E731
    assert not {photo(c) for c in crops} & {photo(h) for h in held_out}, "a held-out photo feeds training crops"
    assert {photo(h) for h in held_out} == set(HELD_OUT_PHOTOS)
    assert [h.key for h in held_out[:len(HELD_OUT_PHOTOS)]] == [f"photo_{n}_whole" for n in HELD_OUT_PHOTOS]
    assert list_photo_crops() == crops, "the crops are drawn the same on every listing"
    assert {photo(c) for c in list_photo_crops(limit=7)} == {photo(c) for c in crops}, "a limit keeps every photo"

    # Colour, not grey: the channels of a crop differ (a grey image has R = G = B everywhere), and the crop is
    # exactly the region its locator names.
    spreads = []
    for item in crops[::97] + held_out[::9]:
        image = np.asarray(Image.open(io.BytesIO(read_item_bytes(item.locator))))  # (side, side, 3)
        side = int(item.locator.split(":")[4])
        assert image.shape == (side, side, 3)
        spreads.append(float(np.abs(image.astype(int) - image.mean(axis=2, keepdims=True)).mean()))
    assert np.median(spreads) > 5.0, spreads
    grey = np.asarray(Image.open(io.BytesIO(read_item_bytes("fashion-mnist:t10k:0"))).convert("RGB")).astype(int)
    assert np.abs(grey - grey.mean(axis=2, keepdims=True)).mean() < 0.5, "negative control: a grey image scores 0"


def planned_keys(sources, val_every: int = 10) -> dict[str, list[str]]:
    from atoken.pipeline.config import IngestSection
    from atoken.preprocess.job import iter_items
    from atoken.preprocess.plan import Planner

    planner = Planner(val_every, 100)
    planner.add(iter_items(IngestSection(sources=sources)))
    keys: dict[str, list[str]] = {"train": [], "val": []}
    for part in planner.parts(planner.bits()):
        keys[part.split].extend(i.key for i in part.items)
    planner.close()
    return keys


def test_a_source_that_pins_its_split_leaves_the_hashed_split_of_the_others():
    from atoken.pipeline.config import SourceSection

    fashion = SourceSection(kind="builtin", name="fashion-mnist", limit=200)
    alone = planned_keys([fashion])
    beside = planned_keys([SourceSection(kind="builtin", name="held-out-photos", limit=6, split="val"), fashion,
                           SourceSection(kind="builtin", name="photo-crops", limit=5, split="val")])
    assert 10 <= len(alone["val"]) <= 30, "about one in val_every"
    assert [k for k in beside["val"] if k.startswith("fmnist")] == alone["val"]
    assert beside["train"] == alone["train"]
    assert sum(k.startswith("photo_") for k in beside["val"]) == 11, "pinned sources land in val whole"
    # Negative control: the same photo source left to the hashed split puts most of its crops in train.
    auto = planned_keys([fashion, SourceSection(kind="builtin", name="photo-crops", limit=5)])
    assert sum(k.startswith("photo_") for k in auto["val"]) < 5


def test_a_run_whose_items_all_land_in_one_split_is_refused_before_any_work():
    from atoken.pipeline.config import IngestSection, PipelineConfig, SourceSection
    from atoken.pipeline.stages import preflight_ingest

    crops = SourceSection(kind="builtin", name="photo-crops", limit=20, split="train")
    held_out = SourceSection(kind="builtin", name="held-out-photos", limit=5, split="val")
    preflight_ingest(PipelineConfig(ingest=IngestSection(sources=[crops, held_out])))  # both splits: fine
    with pytest.raises(ValueError, match="no item lands in the val split"):
        preflight_ingest(PipelineConfig(ingest=IngestSection(sources=[crops])))
    with pytest.raises(ValueError, match="no item lands in the train split"):
        preflight_ingest(PipelineConfig(ingest=IngestSection(sources=[held_out])))


def test_an_item_over_the_size_cap_is_refused_before_it_is_read_whole(tmp_path, s3_endpoint, s3_credentials):
    from atoken.preprocess.sources import ItemTooLarge, read_item

    photo = (SKIMAGE_DATA / "astronaut.png").read_bytes()
    (tmp_path / "a.png").write_bytes(photo)
    assert read_item(str(tmp_path / "a.png"), max_bytes=len(photo)) == photo
    with pytest.raises(ItemTooLarge, match="-byte cap"):
        read_item(str(tmp_path / "a.png"), max_bytes=len(photo) - 1)
    storage = Storage(StorageSection(endpoint_url=s3_endpoint))
    storage.client.create_bucket(Bucket="capped")
    storage.write_bytes("s3://capped/a.png", photo)
    assert read_item("s3://capped/a.png", storage, max_bytes=len(photo)) == photo
    with pytest.raises(OSError, match="-byte cap") as raised:
        read_item("s3://capped/a.png", storage, max_bytes=100)
    from atoken.preprocess.writer import failure_kind

    assert failure_kind(raised.value) == "permanent"
    # Streamed over HTTP without a Content-Length: stopped once the cap is passed, and spooled past its size.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/a.png"
        with pytest.raises(ItemTooLarge):
            read_item(url, max_bytes=1000)
        spooled = read_item(url, spool_bytes=1000, spool_folder=tmp_path)
        assert isinstance(spooled, Path) and spooled.read_bytes() == photo
    finally:
        server.shutdown()


def test_a_server_that_trickles_is_stopped_as_a_transient_failure():
    import time

    from atoken.preprocess.sources import read_item
    from atoken.preprocess.writer import failure_kind

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the client gave up: the point

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="slower than") as raised:
            read_item(f"http://127.0.0.1:{server.server_port}/slow.png", timeout_s=0.5)
        assert time.monotonic() - started < 5 and failure_kind(raised.value) == "transient"
    finally:
        server.shutdown()


def test_a_chunked_body_without_length_is_cut_at_the_cap_not_read_whole(monkeypatch):
    """No Content-Length to refuse by (chunked transfer): the stream is read only to just past the cap, then the
    item fails as permanent (a rerun would get the same bytes), and the client stops receiving."""
    import time
    import urllib.request

    from atoken.preprocess.sources import ItemTooLarge, read_item
    from atoken.preprocess.writer import failure_kind

    chunk, body, cap = 1 << 16, 64 << 20, 256 << 10
    sent = []

    class Chunked(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            total = 0
            try:
                while total < body:
                    self.wfile.write(b"%x\r\n%s\r\n" % (chunk, b"x" * chunk))
                    total += chunk
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the client hung up: the point
            finally:
                sent.append(total)
                self.close_connection = True

        def log_message(self, *args):
            pass

    received = []
    opened = urllib.request.urlopen

    def counting(*args, **kwargs):
        response = opened(*args, **kwargs)
        assert response.headers.get("Content-Length") is None
        for name in ("read", "read1"):
            setattr(response, name, counted_read(getattr(response, name)))
        return response

    def counted_read(read):
        def counted(size=-1):
            data = read(size)
            received.append(len(data))
            return data
        return counted

    monkeypatch.setattr(urllib.request, "urlopen", counting)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ItemTooLarge, match="-byte cap") as raised:
            read_item(f"http://127.0.0.1:{server.server_port}/big.png", max_bytes=cap)
        assert failure_kind(raised.value) == "permanent"
        assert cap < sum(received) <= cap + chunk, f"{sum(received):,} bytes received for a {cap:,}-byte cap"
        for _ in range(100):  # the handler sees the hang-up once its socket's buffers are full
            if sent:
                break
            time.sleep(0.05)
        # The server could write what the sockets' buffers held, never the whole 64 MiB body.
        assert sent and sent[0] < body // 2, f"the server sent {sent[0]:,} of {body:,} bytes"
    finally:
        server.shutdown()
        server.server_close()
