"""`atoken`: run a pipeline, show its status, or run one preprocessing job on its own.

Every failure ends in one line on stderr (`atoken: error: ...`) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from atoken.pipeline.config import ConfigError

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atoken", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run every stage of CONFIG that is not already done")
    _config_arguments(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    run.add_argument("--refresh-ingest", action="store_true",
                     help="list the sources of finished ingest stages again and ingest what changed, in place "
                          "(a finished stage is otherwise skipped without listing); later stages keep their outputs")
    run.add_argument("--verbose", action="store_true",
                     help="also print Ray's, MLflow's and the workers' own output (always in the run's log file)")

    status = commands.add_parser("status", help="each stage's state, fingerprint, outputs and MLflow run")
    _config_arguments(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    preprocess = commands.add_parser("preprocess", help="one preprocessing job, outside a pipeline run")
    kinds = preprocess.add_subparsers(dest="kind", required=True)
    from atoken.pipeline.preprocess_cli import add_standalone_arguments
    from atoken.preprocess.objects import add_3d_arguments

    # Their options are the config sections' fields (pipeline/preprocess_cli.py): what the ingest stages run.
    images = kinds.add_parser("images", help="images (folder, s3://, list file, builtin:NAME) → WebDataset shards "
                                             "+ manifests in OUT, as the ingest stage")
    add_standalone_arguments(images, "images")
    videos = kinds.add_parser("videos", help="videos (folder, s3://, list file, builtin:NAME) → clips in WebDataset "
                                             "shards + manifests in OUT, as the ingest_videos stage")
    add_standalone_arguments(videos, "videos")
    objects = kinds.add_parser("3d", help="meshes (a folder, builtin:pybullet, objaverse:MIRROR) → Blender "
                                          "renders, 64³ voxels + nearest-view patches in shards + manifests")
    add_3d_arguments(objects)
    for kind in (images, videos, objects):
        kind.add_argument("--resources", type=_resources, default=None, metavar="JSON",
                          help='Ray custom resources per task, e.g. \'{"render": 1}\' to run on render workers '
                               "(default: --config's ray.preprocess_resources, else none)")

    submit = commands.add_parser("submit", help="run CONFIG (or `-- COMMAND...`, any atoken command) on a Ray "
                                                "cluster as a job (Ray Jobs API); or inspect, follow or stop a job")
    submit.add_argument("config", nargs="?", help="a YAML config inside the working dir")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one field (repeatable), passed to the job's `atoken run`")
    submit.add_argument("--address", default=None,
                        help="the head's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)")
    submit.add_argument("--working-dir", default=".", help="the folder shipped with the job (default: .)")
    submit.add_argument("--submission-id", default=None, help="a job id of your choosing (default: Ray's)")
    submit.add_argument("--no-wait", action="store_true",
                        help="return once the job has reported its MLflow parent run, without following it")
    action = submit.add_mutually_exclusive_group()
    action.add_argument("--status", metavar="JOB_ID", help="the job's state, entrypoint and MLflow parent run")
    action.add_argument("--logs", metavar="JOB_ID", help="the job's logs so far")
    action.add_argument("--follow", metavar="JOB_ID", help="stream the job's logs until it ends")
    action.add_argument("--stop", metavar="JOB_ID", help="stop the job and wait for it to end")

    evaluate = commands.add_parser("eval", help="run the evaluation suite alone on a run's data: its last training "
                                                "stage, or --checkpoint PATH")
    _config_arguments(evaluate)
    evaluate.add_argument("--checkpoint", default=None, metavar="PATH",
                          help="a training stage's output folder (model.safetensors + model.json) to evaluate instead")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.add_argument("--verbose", action="store_true", help="also print Ray's, MLflow's and the workers' output")
    compare = commands.add_parser("compare", help="evaluation runs side by side; refuses metrics whose protocols "
                                                  "differ")
    compare.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="MLflow run ids (pipeline or evaluation runs)")
    compare.add_argument("--tracking-uri", default=None,
                         help="default: MLFLOW_TRACKING_URI, else sqlite:///.atoken/mlflow.db as `atoken run` uses")
    compare.add_argument("--out", default=None, help="the Markdown report (default: compare-<first run id>.md)")

    argv = sys.argv[1:] if argv is None else list(argv)
    # `atoken submit [options] -- preprocess images SRC OUT ...`: what follows `--` is an atoken command to run
    # on the cluster as it is, so argparse never sees it.
    passthrough: list[str] = []
    if argv[:1] == ["submit"] and "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.passthrough = passthrough

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            return _status(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "submit":
            return _submit(args)
        if args.kind == "3d":
            from atoken.preprocess.objects import preprocess_3d_main

            return preprocess_3d_main(args)
        return _preprocess_images(args) if args.kind == "images" else _preprocess_videos(args)
    except ConfigError as exc:
        print(f"atoken: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("atoken: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, non-zero exit
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log = getattr(args, "log_path", None)
        print(f"atoken: error: {message}" + (f" (details: {log})" if log else ""), file=sys.stderr)
        if os.environ.get("ATOKEN_DEBUG"):
            raise
        return EXIT_FAILURE


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one field, e.g. --set train.stages.0.steps=50 (repeatable)")


def _load(args: argparse.Namespace):
    from atoken.pipeline.config import load_config

    return load_config(args.config, args.overrides)


def _console(args: argparse.Namespace, config, what: str):
    """The run's console: its log file under run.local_dir/logs, named in the first line and in any error line."""
    from pathlib import Path

    from atoken.pipeline.console import Console

    args.log_path = Path(config.run.local_dir) / "logs" / f"{config.run.name}-{what}.log"
    return Console(args.log_path, verbose=args.verbose, progress=not args.no_progress)


