"""The console of `atoken run`: progress from workers becomes a bar, everything else goes to the log file."""

from __future__ import annotations

import json
import logging
import time

import pytest

from atoken.pipeline.config import PipelineConfig, RaySection
from atoken.pipeline.console import PROGRESS_MARK, Console, report_progress


def forwarded(*lines: str) -> dict:
    """What Ray's driver hands its log handlers for a batch of a worker's stdout lines."""
    return {"pid": 4242, "actor_name": "RayTrainWorker", "is_err": False, "lines": list(lines)}


def marked(stage: str, step: int, steps: int, **extra) -> str:
    """A line as report_progress prints it."""
    return f"{PROGRESS_MARK}[{stage}] step {step}/{steps} " + json.dumps({"stage": stage, "step": step,
                                                                          "steps": steps, **extra})


def test_worker_progress_becomes_a_bar_and_the_rest_goes_to_the_log(tmp_path, capsys):
    log = tmp_path / "logs" / "run.log"
    with Console(log) as console:
        console.stage_started("train_stage1", resumed=False)
        # Ray Train forwards some worker lines twice: the bar and the notes take each once.
        lines = ("Failed to query Ray Train Controller actor state.", marked("stage1", 25, 300, loss=3.5),
                 marked("stage1", 50, 300, loss=2.5, note="grew latent from the previous stage"))
        console._worker_lines(forwarded(*lines, *lines))
        bar = console._bars["train_stage1"]  # the pipeline's name for the worker's "stage1"
        assert (bar.n, bar.total) == (50, 300)
        # A late line of another stage opens no bar; a marked line that is not ours stays an ordinary line.
        console._worker_lines(forwarded(marked("baseline", 300, 300), PROGRESS_MARK + "{not json"))
        assert set(console._bars) == {"train_stage1"}
        console.stage_finished("train_stage1", {"steps": 300, "loss": 2.5})
        assert not console._bars, "the stage's bar closes with it"
        console._worker_lines(forwarded(marked("stage1", 300, 300)))  # after its end line
        assert not console._bars
        console._worker_lines({"lines": None})  # malformed: logged, never raised on Ray's log thread
    shown = capsys.readouterr()
    text = log.read_text()
    assert "Failed to query" not in shown.out + shown.err
    assert "(RayTrainWorker pid=4242) Failed to query Ray Train Controller actor state." in text
    assert "atoken-progress [stage1]" not in text + shown.out + shown.err
    assert "[train_stage1] started" in shown.out
    assert "[train_stage1] done in" in shown.out and "loss 2.5" in shown.out
    assert shown.out.count("grew latent") == 1
    assert "[train_stage1] done in" in text, "the log holds the console's lines too"
    assert PROGRESS_MARK + "{not json" in text and "could not take a worker's lines" in text


def test_verbose_echoes_worker_output_and_notes_are_lines(tmp_path, capsys):
    # Negative control of the test above: the same line does reach the console when asked for.
    with Console(tmp_path / "run.log", verbose=True, progress=False) as console:
        console.stage_started("train_stage1", resumed=True)
        console._worker_lines(forwarded("Failed to query Ray Train Controller actor state.",
                                        marked("stage1", 100, 300, note="resuming at step 100")))
        assert not console._bars, "no bar without progress"
    shown = capsys.readouterr()
    assert "Failed to query" in shown.err
    assert "[train_stage1] resuming at step 100" in shown.out


def test_library_logging_goes_to_the_log_file_and_is_restored(tmp_path, capsys):
    ray_logger = logging.getLogger("ray")
    ray_logger.setLevel(logging.INFO)  # an earlier ray.init(logging_level="ERROR") in this process raised it
    before = list(ray_logger.handlers)
    root_level = logging.getLogger().level
    with Console(tmp_path / "run.log"):
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    shown = capsys.readouterr()
    text = (tmp_path / "run.log").read_text()
    assert "Token authentication" in text and "Creating initial MLflow" in text
    assert "Token authentication" not in shown.err + shown.out
    assert "Creating initial MLflow" not in shown.err + shown.out
    assert ray_logger.handlers == before
    assert logging.getLogger().level == root_level
    assert logging.getLogger("atoken.some.child").isEnabledFor(logging.INFO) == (root_level <= logging.INFO), \
        "a child logger's cached level outlived the console"


@pytest.mark.slow
def test_progress_from_a_real_ray_worker_reaches_the_bar_and_its_chatter_the_log(tmp_path, capfd):
    """Through Ray's own forwarding of a worker's stdout (the hook `attach_ray` takes over)."""
    import ray

    from atoken.pipeline.runner import start_ray

    @ray.remote
    def worker() -> None:
        print("chatter from a worker", flush=True)
        report_progress("stage1", 7, 10, loss=1.25)

    log = tmp_path / "run.log"
    with Console(log) as console:
        assert start_ray(PipelineConfig(ray=RaySection(num_cpus=1)))
        console.stage_started("train_stage1", resumed=False)
        try:
            ray.get(worker.remote())
            deadline = time.time() + 30
            while time.time() < deadline and "train_stage1" not in console._bars:
                time.sleep(0.2)
            assert console._bars["train_stage1"].n == 7
            deadline = time.time() + 30
            while time.time() < deadline and "chatter from a worker" not in log.read_text():
                time.sleep(0.2)
        finally:
            ray.shutdown()
    assert "chatter from a worker" in log.read_text()
    shown = capfd.readouterr()
    assert "chatter from a worker" not in shown.out + shown.err
    assert "Token authentication" not in shown.err
