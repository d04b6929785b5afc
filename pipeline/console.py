"""What `atoken run` prints: per stage one start line, one progress bar and one end line with its figures.

Everything else goes to one log file under `run.local_dir/logs/` whose path the first line and any error line
name: Ray's own logging (its start-up warnings, the Train controller's chatter, the PlacementGroupCleaner lines
that once filled 432 of the quickstart's 640 console lines), MLflow's, Python warnings, and every line a Ray
worker prints (tracebacks included). `--verbose` echoes all of it to the console as well.

Training workers report progress with `report_progress`: one marked line on their stdout, which Ray forwards to
the driver like any worker output. The driver's log handler takes marked lines off the stream and turns them into
the stage's progress bar, so the same path works for a local Ray and for workers on other nodes of a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

PROGRESS_MARK = "atoken-progress "
# Loggers that print to the console by themselves unless routed: Ray configures "ray" at init, MLflow configures
# "mlflow" at import, alembic (MLflow's migrations) logs on its own.
ROUTED_LOGGERS = ("", "ray", "mlflow", "alembic", "py.warnings")

# A stage's end line shows these of its summary figures when it has any (the full summary is in MLflow and in
# the final table): an ingest summary has 14 numbers, most of them bookkeeping.
KEY_FIGURES = ("items", "samples_train", "samples_val", "failures", "shards", "items_per_second", "steps", "loss",
               "steps_per_second", "eval_psnr", "eval_ssim", "baseline_eval_psnr", "baseline_eval_ssim")

_active: Console | None = None


def progress_line(stage: str, step: int, steps: int, note: str | None = None, **figures: float) -> str:
    """A training stage's progress as a person reads it: its note, or the step and figures."""
    return f"[{stage}] " + (note or f"step {step}/{steps} " + " ".join(f"{k} {v:.4g}" for k, v in figures.items()))


def print_progress(stage: str, step: int, steps: int, note: str | None = None, **figures: float) -> None:
    """Progress of a training loop with no driver to report to (one plain process: the GPU benchmark)."""
    print(progress_line(stage, step, steps, note, **figures), flush=True)


def report_progress(stage: str, step: int, steps: int, note: str | None = None, **figures: float) -> None:
    """From a training worker: its stage's progress, for the driver's console (any process, any node); a `note`
    (a resume, a grown latent) becomes a console line of its own."""
    report = {"stage": stage, "step": step, "steps": steps, **figures} | ({"note": note} if note else {})
    # Readable where no console takes it off the stream (Ray started elsewhere, a Ray without the hook); the
    # console reads the JSON after the human part.
    print(f"{PROGRESS_MARK}{progress_line(stage, step, steps, note, **figures)} {json.dumps(report)}", flush=True)


def active() -> Console | None:
    """The console of this `atoken run` / `atoken eval`, if one is open in this process."""
    return _active


