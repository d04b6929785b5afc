"""pipeline/runner.py: `atoken run` retries an ingest's transient failures on the next invocation, in place.

Issue 16 item 3: a rerun reprocesses only the failed transient items, never a good one. The real pipeline
(ingest → train_stage1 → evaluate, at the smallest sizes that run) on an S3 source in moto, read through the
loopback fault proxy (tests/faults.py), which answers 500 to every GET of two chosen images during the first run
only; a third object is not an image (a permanent failure). Each `atoken run` is a fresh CLI invocation in this
process (`main`), with its own local Ray and the test's sqlite MLflow store.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import yaml
from faults import Fault, FaultProxy

from atoken.pipeline.cli import main
from atoken.pipeline.config import IngestSection, SourceSection, StorageSection
from atoken.pipeline.storage import Storage
from atoken.preprocess.job import list_items
from atoken.preprocess.sources import list_fashion_mnist, read_item_bytes
from atoken.preprocess.writer import ITEM_TRIES

from helpers import shard_members

pytestmark = pytest.mark.slow  # three `atoken run`s; the first trains (Ray Train: ~30 s): ~55 s on 2 cores

BUCKET = "atoken-runner-retry"  # free of digits: a status code in a message must come from S3, not the name
IMAGES = 12
TRANSIENT = ("img003.png", "img008.png")  # every GET of these answered 500 during the first run
CORRUPT = "img-corrupt.png"
STAGES = ("ingest", "train_stage1", "evaluate")


def write_config(tmp_path: Path, endpoint: str, mlflow_uri: str) -> Path:
    config = {
        "run": {"name": "retry", "root": str(tmp_path / "run"), "local_dir": str(tmp_path / "local")},
        # Few botocore retries: every GET of a failing image is answered 500, so retries only cost time.
        "storage": {"endpoint_url": endpoint, "max_attempts": 1},
        "tracking": {"uri": mlflow_uri, "experiment": "runner-retry"},
        "ray": {"num_cpus": 2},
        "ingest": {"sources": [{"kind": "s3", "path": f"s3://{BUCKET}/src"}], "resolution": 16,
                   "samples_per_shard": 4, "val_every": 4, "parallelism": 2},
        "train": {"model": {"kind": "patch_autoencoder", "patch_size": 4, "hidden_channels": 8,
                            "latent_channels": 4},
                  "stages": [{"name": "stage1", "steps": 2, "batch_size": 4, "warmup_steps": 1,
                              "checkpoint_every": 2, "log_every": 1}]},
        "evaluate": {"metrics": ["psnr"], "grid_samples": 2, "worst_k": 1},
    }
    path = tmp_path / "retry.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def source(s3_endpoint, s3_credentials) -> dict[str, str]:
    """IMAGES Fashion-MNIST PNGs and one corrupt file under s3://BUCKET/src/, put straight into moto; returns
    file name → sample key, as the ingest lists them."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for index, item in enumerate(list_fashion_mnist(IMAGES)):
        client.put_object(Bucket=BUCKET, Key=f"src/img{index:03d}.png", Body=read_item_bytes(item.locator))
    client.put_object(Bucket=BUCKET, Key=f"src/{CORRUPT}", Body=b"\x89PNG\r\n\x1a\n" + bytes(200))
    section = IngestSection(sources=[SourceSection(kind="s3", path=f"s3://{BUCKET}/src")])
    items = list_items(section, Storage(StorageSection(endpoint_url=s3_endpoint)))
    return {item.locator.rsplit("/", 1)[1]: item.key for item in items}


CONSOLE: list[str] = []  # the last run's console lines


