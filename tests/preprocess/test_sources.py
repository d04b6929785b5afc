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
from atoken.preprocess.sources import SourceError, list_file, list_s3_prefix, read_item_bytes
from atoken.preprocess.writer import ImageSettings, ShardPlan, write_shard

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
    items = list_file(str(target), Storage())
    assert [i.caption for i in items] == [r["caption"] for r in rows]
    assert [i.locator for i in items] == [r["path"] for r in rows]
    assert len({i.key for i in items}) == 3 and all("." not in i.key for i in items)
    assert list_file(str(target), Storage()) == items  # stable keys
    assert len(list_file(str(target), Storage(), limit=2)) == 2


def test_list_file_errors_name_the_file_and_row(tmp_path):
    (tmp_path / "bad.csv").write_text("caption\nno path here\n")
    with pytest.raises(SourceError, match=r"bad.csv: row 0 has no `path` or `url`"):
        list_file(str(tmp_path / "bad.csv"), Storage())
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
    items = list_s3_prefix(storage, "s3://raw/photos")
    assert sorted(Path(i.locator).name for i in items) == sorted(PHOTOS)
    result = write_shard(ShardPlan("train-000000", "train", items), storage, "s3://raw/out", ImageSettings(32, 10**8))
    assert (result.samples, result.errors) == (3, 0)
    assert storage.exists("s3://raw/out/manifests/train-000000.parquet")


def test_http_urls_are_fetched_and_failures_are_item_errors(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SKIMAGE_DATA))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/astronaut.png"
        assert read_item_bytes(url) == (SKIMAGE_DATA / "astronaut.png").read_bytes()
        (tmp_path / "urls.jsonl").write_text(f'{{"url": "{url}"}}\n{{"url": "{url[:-4]}-missing.png"}}\n')
        items = list_file(str(tmp_path / "urls.jsonl"), Storage())
        result = write_shard(ShardPlan("train-000000", "train", items), Storage(), str(tmp_path / "out"),
                             ImageSettings(32, 10**8))
        assert (result.samples, result.errors) == (1, 1)
        assert result.error_rows[0]["stage"] == "read" and "404" in result.error_rows[0]["error"]
    finally:
        server.shutdown()
