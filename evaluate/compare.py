"""`atoken compare RUN_ID...`: evaluation runs side by side, refused where a metric's protocol differs.

A run id may be a pipeline's parent run (its `evaluate` child is used), an `evaluate` stage run or an
`atoken eval` run. Numbers come from the run's metrics, protocols from its `protocol.*` tags, key params
from the pipeline's flattened config (on the parent run), stand-ins from the protocols' `stand_in` fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atoken.evaluate.protocols import DESCRIPTIVE_FIELDS, compare_protocols, protocols_from_tags
from atoken.evaluate.report import markdown_table

KEY_PARAMS = (
    "train.model.kind",
    "train.model.preset",
    "train.model.latent_channels",
    "ingest.resolution",
    "ingest.max_resolution",
    "ingest.encoding",
    "train.stages.0.steps",
    "train.stages.1.steps",
    "evaluate.baseline.kind",
    "evaluate.fid_samples",
    "evaluate.image_size",
    "run.seed",
    "checkpoint",
)
EVAL_STAGES = ("evaluate", "eval")


@dataclass
class EvalRun:
    run_id: str
    name: str
    metrics: dict[str, float]
    protocols: dict[str, dict[str, str]]
    metric_protocols: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)

    @property
    def stand_ins(self) -> list[str]:
        """Each protocol that declares a stand-in, with what it says."""
        return [
            f"{metric}: {fields['stand_in']}"
            for metric, fields in sorted(self.protocols.items())
            if fields.get("stand_in", "false") not in ("false", "False")
        ]


def _evaluation_run(client, run):
    """The run itself if it holds evaluation numbers, else its newest evaluate child."""
    if run.data.tags.get("atoken.stage") in EVAL_STAGES:
        return run
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    for child in children:
        if child.data.tags.get("atoken.stage") in EVAL_STAGES:
            return child
    raise ValueError(f"run {run.info.run_id} has no evaluation: neither an evaluate stage run nor a parent of one")


def load_run(client, run_id: str) -> EvalRun:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ValueError(f"no MLflow run {run_id} in this tracking store") from exc
    evaluation = _evaluation_run(client, run)
    protocols, metric_protocols = protocols_from_tags(evaluation.data.tags)
    metrics = {k: v for k, v in evaluation.data.metrics.items() if k in metric_protocols}
    parent_id = evaluation.data.tags.get("mlflow.parentRunId")
    params = client.get_run(parent_id).data.params if parent_id else run.data.params
    name = client.get_run(parent_id).info.run_name if parent_id else run.info.run_name
    params = dict(params) | (
        {"checkpoint": evaluation.data.tags["atoken.checkpoint"]} if "atoken.checkpoint" in evaluation.data.tags else {}
    )
    return EvalRun(
        run_id,
        name or run_id[:8],
        metrics,
        protocols,
        metric_protocols,
        {k: params[k] for k in KEY_PARAMS if k in params},
    )


def check_comparable(runs: list[EvalRun]) -> None:
    """Raise ProtocolMismatch on the first metric that two runs measured under different protocols: every pair of
    runs, over every metric either has (a metric one run lacks is shown as missing, and cannot hide a mismatch
    between two others)."""
    for key in sorted({k for run in runs for k in run.metrics}):
        having = [run for run in runs if key in run.metrics]
        for index, first in enumerate(having):
            for other in having[index + 1:]:
                mine, theirs = first.metric_protocols[key], other.metric_protocols[key]
                compare_protocols(
                    key,
                    first.protocols.get(mine, {}),
                    other.protocols.get(theirs, {}),
                    (first.run_id[:12], other.run_id[:12]),
                )


def descriptive_rows(runs: list[EvalRun]) -> list[list]:
    """Per metric, the fields that describe without refusing (the latent decoded), where the runs differ."""
    rows = []
    for key in sorted({k for run in runs for k in run.metrics}):
        for name in DESCRIPTIVE_FIELDS:
            values = [run.protocols.get(run.metric_protocols.get(key, ""), {}).get(name) if key in run.metrics
                      else None for run in runs]
            if len({v for v in values if v is not None}) > 1:
                rows.append([f"{key} ({name})", *values])
    return rows


def side_by_side(runs: list[EvalRun]) -> tuple[list[str], list[list]]:
    header = ["", *[f"{r.name} ({r.run_id[:8]})" for r in runs]]
    rows: list[list] = []
    for key in sorted({k for r in runs for k in r.metrics}):
        rows.append([key, *[r.metrics.get(key, "not measured") for r in runs]])
    rows += descriptive_rows(runs)
    for key in KEY_PARAMS:
        if any(key in r.params for r in runs):
            rows.append([key, *[r.params.get(key) for r in runs]])
    rows.append(["stand-ins", *[", ".join(s.split(":")[0] for s in r.stand_ins) or "none" for r in runs]])
    return header, rows


def compare_report(runs: list[EvalRun]) -> str:
    header, rows = side_by_side(runs)
    lines = [
        "# atoken compare",
        "",
        f"Runs: {', '.join(r.run_id for r in runs)}. Every metric shown in more than "
        "one run was measured under the same protocol, on the same data, by the same code (checked field by field "
        f"for every pair of runs; {', '.join(DESCRIPTIVE_FIELDS)} describe and may differ).",
        "",
        markdown_table(header, rows),
        "",
        "## Stand-ins declared by each run",
        "",
    ]
    for run in runs:
        lines += [f"- **{run.name} ({run.run_id[:8]})**: " + ("; ".join(run.stand_ins) or "none")]
    lines.append("")
    return "\n".join(lines)


def compare_runs(run_ids: list[str], tracking_uri: str) -> tuple[list[EvalRun], str]:
    """→ (the runs, the Markdown report); raises ProtocolMismatch naming metric and field."""
    from mlflow.tracking import MlflowClient

    if len(run_ids) < 2:
        raise ValueError("atoken compare needs at least two run ids")
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = [load_run(client, run_id) for run_id in run_ids]
    check_comparable(runs)
    return runs, compare_report(runs)
