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


@pytest.fixture()
def eval_run(tmp_path):
    """An `atoken eval` run in a real MLflow store with the given {summary key: (value, protocol)}."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "atoken-test", str(tmp_path))

    def make(name: str, numbers: dict[str, tuple[float, dict]]) -> str:
        run, _ = tracker.reopen_or_create(None, name, tags={"atoken.stage": "eval"})
        tracker.log_metrics(run, {key: value for key, (value, _) in numbers.items()})
        protocols = {key.removeprefix("eval_"): fields for key, (_, fields) in numbers.items()}
        log_tags(tracker, run, protocol_tags(protocols, {key: key.removeprefix("eval_") for key in numbers}))
        return run

    return uri, make


def test_compare_checks_every_pair_over_the_union_of_metrics(eval_run, capsys, tmp_path):
    """a has no rFID, b has rFID on 48 images, c on 5000: checking only the first run's metrics accepted
    [a, b, c]; every pair is checked, over every metric, so both [a, b, c] and [b, c] are refused."""
    uri, make = eval_run
    psnr = fid_protocol(48) | {"feature_network": "none"}
    a = make("a", {"eval_psnr": (20.0, psnr)})
    b = make("b", {"eval_psnr": (21.0, psnr), "eval_rfid": (90.0, fid_protocol(48))})
    c = make("c", {"eval_psnr": (22.0, psnr), "eval_rfid": (30.0, fid_protocol(5000))})
    for ids in ([a, b, c], [b, c], [c, a, b]):
        assert main(["compare", *ids, "--tracking-uri", uri, "--out", str(tmp_path / "r.md")]) != 0, ids
        error = capsys.readouterr().err
        assert "eval_rfid" in error and "'samples'" in error and "48" in error and "5000" in error
    # a lacks rFID: shown as missing, not refused
    assert main(["compare", a, b, "--tracking-uri", uri, "--out", str(tmp_path / "r.md")]) == 0
    rfid_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("eval_rfid"))
    assert "not measured" in rfid_line and "90" in rfid_line


def test_runs_on_different_data_of_one_size_are_refused(eval_run, capsys, tmp_path):
    uri, make = eval_run
    first = make("a", {"eval_rfid": (10.0, fid_protocol() | {"data": "32 samples, blake2b:aaaa"})})
    second = make("b", {"eval_rfid": (11.0, fid_protocol() | {"data": "32 samples, blake2b:bbbb"})})
    assert main(["compare", first, second, "--tracking-uri", uri, "--out", str(tmp_path / "r.md")]) != 0
    assert "'data'" in capsys.readouterr().err


def test_an_fsq_and_a_continuous_run_compare_side_by_side_with_their_latents_shown(eval_run, capsys, tmp_path):
    uri, make = eval_run
    kl = make("kl", {"eval_psnr": (25.0, fid_protocol() | {"latent": "posterior mean (no sampling)"})})
    fsq = make("fsq", {"eval_psnr": (23.5, fid_protocol() | {"latent": "FSQ-quantized posterior mean"})})
    assert main(["compare", kl, fsq, "--tracking-uri", uri, "--out", str(tmp_path / "r.md")]) == 0
    printed = capsys.readouterr().out
    assert "FSQ-quantized posterior mean" in printed and "posterior mean (no sampling)" in printed
    # a negative control: a field that is not descriptive still refuses
    other = make("other", {"eval_psnr": (23.5, fid_protocol() | {"crop": "centre 224"})})
    assert main(["compare", kl, other, "--tracking-uri", uri, "--out", str(tmp_path / "r.md")]) != 0
    assert "'crop'" in capsys.readouterr().err
