"""MLflow tracking: one parent run per pipeline run, one child run per stage, reused on resume.

Only MlflowClient with explicit run ids is used (no fluent "active run"), so the driver and Ray
workers log to the same runs and a relaunched driver reopens its runs instead of duplicating them.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Words of a key (split at . _ - and camelCase) that mark a secret. Whole words, so that `atoken.*` tags and
# `max_tokens` stay readable while `hf_token`, `authToken` and `AWS_SECRET_ACCESS_KEY` are hidden.
SECRET_WORDS = {"secret", "password", "passwd", "token", "credential", "credentials", "apikey", "authtoken"}
SECRET_PAIRS = {("access", "key"), ("api", "key"), ("private", "key"), ("session", "key")}
URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def is_secret_key(key: str) -> bool:
    words = re.split(r"[._\-\s/]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    return bool(SECRET_WORDS.intersection(words)) or any(pair in SECRET_PAIRS for pair in itertools.pairwise(words))


def redact(key: str, value: str) -> str:
    """No credentials in params, tags or artifacts: secret-looking keys and URL user:password parts."""
    if is_secret_key(key):
        return "***"
    return URL_USERINFO.sub(r"\g<scheme>***@", value)


def resolve_tracking_uri(configured: str | None, local_dir: str) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = Path(local_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


class Tracker:
    def __init__(self, uri: str, experiment: str, local_dir: str):
        # mlflow's sqlite store prints a page of alembic migrations at first use.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            artifact_location = None
            if uri.startswith("sqlite:"):
                # Without this, a sqlite store writes artifacts to ./mlruns of whatever the cwd is.
                artifact_location = (Path(local_dir).resolve() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment_id": self.experiment_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = state["uri"]
        self.experiment_id = state["experiment_id"]
        self.client = MlflowClient(tracking_uri=self.uri)

    def reopen_or_create(self, run_id: str | None, run_name: str, parent_id: str | None = None,
                         tags: dict[str, str] | None = None) -> tuple[str, bool]:
        """The run `run_id` if it still exists in this store (set running again), else a new run."""
        from mlflow.exceptions import MlflowException

        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    self.client.update_run(run_id, status="RUNNING")
                    return run_id, False
            except MlflowException:
                pass
        all_tags = dict(tags or {})
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id, True

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Logs the params this run lacks; MLflow refuses to change a logged param, so existing ones stay."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        fresh = [Param(k, redact(k, str(v))[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=fresh[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, redact(key, str(value)))

    def log_bytes(self, run_id: str, data: bytes, artifact_name: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(artifact_name).name
            path.write_bytes(data)
            parent = str(Path(artifact_name).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def finishing(self, run_id: str) -> Iterator[None]:
        """Ends the run FINISHED when the block does, FAILED when it raises (a kill included)."""
        try:
            yield
        except BaseException:
            self.finish(run_id, "FAILED")
            raise
        self.finish(run_id)


def grid_png(rows: list[list[np.ndarray]]) -> bytes:
    """Rows of (H, W, 3) uint8 images → one PNG, each row left-aligned, tiles of the first image's size."""
    from PIL import Image

    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (height + 2), columns * (width + 2), 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = np.asarray(Image.fromarray(image).resize((width, height)))
            canvas[r * (height + 2): r * (height + 2) + height, c * (width + 2): c * (width + 2) + width] = tile
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()