def atoken_run(config: Path, capsys) -> dict[str, str]:
    """One `atoken run CONFIG`: stage → action (ran, resumed, skipped), from the table it prints."""
    code = main(["run", str(config), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    CONSOLE[:] = out.splitlines()
    return {line.split()[0]: line.split()[1] for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in STAGES}


def read_state(root: Path, stage: str) -> dict:
    return json.loads((root / "_state" / f"{stage}.json").read_text())


def rows(path: Path) -> list[dict]:
    return pq.read_table(io.BytesIO(path.read_bytes())).to_pylist()


def without_shard(row: dict) -> dict:
    """A manifest row but for the shard it lies in (a rewritten part's shard has a new name)."""
    return {k: v for k, v in row.items() if k != "shard"}


def source_gets(proxy: FaultProxy, since: int) -> list[str]:
    """The source objects GET since request `since` (file names; the listing is a GET of the bucket, not one)."""
    prefix = f"/{BUCKET}/src/"
    return [target.split("?")[0].removeprefix(prefix) for method, target, _ in proxy.received[since:]
            if method == "GET" and target.startswith(prefix)]


def test_a_rerun_makes_only_the_transient_failures_reuses_every_good_sample_and_then_skips(
        tmp_path, s3_endpoint, source, mlflow_uri, capsys):
    good = sorted(key for name, key in source.items() if name != CORRUPT)
    transient = sorted(source[name] for name in TRANSIENT)
    corrupt = source[CORRUPT]
    root = tmp_path / "run"
    faults = [Fault("error_5xx", method="GET", path=f"/{BUCKET}/src/{name}", every=1) for name in TRANSIENT]

    with FaultProxy(s3_endpoint, faults) as proxy:
        config = write_config(tmp_path, proxy.url, mlflow_uri)

        # Run 1: every stage runs; the two images S3 would not serve are transient failures, the corrupt one
        # permanent, and the ingest stage is done all the same (its summary counts what a rerun can retry).
        assert atoken_run(config, capsys) == {stage: "ran" for stage in STAGES}
        # The faults did fire, on both images, on each of the item's tries in the run (each try is one GET and
        # botocore's retries of it: storage.max_attempts reaches botocore as its retry count, so 1 is two GETs).
        faulted = [target.rsplit("/", 1)[1] for _, _, target in proxy.log]
        assert sorted(set(faulted)) == sorted(TRANSIENT) and faulted.count(TRANSIENT[0]) >= ITEM_TRIES
        assert faulted.count(TRANSIENT[0]) == faulted.count(TRANSIENT[1])
        first = read_state(root, "ingest")
        output = Path(first["output"])
        assert first["status"] == "done" and first["attempts"] == 1
        summary = first["summary"]
        assert (summary["failures_transient"], summary["failures_permanent"], summary["retryable"]) == (2, 1, 2)
        assert {r["key"]: (r["kind"], r["attempts"]) for r in rows(output / "errors.parquet")} == {
            transient[0]: ("transient", 1), transient[1]: ("transient", 1), corrupt: ("permanent", 1)}
        manifest_before = {r["key"]: r for r in rows(output / "manifest.parquet")}
        kept = sorted(set(good) - set(transient))
        assert sorted(manifest_before) == kept
        members_before = {ext: shard_members(output, ext) for ext in ("png", "json")}
        later_before = {stage: read_state(root, stage) for stage in ("train_stage1", "evaluate")}

        # Run 2, S3 healthy again: the done ingest stage runs again in its folder because it has retryable work;
        # it reads the two failed images and no other source object (the corrupt one is settled: not read again).
        proxy.healthy()
        seen = len(proxy.received)
        actions = atoken_run(config, capsys)
        assert actions["ingest"] == "resumed"
        assert sorted(source_gets(proxy, seen)) == sorted(TRANSIENT)
        second = read_state(root, "ingest")
        assert second["output"] == first["output"] and second["run_id"] == first["run_id"]
        assert second["status"] == "done" and second["attempts"] == 2
        summary = second["summary"]
        assert summary["items_made"] == summary["items_landed"] == 2 and summary["retryable"] == 0
        assert summary["failures"] == 1
        assert summary["parts_skipped"] < summary["parts"], "the parts of the retried items were rewritten"
        # The permanent failure is recorded once, still at its one attempt.
        assert [(r["key"], r["kind"], r["attempts"]) for r in rows(output / "errors.parquet")] == \
            [(corrupt, "permanent", 1)]
        manifest_after = rows(output / "manifest.parquet")
        assert sorted(r["key"] for r in manifest_after) == good, "every good image exactly once"
        # Every good sample of run 1 is byte for byte what it was (copied out of its old shard, never made again):
        # its members, and its manifest row but for the shard it now lies in.
        members_after = {ext: shard_members(output, ext) for ext in ("png", "json")}
        for ext in ("png", "json"):
            assert sorted(members_after[ext]) == good
            assert {k: members_after[ext][k] for k in kept} == members_before[ext]
        assert {r["key"]: without_shard(r) for r in manifest_after if r["key"] in manifest_before} == \
            {k: without_shard(r) for k, r in manifest_before.items()}
        # The later stages are skipped, by the DAG's design (pipeline/dag.py): a fingerprint hashes config, code
        # and the inputs' fingerprints, not their data, and the retried ingest keeps its fingerprint and folder,
        # as `--refresh-ingest` does ("later stages keep their outputs"). The model trained in run 1 did not see
        # the two retried images; a new fingerprint (a changed config or code) is what retrains.
        assert actions["train_stage1"] == actions["evaluate"] == "skipped"
        assert {stage: read_state(root, stage) for stage in ("train_stage1", "evaluate")} == later_before
        # ... and the console says that they were made without the two items.
        for stage in ("train_stage1", "evaluate"):
            assert any(line.startswith(f"[{stage}] skipped") and "made before ingest made 2 more items in place"
                       in line for line in CONSOLE), CONSOLE

        # Run 3, the negative control: nothing is left to retry, so every stage is skipped and no source object
        # is read (the retry path is not "always run the ingest again").
        seen = len(proxy.received)
        bytes_before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
        assert atoken_run(config, capsys) == {stage: "skipped" for stage in STAGES}
        assert not [line for line in CONSOLE if "made before" in line], "nothing grew in this run"
        assert source_gets(proxy, seen) == []
        assert read_state(root, "ingest") == second
        assert {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()} == bytes_before