def _run(args: argparse.Namespace) -> int:
    config = _load(args)
    with _console(args, config, "run") as console:
        return _run_in(args, config, console)


def _run_in(args: argparse.Namespace, config, console) -> int:
    from atoken.pipeline.runner import run_pipeline

    console.say(f"atoken: run {config.run.name!r} → {config.run.root} (log: {args.log_path})")
    started = time.perf_counter()
    # Said before any stage runs: `atoken submit` reads this line from a cluster job's logs.
    result = run_pipeline(config, progress=not args.no_progress, refresh_ingest=args.refresh_ingest,
                          on_parent_run=lambda run_id, uri: console.say(
        f"atoken: MLflow parent run {run_id} at {_redacted(uri)}"))
    from atoken.pipeline.console import key_figures

    rows = []
    for outcome in result.outcomes:
        numbers = ", ".join(f"{k}={_short(v)}" for k, v in key_figures(outcome.state.summary).items())
        rows.append((outcome.name, outcome.action, f"{outcome.seconds:.1f}s", outcome.state.fingerprint[:12],
                     outcome.state.run_id[:12], numbers))
    _table(("stage", "action", "time", "fingerprint", "mlflow run", "summary"), rows)
    print(f"done in {time.perf_counter() - started:.1f}s; MLflow parent run {result.parent_run_id} "
          f"at {_redacted(result.tracking_uri)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    config = _load(args)
    from atoken.pipeline.dag import Pipeline
    from atoken.pipeline.stages import build_stages
    from atoken.pipeline.storage import Storage

    pipeline = Pipeline(config, build_stages(config), Storage(config.storage))
    rows = pipeline.status()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(("stage", "state", "fingerprint", "mlflow run", "output"),
               [(r["stage"], r["state"], r["fingerprint"][:12], (r["mlflow_run_id"] or "-")[:12], r["output"] or "-")
                for r in rows])
    return 0


def _preprocess_images(args: argparse.Namespace) -> int:
    from atoken.preprocess.job import run_image_job

    return _preprocess(args, run_image_job)


def _preprocess_videos(args: argparse.Namespace) -> int:
    from atoken.preprocess.job import run_video_job

    return _preprocess(args, run_video_job)


def _preprocess(args: argparse.Namespace, run_job) -> int:
    """The ingest stage's job on the section `pipeline/preprocess_cli.py` resolves (checked before any work)."""
    from atoken.pipeline.preprocess_cli import resolve

    job = resolve(args.kind, args)  # before the heavier imports: a bad flag is reported at once
    from atoken.pipeline.runner import start_ray
    from atoken.pipeline.stages import preflight_ingest, preflight_videos

    storage = job.storage
    # The stage's own preflight: sources that list nothing (or a missing folder) stop before OUT or Ray are touched.
    (preflight_ingest if args.kind == "images" else preflight_videos)(job.config)
    storage.check_writable(job.out)
    start_ray(job.config)
    stats = run_job(job.section, storage, job.out, progress=job.progress, resources=job.resources, redo=args.redo)
    print(json.dumps(stats, indent=2))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from atoken.pipeline import submit

    if args.status:
        print(json.dumps(submit.describe(args.status, args.address), indent=2))
        return 0
    if args.logs:
        print(submit.logs(args.logs, args.address), end="")
        return 0
    if args.stop:
        status = submit.stop(args.stop, args.address)
        print(f"atoken: job {args.stop}: {status}")
        return 0 if status in submit.TERMINAL else EXIT_FAILURE
    if args.follow:
        status, _ = submit.follow(args.follow, args.address)
        print(f"atoken: job {args.follow}: {status}")
        return 0 if status == "SUCCEEDED" else EXIT_FAILURE
    if args.passthrough:
        if args.config or args.overrides:
            raise ConfigError("submit: give either CONFIG (with --set) or an atoken command after --, not both")
        job = submit.submit_command(args.passthrough, args.address, args.working_dir, args.submission_id)
        print(f"atoken: submitted job {job.job_id} to {job.address}: {job.entrypoint}", flush=True)
        if args.no_wait:
            return 0
        status, _ = submit.follow(job.job_id, args.address)
        print(f"atoken: job {job.job_id}: {status}")
        return 0 if status == "SUCCEEDED" else EXIT_FAILURE
    if not args.config:
        raise ConfigError("submit: give a CONFIG to run, an atoken command after --, or one of "
                          "--status/--logs/--follow/--stop JOB_ID")
    job = submit.submit(args.config, args.overrides, args.address, args.working_dir, args.submission_id)
    print(f"atoken: submitted job {job.job_id} to {job.address}: {job.entrypoint}", flush=True)
    status, parent = submit.follow(job.job_id, args.address, until_parent_run=args.no_wait)
    if parent:
        print(f"atoken: job {job.job_id}: MLflow parent run {parent}", flush=True)
    if args.no_wait:
        print(f"atoken: job {job.job_id} is {status}; follow it with `atoken submit --follow {job.job_id} "
              f"--address {job.address}`")
        return 0 if status not in ("FAILED", "STOPPED") else EXIT_FAILURE
    print(f"atoken: job {job.job_id}: {status}")
    return 0 if status == "SUCCEEDED" else EXIT_FAILURE


def _resources(text: str) -> dict[str, float]:
    """`--resources '{"render": 1}'` → {"render": 1.0}; argparse turns the ValueError into a usage error."""
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(v, int | float) and v > 0 for v in value.values()):
        raise ValueError(text)
    return {str(k): float(v) for k, v in value.items()}


