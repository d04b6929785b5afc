"""pipeline/tracking.py: redaction, params that never fail a rerun, runs reopened by id (real sqlite MLflow)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from atoken.pipeline.tracking import Tracker, grid_png, redact, resolve_tracking_uri


@pytest.mark.parametrize("key", [
    "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "storage.password", "db_passwd", "hf_token", "token",
    "MLFLOW_TRACKING_TOKEN", "access_key", "credentials_file", "api_key", "authToken", "apiKey",
])
def test_secret_looking_keys_are_hidden(key):
    assert redact(key, "s3cr3t-value") == "***"


@pytest.mark.parametrize(("value", "expected"), [
    ("http://user:pa55@minio:9000/bucket", "http://***@minio:9000/bucket"),
    ("postgresql://mlflow:hunter2@db.internal/mlflow", "postgresql://***@db.internal/mlflow"),
    ("https://token@host/path", "https://***@host/path"),
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ("runs/quickstart", "runs/quickstart"),
])
def test_url_userinfo_is_hidden(value, expected):
    assert redact("storage.endpoint_url", value) == expected


@pytest.mark.parametrize(("key", "value"), [
    ("train.stages.0.steps", "300"), ("run.root", "s3://bucket/prefix"), ("atoken.init_from", "random"),
    ("atoken.stage", "train_stage1"), ("atoken.fingerprint", "ab12"), ("protocol.psnr", "PSNR on uint8"),
    ("train.stages.1.max_tokens", "512"), ("model.tokenizer", "tiny"),
])
def test_ordinary_keys_keep_their_values(key, value):
    assert redact(key, value) == value


@pytest.fixture
def tracker(mlflow_uri, tmp_path) -> Tracker:
    return Tracker(mlflow_uri, "tracking-tests", str(tmp_path / "local"))


def test_log_params_keeps_existing_values_and_adds_new_ones(tracker):
    run_id, created = tracker.reopen_or_create(None, "params")
    assert created

    tracker.log_params(run_id, {"a": "1", "b": "2"})
    tracker.log_params(run_id, {"a": "changed", "b": "2", "c": "3"})  # MLflow itself would refuse "a"

    assert tracker.client.get_run(run_id).data.params == {"a": "1", "b": "2", "c": "3"}


def test_log_params_takes_more_than_a_hundred_and_redacts(tracker):
    run_id, _ = tracker.reopen_or_create(None, "many")
    params = {f"train.p{i:03d}": str(i) for i in range(250)}
    params["storage.secret_key"] = "do-not-log"
    params["tracking.uri"] = "http://u:p@mlflow:5000"
    params["long"] = "x" * 7000

    tracker.log_params(run_id, params)

    logged = tracker.client.get_run(run_id).data.params
    assert len(logged) == 253
    assert all(logged[f"train.p{i:03d}"] == str(i) for i in range(250))
    assert logged["storage.secret_key"] == "***"
    assert logged["tracking.uri"] == "http://***@mlflow:5000"
    assert logged["long"] == "x" * 6000


def test_reopen_or_create_same_id_for_a_known_run_new_for_unknown(tracker):
    parent_id, _ = tracker.reopen_or_create(None, "parent")
    run_id, created = tracker.reopen_or_create(None, "child", parent_id=parent_id, tags={"atoken.stage": "child"})
    assert created
    tracker.finish(run_id, "FAILED")
    assert tracker.client.get_run(run_id).info.status == "FAILED"

    again, created_again = tracker.reopen_or_create(run_id, "child", parent_id=parent_id)
    assert again == run_id and not created_again
    assert tracker.client.get_run(run_id).info.status == "RUNNING"

    unknown, created_unknown = tracker.reopen_or_create("0" * 32, "child", parent_id=parent_id)
    assert created_unknown and unknown not in (run_id, "0" * 32)

    run = tracker.client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.tags["atoken.stage"] == "child"
    assert run.info.run_name == "child" and run.info.experiment_id == tracker.experiment_id


def test_a_deleted_run_is_not_reopened(tracker):
    run_id, _ = tracker.reopen_or_create(None, "gone")
    tracker.client.delete_run(run_id)
    new_id, created = tracker.reopen_or_create(run_id, "gone")
    assert created and new_id != run_id


def test_a_second_tracker_finds_the_experiment_and_pickles(tracker, mlflow_uri, tmp_path):
    run_id, _ = tracker.reopen_or_create(None, "shared")
    other = Tracker(mlflow_uri, "tracking-tests", str(tmp_path / "local"))
    assert other.experiment_id == tracker.experiment_id

    copy = pickle.loads(pickle.dumps(tracker))
    copy.log_metrics(run_id, {"loss": 0.5}, step=3)
    copy.set_tags(run_id, {"atoken.init_from": "random", "storage.password": "pw"})

    run = tracker.client.get_run(run_id)
    assert run.data.metrics == {"loss": 0.5}
    assert [m.step for m in tracker.client.get_metric_history(run_id, "loss")] == [3]
    assert run.data.tags["atoken.init_from"] == "random"
    assert run.data.tags["storage.password"] == "***"


def test_artifacts_of_a_sqlite_store_stay_under_local_dir(tracker, tmp_path):
    run_id, _ = tracker.reopen_or_create(None, "artifacts")
    tracker.log_bytes(run_id, b"hello", "ingest/note.txt")
    written = list((tmp_path / "local" / "mlartifacts").rglob("note.txt"))
    assert len(written) == 1 and written[0].read_bytes() == b"hello"
    assert written[0].parent.name == "ingest"


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("http://mlflow:5000", str(tmp_path)) == "http://mlflow:5000"
    default = resolve_tracking_uri(None, str(tmp_path / "local"))
    assert default == f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}" and (tmp_path / "local").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, str(tmp_path)) == "http://env:5000"


def test_grid_png_lays_out_rows_of_tiles():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 2] = 255

    grid = np.asarray(Image.open(io.BytesIO(grid_png([[red, red, red], [blue]]))))

    assert grid.shape == (2 * 10, 3 * 10, 3)
    assert (grid[0:8, 20:28] == red).all() and (grid[10:18, 0:8] == blue).all()
    assert (grid[10:18, 10:28] == 255).all(), "a short row leaves white space"
