"""evaluate/compare.py and `atoken compare`: runs side by side from a real MLflow store, refused on a protocol
difference with one line naming the metric and the field."""

from __future__ import annotations

import pytest

from atoken.evaluate.protocols import protocol, protocol_tags
from atoken.evaluate.stage import log_tags
from atoken.pipeline.cli import main
from atoken.pipeline.tracking import Tracker


def fid_protocol(samples: int = 32, stand_in: bool | str = False) -> dict:
    return protocol(
        resize="none",
        crop="none",
        colour_range="uint8",
        samples=samples,
        frames=1,
        feature_network="InceptionV3",
        feature_network_sha256="7ff4a8",
        implementation="atoken fid@1",
        stand_in=stand_in,
    )


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "atoken-test", str(tmp_path))

    def pipeline_run(name: str, rfid: float, samples: int = 32, steps: str = "600") -> str:
        parent, _ = tracker.reopen_or_create(None, name)
        tracker.log_params(parent, {"train.model.kind": "atoken", "train.stages.0.steps": steps})
        child, _ = tracker.reopen_or_create(None, "evaluate", parent_id=parent, tags={"atoken.stage": "evaluate"})
        tracker.log_metrics(child, {"eval_rfid": rfid, "eval_psnr": 20.0 + rfid / 100, "eval_samples": 10})
        protocols = {"rfid": fid_protocol(samples), "psnr": fid_protocol(samples) | {"feature_network": "none"}}
        log_tags(tracker, child, protocol_tags(protocols, {"eval_rfid": "rfid", "eval_psnr": "psnr"}))
        return parent

    return uri, pipeline_run


def test_compare_prints_side_by_side_and_writes_the_report(store, tmp_path, capsys):
    uri, pipeline_run = store
    first, second = pipeline_run("quickstart-a", 200.0), pipeline_run("quickstart-b", 150.0, steps="900")
    out = tmp_path / "report.md"
    assert main(["compare", first, second, "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rfid_line = next(line for line in printed.splitlines() if line.startswith("eval_rfid"))
    assert "200" in rfid_line and "150" in rfid_line
    assert any(
        line.startswith("train.stages.0.steps") and "600" in line and "900" in line for line in printed.splitlines()
    )
    report = out.read_text()
    assert "| eval_rfid | 200 | 150 |" in report and "eval_samples" not in report  # no protocol: not a metric


def test_compare_refuses_a_metric_measured_under_another_protocol(store, tmp_path, capsys):
    uri, pipeline_run = store
    first, other = pipeline_run("a", 200.0, samples=32), pipeline_run("b", 150.0, samples=64)
    code = main(["compare", first, other, "--tracking-uri", uri, "--out", str(tmp_path / "r.md")])
    error = capsys.readouterr().err.strip()
    assert code != 0 and not (tmp_path / "r.md").exists()
    assert len(error.splitlines()) == 1
    assert "eval_psnr" in error and "'samples'" in error and "32" in error and "64" in error


def test_compare_names_a_missing_run(store, capsys):
    uri, pipeline_run = store
    first = pipeline_run("a", 1.0)
    assert main(["compare", first, "0" * 32, "--tracking-uri", uri]) != 0
    assert "no MLflow run" in capsys.readouterr().err