def _eval(args: argparse.Namespace) -> int:
    config = _load(args)
    from atoken.evaluate.stage import run_standalone

    with _console(args, config, "eval") as console:
        console.say(f"atoken: evaluating {config.run.name!r} (log: {args.log_path})")
        run_id, summary = run_standalone(config, args.checkpoint, progress=not args.no_progress)
    _table(("metric", "value"), [(k, _short(v)) for k, v in sorted(summary.items())])
    print(f"atoken: evaluation run {run_id}; report at {config.run.root}/eval/{run_id}/report.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from atoken.evaluate.compare import compare_runs, side_by_side
    from atoken.evaluate.protocols import ProtocolMismatch
    from atoken.pipeline.tracking import resolve_tracking_uri

    try:
        runs, report = compare_runs(args.run_ids, resolve_tracking_uri(args.tracking_uri, ".atoken"))
    except ProtocolMismatch as exc:
        print(f"atoken: refused: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    header, rows = side_by_side(runs)
    _table(tuple(header), [tuple("–" if c is None else _short(c) for c in row) for row in rows])
    out = Path(args.out or f"compare-{args.run_ids[0][:12]}.md")
    out.write_text(report)
    print(f"atoken: report written to {out}")
    return 0


def _short(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _redacted(uri: str) -> str:
    from atoken.pipeline.tracking import redact

    return redact("uri", uri)


def _table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    for line in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
