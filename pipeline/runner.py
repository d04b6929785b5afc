"""Runs a whole pipeline: checks first (config, storage, sources), then the stages, tracked in MLflow."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import yaml

from atoken.pipeline.config import PipelineConfig, flatten
from atoken.pipeline.dag import Pipeline, StageOutcome
from atoken.pipeline.stages import build_stages
from atoken.pipeline.storage import Storage, join
from atoken.pipeline.tracking import Tracker, redact, resolve_tracking_uri


@dataclass
class RunResult:
    outcomes: list[StageOutcome]
    parent_run_id: str
    tracking_uri: str


def prepare(config: PipelineConfig) -> tuple[Pipeline, Storage]:
    """Everything that can fail fast: storage reachable and writable, sources present."""
    storage = Storage(config.storage)
    storage.check_writable(config.run.root)
    stages = build_stages(config)
    # The training stages' checks (a GPU where the config asks for one) first: they cost nothing, while listing a
    # cluster's data sources can take long and would fail on a laptop before the more useful message.
    for stage in sorted(stages, key=lambda s: not s.name.startswith("train_")):
        if stage.preflight:
            stage.preflight(config)
    return Pipeline(config, stages, storage), storage


def start_ray(config: PipelineConfig) -> bool:
    """Connect to RAY_ADDRESS, or start a local Ray; True if this call started it."""
    import ray

    from atoken.pipeline import console

    quiet = console.active()
    if ray.is_initialized():
        if quiet is not None:
            quiet.attach_ray()  # a Ray someone else started: the console still takes its output
        return False
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or None,
        num_cpus=None if address else config.ray.num_cpus,
        include_dashboard=False,
        # Under a console Ray's own logging (its start-up warnings among it) goes to the console's log file.
        configure_logging=quiet is None,
        logging_level=logging.WARNING,
        # Ray Train v2 is the Train API this pipeline is written against.
        runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}},
    )
    if quiet is not None:
        quiet.attach_ray()
    return True


@contextlib.contextmanager
def ray_connection(config: PipelineConfig) -> Iterator[Callable[[], None]]:
    """Yields a function that connects to (or starts) Ray the first time it is called; a Ray this block
    started is shut down when it ends."""
    started = False

    def connect() -> None:
        nonlocal started
        started = start_ray(config) or started

    try:
        yield connect
    finally:
        if started:
            import ray

            ray.shutdown()


def run_pipeline(config: PipelineConfig, progress: bool = True,
                 on_parent_run: Callable[[str, str], None] | None = None, refresh_ingest: bool = False) -> RunResult:
    """`on_parent_run(run_id, tracking_uri)` is called once the MLflow parent run exists, before any stage.
    Under an open `pipeline.console.Console` each stage says when it starts and ends there."""
    from atoken.pipeline import console

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    pipeline, storage = prepare(config)
    tracking_uri = resolve_tracking_uri(config.tracking.uri, config.run.local_dir)
    tracker = Tracker(tracking_uri, config.tracking.experiment, config.run.local_dir)
    pipeline_state_uri = join(config.run.root, "_state", "pipeline.json")
    known = storage.read_json(pipeline_state_uri) if storage.exists(pipeline_state_uri) else {}
    parent_id, _ = tracker.reopen_or_create(known.get("parent_run_id"), config.run.name,
                                                   tags={"atoken.run_root": config.run.root})
    storage.write_json(pipeline_state_uri, {"parent_run_id": parent_id,
                                            "tracking_uri": redact("tracking_uri", tracking_uri),
                                            "name": config.run.name})
    tracker.log_params(parent_id, flatten(config.to_dict()))
    tracker.log_bytes(parent_id, yaml.safe_dump(config.to_dict(), sort_keys=False).encode(), "config/resolved.yaml")
    if on_parent_run:
        on_parent_run(parent_id, tracking_uri)

    with tracker.finishing(parent_id), ray_connection(config) as connect_ray:
        refresh = {s.name for s in pipeline.stages if s.name.startswith("ingest")} if refresh_ingest else set()
        outcomes = pipeline.run(tracker, parent_id, progress, connect_ray, console=console.active(), refresh=refresh)
    return RunResult(outcomes, parent_id, tracking_uri)
