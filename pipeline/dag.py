"""Stages, fingerprints, skip and resume.

A stage declares what it depends on, which config section and which code feed its fingerprint, and a
`run` that writes under its own output folder `<root>/<stage>/<fingerprint[:12]>`. Its state lives in
storage (`<root>/_state/<stage>.json`), written *before* work starts (with its MLflow run id) and again
when it ends. So:
- same fingerprint and done   → skipped, no new MLflow run;
- same fingerprint, not done  → resumed in the same output folder and the same MLflow run;
- new fingerprint             → a fresh folder and run; everything downstream gets a new fingerprint too.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atoken.pipeline.config import PipelineConfig, flatten
from atoken.pipeline.storage import Storage, join
from atoken.pipeline.tracking import Tracker

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and the cause in one line."""


@dataclass
class StageState:
    name: str
    fingerprint: str
    status: str  # "running" | "done" | "failed"
    output: str
    run_id: str
    attempts: int = 1
    started_at: str = ""
    finished_at: str = ""
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    config: PipelineConfig
    storage: Storage
    tracker: Tracker
    output: str  # this stage's folder URI
    inputs: dict[str, StageState]  # the finished states of the stages it depends on
    run_id: str  # its MLflow child run
    resumed: bool
    progress: bool


@dataclass
class Stage:
    name: str
    depends_on: tuple[str, ...]
    # Subfolders or files of the package whose code feeds the fingerprint (comments and docstrings do not).
    code_packages: tuple[str, ...]
    section: Callable[[PipelineConfig], Any]  # the config slice that feeds the fingerprint
    run: Callable[[StageContext], dict[str, Any]]  # returns a summary of numbers
    preflight: Callable[[PipelineConfig], None] | None = None  # cheap checks before any stage runs
    libraries: tuple[str, ...] = ()  # distributions whose versions feed the fingerprint (its decoders)


@dataclass
class StageOutcome:
    name: str
    action: str  # "skipped" | "ran" | "resumed" | "failed"
    seconds: float
    state: StageState


def code_version(packages: tuple[str, ...]) -> str:
    """A hash of the code in `packages` (folders or .py files under the package) as Python sees it: comments,
    docstrings and formatting do not change it, a changed statement does."""
    digest = hashlib.sha256()
    for package in packages:
        path = PACKAGE_ROOT / package
        files = [path] if package.endswith(".py") else sorted(path.rglob("*.py"))
        for file in files:
            digest.update(file.relative_to(PACKAGE_ROOT).as_posix().encode())
            digest.update(normalised_code(file.read_text()).encode())
    return digest.hexdigest()


def normalised_code(source: str) -> str:
    """Python source as its syntax tree without docstrings: what a comment or docstring edit leaves alone."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def section_dict(stage: Stage, config: PipelineConfig) -> dict[str, Any]:
    """The stage's config slice as plain JSON values: what its fingerprint hashes and its MLflow params show."""
    return json.loads(json.dumps(stage.section(config), default=_plain))


