"""Shared fixtures: a real S3 HTTP endpoint on loopback (moto server) and throwaway credentials."""

from __future__ import annotations

import os
import shutil

import pytest

from helpers import free_port


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode: a real S3 HTTP API on 127.0.0.1 (in memory, for tests only)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_credentials(monkeypatch):
    """Credentials only the test knows, so a test can look for them where they must never appear."""
    secret = "atoken-test-secret-" + os.urandom(6).hex()
    values = {"AWS_ACCESS_KEY_ID": "atoken-test-key-id", "AWS_SECRET_ACCESS_KEY": secret,
              "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An empty MLflow sqlite store, created once: building its tables takes seconds, copying it does not."""
    from atoken.pipeline.tracking import Tracker

    folder = tmp_path_factory.mktemp("mlflow-template")
    Tracker(f"sqlite:///{folder / 'mlflow.db'}", "template", str(folder))
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_uri(_mlflow_template, tmp_path):
    """A fresh sqlite MLflow store of this test's own, in tmp_path."""
    target = tmp_path / "mlflow" / "mlflow.db"
    target.parent.mkdir()
    shutil.copyfile(_mlflow_template, target)
    return f"sqlite:///{target}"