class Console:
    def __init__(self, log_path: str | Path, verbose: bool = False, progress: bool = True):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.progress = progress
        self._handler: logging.Handler | None = None
        self._ray_handlers: list | None = None  # Ray's own forwarded-output handlers, put back on exit
        self._saved: dict[str, tuple[list[logging.Handler], bool, int]] = {}
        self._bars: dict[str, tqdm] = {}
        self._started: dict[str, float] = {}
        self._current: str | None = None  # the pipeline stage running now: workers' reports belong to it
        self._notes: set[tuple[str, str]] = set()

    # -- set-up -------------------------------------------------------------------------------------------------
    def __enter__(self) -> Console:
        global _active
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.log_path.open("a", encoding="utf-8", buffering=1)
        # The command and config only: --set values may hold URIs with credentials.
        self._file.write(f"\n==== atoken {' '.join(sys.argv[1:3])} at {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # Whether warnings were already captured (logging keeps the original showwarning while they are).
        self._captured_warnings = getattr(logging, "_warnings_showwarning", None) is not None
        logging.captureWarnings(True)
        # MLflow installs its own stderr handler when first imported, unless told not to; its records then reach
        # the root logger, which is routed below.
        self._mlflow_env = os.environ.get("MLFLOW_CONFIGURE_LOGGING")
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
        self.route_loggers()
        # A record no handler takes goes to logging.lastResort (stderr): Ray's own init clears the "ray" logger's
        # handlers (ray.init(configure_logging=False)) and then warns about token authentication through it.
        self._last_resort, logging.lastResort = logging.lastResort, self._handler
        _active = self
        return self

    def route_loggers(self) -> None:
        """Send the chatty loggers to the log file (and, verbose, to stderr too). Called again after a library
        that installs its own handlers (Ray at init) has done so."""
        for name in ROUTED_LOGGERS:
            logger = logging.getLogger(name)
            if name not in self._saved:
                self._saved[name] = (list(logger.handlers), logger.propagate, logger.level)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.addHandler(self._handler)
            if self.verbose:
                logger.addHandler(logging.StreamHandler(sys.stderr))
            if name:
                logger.propagate = False
            if name in ("", "py.warnings"):
                logger.setLevel(logging.INFO)

    def attach_ray(self) -> bool:
        """Take over the lines Ray forwards from its workers: marked progress lines feed the bars, the rest go
        to the log file. False (and Ray prints as usual) if this Ray has no such hook."""
        self.route_loggers()
        try:
            # Ray's driver-side dispatcher of forwarded worker output (ray/_private/ray_logging): not public API,
            # so a Ray without it keeps its own printing rather than failing the run.
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return False
        with dispatcher._lock:
            if self._ray_handlers is None:
                self._ray_handlers = [pair for pair in dispatcher.handlers if pair[0] != "atoken_console"]
            dispatcher.handlers = [("atoken_console", self._worker_lines)]
        return True

    def __exit__(self, *exc_info) -> None:
        global _active
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        for name, (handlers, propagate, level) in self._saved.items():
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)  # setLevel, not .level: it clears the loggers' cached levels
        logging.captureWarnings(self._captured_warnings)
        logging.lastResort = self._last_resort
        if self._mlflow_env is None:
            os.environ.pop("MLFLOW_CONFIGURE_LOGGING", None)
        if self._ray_handlers is not None:
            # A Ray that outlives the console prints its workers' output again, as it did before.
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

            with dispatcher._lock:
                dispatcher.handlers = self._ray_handlers
        self._file.close()
        _active = None

    # -- what a person sees -------------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        """One console line (also in the log, so the log reads as a superset of the console)."""
        self._file.write(line + "\n")
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def stage_started(self, stage: str, resumed: bool, detail: str = "") -> None:
        self._started[stage] = time.perf_counter()
        self._current = stage
        self.say(f"[{stage}] {'resumed' if resumed else 'started'}{': ' + detail if detail else ''}")

    def stage_skipped(self, stage: str, fingerprint: str, note: str = "") -> None:
        self.say(f"[{stage}] skipped: done with the same fingerprint {fingerprint[:12]}{'; ' + note if note else ''}")

    def _close_bar(self, stage: str) -> None:
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.close()

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        self._close_bar(stage)
        seconds = time.perf_counter() - self._started.pop(stage, time.perf_counter())
        figures = ", ".join(f"{k} {_figure(v)}" for k, v in key_figures(summary).items())
        self.say(f"[{stage}] done in {seconds:.1f}s{': ' + figures if figures else ''}")
        self._current = None

    def stage_failed(self, stage: str, message: str) -> None:
        """In the log only: the CLI's one error line says it on the console, with the log's path."""
        self._close_bar(stage)
        self._file.write(f"[{stage}] failed: {message}\n")
        self._current = None

    def training_progress(self, report: dict[str, Any]) -> None:
        # A worker names its curriculum stage ("stage1"); the pipeline runs it as "train_stage1". A report of a
        # stage that is not running now (a late or duplicated line) is dropped rather than opening a bar.
        stage = f"train_{report['stage']}"
        if stage != self._current:
            return
        step, steps = int(report["step"]), int(report["steps"])
        note = report.get("note")
        if note and (stage, note) not in self._notes:  # Ray Train may forward a worker's line twice
            self._notes.add((stage, note))
            self.say(f"[{stage}] {note}")
        if not self.progress:
            return
        bar = self._bars.get(stage)
        if bar is None:
            # The bar counts optimizer steps; its rate and ETA come from the steps reported since it appeared
            # (a resumed stage's bar starts at its checkpoint's step).
            bar = self._bars[stage] = tqdm(total=steps, desc=stage, unit="step", initial=step, file=sys.stderr,
                                           dynamic_ncols=True, mininterval=0.5)
        figures = {k: _figure(v) for k, v in report.items() if k not in ("stage", "step", "steps", "note")}
        if figures:
            bar.set_postfix(figures, refresh=False)
        bar.update(max(0, step - bar.n))

    # -- Ray's forwarded worker output --------------------------------------------------------------------------
    def _worker_lines(self, data: dict) -> None:
        # Called on Ray's log thread, which dies on an exception it does not expect: nothing may escape.
        try:
            self._take_worker_lines(data)
        except Exception as exc:  # noqa: BLE001 - recorded; the run's output must keep flowing
            self._file.write(f"atoken console: could not take a worker's lines: {type(exc).__name__}: {exc}\n")

    def _take_worker_lines(self, data: dict) -> None:
        origin = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({origin} pid={data.get('pid')}) " if origin else f"(pid={data.get('pid')}) "
        for line in data.get("lines", []):
            if line.startswith(PROGRESS_MARK) and "{" in line:
                try:
                    report = json.loads(line[line.index("{"):])
                    self.training_progress(report)
                    continue
                except (ValueError, KeyError, TypeError):
                    pass  # not one of ours after all: an ordinary line
            self._file.write(prefix + line + "\n")
            if self.verbose:
                tqdm.write(prefix + line, file=sys.stderr)


def key_figures(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of a stage's summary worth a console line: KEY_FIGURES where it has any, else all."""
    numbers = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if any(k in KEY_FIGURES for k in numbers):
        return {k: numbers[k] for k in KEY_FIGURES if k in numbers}
    return numbers


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
