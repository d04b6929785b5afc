"""`atoken submit`: run a config on a Ray cluster through Ray's Jobs API, and follow, inspect or stop the job.

The job is `atoken run CONFIG` (or any other atoken command) on the cluster, in a copy of the working
directory, so the config and the small files it names travel with it; the code itself comes from the
cluster's image, where atoken is installed (infra/docker).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from atoken.pipeline.config import ConfigError, load_config

# What never travels with a job: environments, run outputs, local scratch, VCS data, and the large binary
# files a working tree collects (shards, weights, media); Ray refuses working dirs over its package limit.
# (Parquet stays: a list-file source may be one.)
WORKING_DIR_EXCLUDES = [
    ".venv/",
    ".git/",
    "runs/",
    ".atoken/",
    "mlruns/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.tar",
    "*.safetensors",
    "*.pt",
    "*.ckpt",
    "*.npz",
    "*.mp4",
    "*.whl",
]
PARENT_RUN_LINE = re.compile(r"atoken: MLflow parent run (?P<run_id>[0-9a-f]{32}) at (?P<uri>\S+)")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class SubmittedJob:
    job_id: str
    address: str
    entrypoint: str


def job_client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (http://HEAD:8265).

    Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override even an explicit address; an address given on the
    command line is meant, so those variables are hidden while the client resolves it.
    """
    from ray.job_submission import JobSubmissionClient

    if address is None:
        if not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
            raise ConfigError(
                "submit --address: needed (the head's dashboard, e.g. http://HEAD:8265), or set RAY_API_SERVER_ADDRESS"
            )
        return JobSubmissionClient(None)
    with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        return JobSubmissionClient(address)


@contextmanager
def _without_env(*names: str):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def entrypoint_for(config_path: str, overrides: list[str]) -> str:
    """The job's shell command: the config path relative to the working dir, overrides passed through."""
    # --verbose: a job's logs are what a cluster user reads (`atoken submit --logs`); the run's log file stays on the
    # head node, so the workers' output and Ray's scheduling messages belong in the job's logs as well.
    args = ["atoken", "run", config_path, "--no-progress", "--verbose"]
    for override in overrides:
        args += ["--set", override]
    return shlex.join(args)


def check_cluster_paths(config_path: Path, overrides: list[str]) -> list[str]:
    """Validate the config here, before anything is sent; returns warnings for paths a cluster may not share.

    A relative `run.root` would resolve inside the job's temporary copy of the working dir and be lost with
    it, so it is refused; an absolute local one works only where every node mounts it.
    """
    import yaml

    from atoken.pipeline.config import apply_override

    config = load_config(config_path, overrides)  # every config error, named, before any upload
    raw = yaml.safe_load(config_path.read_text()) or {}
    for override in overrides:
        apply_override(raw, override)
    root = str((raw.get("run") or {}).get("root", config.run.root))
    if not root.startswith("s3://") and not Path(root.removeprefix("file://")).is_absolute():
        raise ConfigError(
            f"run.root: {root!r} is relative, so on a cluster it would land in the job's temporary "
            "copy of the working dir; use s3://bucket/prefix or an absolute path every node mounts"
        )
    warnings = []
    if not root.startswith("s3://"):
        warnings.append(f"run.root {root} is a local path: every node of the cluster must mount it")
    if config.tracking.uri is None:
        warnings.append(
            "tracking.uri is unset: MLflow runs go to MLFLOW_TRACKING_URI on the cluster, else to a "
            "sqlite file in run.local_dir on the head node"
        )
    return warnings


def submit(
    config_path: str,
    overrides: list[str],
    address: str | None,
    working_dir: str = ".",
    submission_id: str | None = None,
) -> SubmittedJob:
    working = Path(working_dir).resolve()
    config = Path(config_path).resolve()
    if not working.is_dir():
        raise ConfigError(f"submit --working-dir: no such folder {working}")
    if not config.is_file():
        raise ConfigError(f"config: no such file {config_path}")
    if not config.is_relative_to(working):
        raise ConfigError(
            f"config: {config_path} is outside the working dir {working}, so it would not travel "
            "with the job (move it in, or pass --working-dir)"
        )
    for warning in check_cluster_paths(config, overrides):
        print(f"atoken: note: {warning}", file=sys.stderr)
    relative = config.relative_to(working).as_posix()
    metadata = {"atoken.config": relative}
    return _submit_job(entrypoint_for(relative, overrides), address, working, submission_id, metadata)


def submit_command(
    command: list[str], address: str | None, working_dir: str = ".", submission_id: str | None = None
) -> SubmittedJob:
    """Any atoken command as a job, e.g. ["preprocess", "images", SRC, OUT]: its paths must be ones the
    cluster's nodes see (absolute, on a shared filesystem) or s3:// URIs."""
    working = Path(working_dir).resolve()
    if not working.is_dir():
        raise ConfigError(f"submit --working-dir: no such folder {working}")
    if command[0] in ("submit", "run", "status"):
        raise ConfigError(f"submit -- {command[0]}: submit a config as `atoken submit CONFIG`, not `-- {command[0]}`")
    return _submit_job(shlex.join(["atoken", *command]), address, working, submission_id, None)


def _submit_job(entrypoint: str, address: str | None, working: Path, submission_id: str | None,
                metadata: dict[str, str] | None) -> SubmittedJob:
    client = job_client(address)
    # Ray logs every .gitignore it honours while packing the working dir; only its warnings matter here.
    logging.getLogger("ray").setLevel(logging.WARNING)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        # No env_vars: the driver's ray.init adds its own (RAY_TRAIN_V2_ENABLED), and Ray refuses a job whose
        # runtime env names the same variable. Credentials come from the cluster's own environment (secrets).
        runtime_env={"working_dir": str(working), "excludes": WORKING_DIR_EXCLUDES},
        metadata=metadata,
    )
    return SubmittedJob(
        job_id, address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ["RAY_ADDRESS"], entrypoint
    )


def follow(job_id: str, address: str | None, until_parent_run: bool = False, out=None) -> tuple[str, str | None]:
    """Stream the job's logs to `out` until it ends (or, with until_parent_run, until its MLflow parent run is
    known); returns (status, parent run id or None)."""
    out = out or sys.stdout
    client = job_client(address)
    parent: str | None = None
    buffer = ""

    async def stream() -> None:
        nonlocal parent, buffer
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            buffer = (buffer + chunk)[-4096:]
            match = PARENT_RUN_LINE.search(buffer) if parent is None else None
            if match:
                parent = match["run_id"]
                if until_parent_run:
                    return

    asyncio.run(stream())
    status = str(client.get_job_status(job_id).value)
    if not until_parent_run:
        # The log stream closes when the driver exits; the job's final state can trail it by a moment.
        deadline = time.monotonic() + 30
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            status = str(client.get_job_status(job_id).value)
    return status, parent


def parent_run_from_logs(logs: str) -> str | None:
    match = PARENT_RUN_LINE.search(logs)
    return match["run_id"] if match else None


def describe(job_id: str, address: str | None) -> dict:
    """The job's state as the cluster reports it, with the MLflow parent run read from its logs."""
    client = job_client(address)
    info = client.get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status.value),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "mlflow_parent_run": parent_run_from_logs(client.get_job_logs(job_id)),
    }


def logs(job_id: str, address: str | None) -> str:
    return job_client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None, wait_s: float = 60.0) -> str:
    """Ask the cluster to stop the job and wait (bounded) for it to end; returns its last status."""
    client = job_client(address)
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status