def fingerprint(stage: Stage, config: PipelineConfig, input_fingerprints: list[str]) -> str:
    payload = {
        "stage": stage.name,
        "config": section_dict(stage, config),
        "inputs": input_fingerprints,
        "code": code_version(stage.code_packages),
    }
    if stage.libraries:
        from atoken.preprocess.job import library_versions

        payload["libraries"] = library_versions(stage.libraries)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _plain(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Pipeline:
    def __init__(self, config: PipelineConfig, stages: list[Stage], storage: Storage):
        names = [s.name for s in stages]
        for stage in stages:
            missing = [d for d in stage.depends_on if d not in names[: names.index(stage.name)]]
            if missing:
                raise ValueError(f"stage {stage.name} depends on {missing}, which do not run before it")
        self.config = config
        self.stages = stages
        self.storage = storage
        self.root = config.run.root

    def state_uri(self, name: str) -> str:
        return join(self.root, "_state", f"{name}.json")

    def read_state(self, name: str) -> StageState | None:
        uri = self.state_uri(name)
        if not self.storage.exists(uri):
            return None
        return StageState(**self.storage.read_json(uri))

    def write_state(self, state: StageState) -> None:
        self.storage.write_json(self.state_uri(state.name), asdict(state))

    def plan(self) -> list[tuple[Stage, str, StageState | None]]:
        """Each stage with the fingerprint it would run under now and its stored state."""
        fingerprints: dict[str, str] = {}
        planned = []
        for stage in self.stages:
            fp = fingerprint(stage, self.config, [fingerprints[d] for d in stage.depends_on])
            fingerprints[stage.name] = fp
            planned.append((stage, fp, self.read_state(stage.name)))
        return planned

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for stage, fp, state in self.plan():
            if state is None:
                label = "pending"
            elif state.fingerprint != fp:
                label = "stale"  # config or code changed since it ran: the next run redoes it
            else:
                label = state.status
            rows.append({"stage": stage.name, "state": label, "fingerprint": fp,
                         "output": state.output if state else None, "mlflow_run_id": state.run_id if state else None,
                         "summary": state.summary if state else {}})
        return rows

    def run(self, tracker: Tracker, parent_run_id: str, progress: bool,
            before_first_run: Callable[[], None] = lambda: None, console=None,
            refresh: set[str] = frozenset()) -> list[StageOutcome]:
        """`console` (pipeline.console.Console): told when each stage starts, is skipped, ends or fails.
        `refresh`: stages run again in place even when done (an ingest listing its sources again)."""
        outcomes: list[StageOutcome] = []
        finished: dict[str, StageState] = {}
        # Stages whose output gained items in place this run (an ingest retrying its transient failures, or
        # --refresh-ingest), with what made them so: a later stage with the same fingerprint keeps its output, as
        # a fingerprint covers config and code, not data, and the console says it was made without them.
        grown: dict[str, str] = {}
        started_work = False
        for stage, fp, state in self.plan():
            inputs_grown = sorted({grown[d] for d in stage.depends_on if d in grown})
            started = time.perf_counter()
            # A done stage whose summary counts retryable work (an ingest's transient failures) runs again, in
            # its folder: it redoes only that work (preprocess/job.py), then reads as done.
            if state and state.fingerprint == fp and state.status == "done" \
                    and not state.summary.get("retryable") and stage.name not in refresh \
                    and self.storage.exists(join(state.output, "_SUCCESS.json")):
                finished[stage.name] = state
                outcomes.append(StageOutcome(stage.name, "skipped", time.perf_counter() - started, state))
                if inputs_grown:
                    grown[stage.name] = inputs_grown[0]
                if console:
                    console.stage_skipped(stage.name, fp, f"made before {', '.join(inputs_grown)} (kept)"
                                          if inputs_grown else "")
                continue
            if not started_work:
                before_first_run()
                started_work = True
            resumed = state is not None and state.fingerprint == fp
            run_id, _ = tracker.reopen_or_create(
                state.run_id if resumed else None, stage.name, parent_id=parent_run_id,
                tags={"atoken.stage": stage.name, "atoken.fingerprint": fp},
            )
            state = StageState(
                name=stage.name, fingerprint=fp, status="running",
                output=state.output if resumed else join(self.root, stage.name, fp[:12]),
                run_id=run_id, attempts=state.attempts + 1 if resumed else 1, started_at=_now(),
            )
            # Committed before any work: a killed run finds its folder and MLflow run here next time.
            self.write_state(state)
            tracker.log_params(run_id, flatten(section_dict(stage, self.config)))
            context = StageContext(self.config, self.storage, tracker, state.output,
                                   {d: finished[d] for d in stage.depends_on}, run_id, resumed, progress)
            if console:
                console.stage_started(stage.name, resumed, f"attempt {state.attempts}, output {state.output}"
                                      if resumed else f"output {state.output}")
            try:
                summary = stage.run(context)
            except Exception as exc:  # noqa: BLE001 - recorded, then re-raised as one line
                state.status, state.error, state.finished_at = "failed", f"{type(exc).__name__}: {exc}", _now()
                self.write_state(state)
                tracker.finish(run_id, "FAILED")
                if console:
                    first_line = str(exc).splitlines()[0] if str(exc) else ""
                    console.stage_failed(stage.name, f"{type(exc).__name__}: {first_line}")
                raise PipelineError(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
            self._write_output_manifest(state.output, stage, finished)
            self.storage.write_json(join(state.output, "_SUCCESS.json"), {"fingerprint": fp, "finished_at": _now()})
            state.status, state.summary, state.finished_at = "done", summary, _now()
            self.write_state(state)
            numbers = {k: v for k, v in summary.items() if isinstance(v, int | float)}
            if numbers:
                tracker.log_metrics(run_id, numbers)
            tracker.finish(run_id)
            if console:
                console.stage_finished(stage.name, summary)
            finished[stage.name] = state
            # items_landed: made and now samples (items_made counts tries, and a retry may fail again).
            landed = summary.get("items_landed") if isinstance(summary, dict) else None
            if resumed and isinstance(landed, int) and landed > 0:
                grown[stage.name] = f"{stage.name} made {landed:,} more items in place"
            outcomes.append(StageOutcome(stage.name, "resumed" if resumed else "ran",
                                         time.perf_counter() - started, state))
        return outcomes

    def _write_output_manifest(self, output: str, stage: Stage, finished: dict[str, StageState]) -> None:
        """`_outputs.parquet`: every file the stage wrote, and which outputs it read."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        files = [uri for uri in self.storage.list(output) if not uri.endswith(("_SUCCESS.json", "_outputs.parquet"))]
        inputs = [finished[d].output for d in stage.depends_on]
        table = pa.table({"uri": inputs + files, "kind": ["input"] * len(inputs) + ["output"] * len(files)},
                         schema=pa.schema([("uri", pa.string()), ("kind", pa.string())]))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.storage.write_bytes(join(output, "_outputs.parquet"), buffer.getvalue())
