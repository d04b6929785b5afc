"""The evaluation stage's work: score each checkpoint (a Ray task each), write and log the report.

Used by the pipeline's `evaluate` stage and by `atoken eval` alone; both write under one output folder:
metrics.json (numbers, protocols, what was not measured), per_sample.parquet, report.md and its PNGs,
all also logged as MLflow artifacts under evaluate/, and the protocols as tags.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from atoken.evaluate.protocols import differing_field, protocol_tags
from atoken.evaluate.suite import SuiteReport, SuiteSettings
from atoken.pipeline.config import EvaluateSection, ModelSection
from atoken.pipeline.storage import Storage, join
from atoken.train.data import ShardInfo


@dataclass
class Checkpoint:
    name: str  # how the report calls it: "atoken", "baseline"
    model: ModelSection
    weights_uri: str
    quantize: bool = False  # decode FSQ-quantized latents (a model whose last stage trained with FSQ)


@dataclass
class EvalData:
    images: list[ShardInfo]
    clips: list[ShardInfo]
    objects: list[ShardInfo]


class ShardSamples:
    """The samples of some shards, streamed a sample at a time each time it is iterated: the suite streams 50k
    validation images through without holding them (the list of all samples was ~5 GB of PNG bytes at 256²)."""

    def __init__(self, storage: Storage, shards: list[ShardInfo]):
        self.storage, self.shards = storage, shards

    def __iter__(self):
        from atoken.train.data import shard_samples

        for shard in self.shards:
            yield from shard_samples(self.storage, shard.uri, expected=shard.samples)


def suite_settings(section: EvaluateSection) -> SuiteSettings:
    return SuiteSettings(
        metrics=list(section.metrics),
        max_samples=section.max_samples,
        fid_samples=section.fid_samples,
        fvd_clips=section.fvd_clips,
        fvd_preset=section.fvd_preset,
        i3d_torchscript=section.i3d_torchscript,
        grid_samples=section.grid_samples,
        worst_k=section.worst_k,
        lpips_backbone=section.lpips_backbone,
        text_encoder=section.text_encoder,
        held_out_views=None if section.held_out_views is None else list(section.held_out_views),
        image_size=section.image_size,
    )


def checkpoint_from_folder(
    storage: Storage, folder: str, name: str = "checkpoint", quantize: bool = False
) -> Checkpoint:
    """A training stage's output folder (model.safetensors + model.json) → what to evaluate."""
    config_uri = join(folder, "model.json")
    if not storage.exists(config_uri):
        raise FileNotFoundError(f"--checkpoint {folder}: no model.json (pass a training stage's output folder)")
    model = ModelSection(**storage.read_json(config_uri)["model"])
    return Checkpoint(name, model, join(folder, "model.safetensors"), quantize)


def score_checkpoint(
    checkpoint: Checkpoint,
    data: EvalData,
    storage: Storage,
    settings: SuiteSettings,
    threads: int | None = None,
    progress: bool = False,
) -> SuiteReport:
    """Load the model, read the shards, run the suite: the body of one Ray task."""
    import torch

    from atoken.evaluate.adapter import adapter_for_model
    from atoken.evaluate.suite import run_suite
    from atoken.train.checkpoint import load_model_weights
    from atoken.train.model import build_model

    if threads:
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in its workers: use the CPUs granted
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(checkpoint.model)
    load_model_weights(storage, checkpoint.weights_uri, model)
    model.to(device)

    with torch.no_grad():
        return run_suite(
            adapter_for_model(model, checkpoint.name, checkpoint.quantize),
            settings,
            ShardSamples(storage, data.images),
            ShardSamples(storage, data.clips),
            ShardSamples(storage, data.objects),
            progress=progress,
        )


def score_checkpoints(
    checkpoints: list[Checkpoint], data: EvalData, storage: Storage, settings: SuiteSettings, threads: int | None = None
) -> dict[str, SuiteReport]:
    """All checkpoints in one process: the feature networks load once and reference features are shared."""
    return {c.name: score_checkpoint(c, data, storage, settings, threads) for c in checkpoints}


def score_on_ray(
    checkpoints: list[Checkpoint], data: EvalData, storage: Storage, settings: SuiteSettings
) -> dict[str, SuiteReport]:
    import ray

    resources = task_resources([node for node in ray.nodes() if node["Alive"]])
    try:
        return ray.get(ray.remote(**resources)(score_checkpoints).remote(checkpoints, data, storage, settings,
                                                                          resources["num_cpus"]))
    except ray.exceptions.RayTaskError as exc:
        # The task's own error, so that the stage and the CLI say what went wrong in one line, not "ray::task()".
        raise exc.cause if isinstance(exc.cause, Exception) else exc from None


def task_resources(nodes: list[dict]) -> dict[str, int]:
    """The evaluation task's request: one GPU where the cluster has one (the feature networks and the tokenizer
    run there), and the CPUs of the largest node that has what the task needs. One task lives on one node:
    the largest node's CPUs, not the cluster's total, which no node of a multi-node cluster has (the task
    would wait forever)."""
    with_gpu = [node for node in nodes if node["Resources"].get("GPU", 0) >= 1]
    candidates = with_gpu or nodes
    cpus = max(1, int(max((node["Resources"].get("CPU", 0) for node in candidates), default=1)))
    return {"num_cpus": cpus, "num_gpus": 1 if with_gpu else 0}


def combined(reports: dict[str, SuiteReport]) -> tuple[dict[str, float], dict[str, dict], dict[str, str]]:
    """All tokenizers' numbers in one namespace: the first as eval_*, the others prefixed with their name.
    A metric whose protocol differs from the first tokenizer's gets its own protocol name."""
    names = list(reports)
    first = reports[names[0]]
    summary, protocols, metric_protocols = dict(first.summary), dict(first.protocols), dict(first.metric_protocols)
    for name in names[1:]:
        report = reports[name]
        for key, value in report.summary.items():
            metric = report.metric_protocols[key]
            same = (
                metric in first.protocols
                and differing_field(first.protocols[metric], report.protocols[metric], ignore=()) is None
            )
            if not same:
                protocols[f"{name}.{metric}"] = report.protocols[metric]
            summary[f"{name}_{key}"] = value
            metric_protocols[f"{name}_{key}"] = metric if same else f"{name}.{metric}"
    return summary, protocols, metric_protocols


def write_outputs(
    reports: dict[str, SuiteReport],
    storage: Storage,
    output: str,
    tracker,
    run_id: str,
    title: str,
    notes: dict[str, str],
    preset: str | None = None,
) -> dict[str, Any]:
    """metrics.json, per_sample.parquet, report.md + PNGs under `output` and in MLflow; protocols as tags."""
    from atoken.evaluate.report import images, render_markdown

    summary, protocols, metric_protocols = combined(reports)
    skipped = {f"{name}.{metric}": why for name, r in reports.items() for metric, why in r.skipped.items()}
    files = images(reports)
    files["report.md"] = render_markdown(title, reports, files, notes, preset).encode()
    files["metrics.json"] = json.dumps(
        {
            "summary": summary,
            "protocols": protocols,
            "metric_protocols": metric_protocols,
            "skipped": skipped,
            "notes": notes,
        },
        indent=2,
        default=str,
    ).encode()
    files["per_sample.parquet"] = per_sample_parquet(reports)
    for file, data in files.items():
        storage.write_bytes(join(output, file), data)
        tracker.log_bytes(run_id, data, f"evaluate/{file}")
    tags = protocol_tags(protocols, metric_protocols)
    tags |= {f"skipped.{key}": why[:5000] for key, why in skipped.items()}
    tags |= {f"atoken.eval.{key}": value for key, value in notes.items()}
    log_tags(tracker, run_id, tags)
    return summary


def per_sample_parquet(reports: dict[str, SuiteReport]) -> bytes:
    """One parquet file of every tokenizer's per-sample rows, written a row chunk at a time under one schema
    (the union of the chunks' columns: an image chunk has no `frames`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fixed = [pa.field("tokenizer", pa.string()), pa.field("key", pa.string()), pa.field("modality", pa.string()),
             pa.field("source", pa.string()), pa.field("resolution", pa.string())]
    names = {f.name for f in fixed}
    numbers = sorted({column for report in reports.values() for table in report.rows.tables()
                      for column in table.column_names if column not in names})
    schema = pa.schema(fixed + [pa.field(name, pa.float64()) for name in numbers])
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema) as writer:
        for name, report in reports.items():
            for table in report.rows.tables():
                columns = {"tokenizer": pa.array([name] * table.num_rows, pa.string())}
                for column in schema:
                    if column.name != "tokenizer":
                        columns[column.name] = (table.column(column.name).cast(column.type)
                                                if column.name in table.column_names
                                                else pa.nulls(table.num_rows, column.type))
                writer.write_table(pa.table(columns, schema=schema))
    return buffer.getvalue()


def log_tags(tracker, run_id: str, tags: dict[str, str]) -> None:
    """In batches (a suite logs a few hundred tags; one call each takes seconds on sqlite), redacted as set_tags."""
    from mlflow.entities import RunTag

    from atoken.pipeline.tracking import redact

    items = [RunTag(key, redact(key, value)) for key, value in tags.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 tags per batch
        tracker.client.log_batch(run_id, tags=items[start : start + 100])


# -- the pipeline's evaluate stage and `atoken eval` --------------------------------------------------------------

OPTIONAL_INPUTS = ("ingest_videos", "ingest_3d", "train_baseline")  # read when the run has them


def val_data(storage: Storage, outputs: dict[str, str]) -> EvalData:
    """The validation shards of the run's ingest outputs ({stage name: output folder})."""
    from atoken.pipeline.stages import _shards

    images = _shards(storage, outputs["ingest"], "val")
    if not images:
        raise ValueError("no validation shards to evaluate on (ingest.val_every too large for the data?)")
    clips = _shards(storage, outputs["ingest_videos"], "val") if "ingest_videos" in outputs else []
    objects = _shards(storage, outputs["ingest_3d"], "val") if "ingest_3d" in outputs else []
    return EvalData(images, clips, objects)


def evaluate_outputs(
    config,
    storage: Storage,
    outputs: dict[str, str],
    checkpoint: Checkpoint,
    output: str,
    tracker,
    run_id: str,
    extra_notes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Score `checkpoint` (and the run's baseline, if it has one) on the run's validation data; write, log."""
    data = val_data(storage, outputs)
    checkpoints = [checkpoint]
    if "train_baseline" in outputs:
        checkpoints.append(checkpoint_from_folder(storage, outputs["train_baseline"], "baseline"))
    reports = score_on_ray(checkpoints, data, storage, suite_settings(config.evaluate))
    notes = {
        "run": config.run.name,
        **{f"weights.{c.name}": c.weights_uri for c in checkpoints},
        **{
            f"model.{c.name}": f"{c.model.kind} {c.model.preset or ''} latent {c.model.latent_channels}".strip()
            for c in checkpoints
        },
        "data": f"{len(data.images)} image, {len(data.clips)} clip, {len(data.objects)} 3D validation shards",
        **(extra_notes or {}),
    }
    title = f"Evaluation of {config.run.name}: {' vs '.join(c.name for c in checkpoints)}"
    summary = write_outputs(reports, storage, output, tracker, run_id, title, notes, checkpoint.model.preset)
    first = reports[checkpoint.name]
    return summary | {"eval_samples": sum(g["count"] for key, g in first.rows.groups.items() if key[0] == "image")}


def last_stage_quantizes(config) -> bool:
    """A tokenizer whose last stage trained through FSQ (curriculum stage 4) is scored on its quantized latents."""
    return bool(getattr(config.train.stages[-1], "quantize", False))


def run_evaluate_stage(ctx, last_train_stage: str) -> dict[str, Any]:
    """The pipeline's evaluate stage: the last training stage's model (its own model.json says its shape)."""
    outputs = {name: state.output for name, state in ctx.inputs.items()}
    checkpoint = checkpoint_from_folder(
        ctx.storage, outputs[last_train_stage], ctx.config.train.model.kind, last_stage_quantizes(ctx.config)
    )
    return evaluate_outputs(ctx.config, ctx.storage, outputs, checkpoint, ctx.output, ctx.tracker, ctx.run_id)


def run_standalone(config, checkpoint_folder: str | None = None, progress: bool = True) -> tuple[str, dict]:
    """`atoken eval CONFIG [--checkpoint PATH]`: the suite alone, on a run whose ingest (and training) is done,
    into a new MLflow run `eval` and a new folder <run.root>/eval/<run id>. → (MLflow run id, summary)."""
    from atoken.pipeline.config import flatten
    from atoken.pipeline.dag import Pipeline
    from atoken.pipeline.runner import ray_connection
    from atoken.pipeline.stages import build_stages
    from atoken.pipeline.tracking import Tracker, resolve_tracking_uri

    storage = Storage(config.storage)
    pipeline = Pipeline(config, build_stages(config), storage)
    # The newest finished output of each stage, even one whose fingerprint is stale (a code or config change
    # since it ran): evaluating what exists is the point of running the suite alone; the notes name them.
    outputs, stale, last_train = {}, [], None
    for stage, fingerprint, state in pipeline.plan():
        if state is not None and state.status == "done":
            outputs[stage.name] = state.output
            if state.fingerprint != fingerprint:
                stale.append(stage.name)
        if stage.name.startswith("train_") and stage.name != "train_baseline":
            last_train = stage.name
    if "ingest" not in outputs:
        raise ValueError("atoken eval: the run's ingest stage is not done (run `atoken run CONFIG` first)")
    if checkpoint_folder is None and last_train not in outputs:
        raise ValueError(f"atoken eval: {last_train} is not done for this config; run it, or pass --checkpoint PATH")
    folder = checkpoint_folder or outputs[last_train]
    # The run's own last stage is scored as it trained (FSQ latents after stage 4); a checkpoint given by path as
    # its model.json says, on continuous latents.
    own = checkpoint_folder is None
    checkpoint = checkpoint_from_folder(
        storage, folder, config.train.model.kind if own else "checkpoint", own and last_stage_quantizes(config)
    )
    tracker = Tracker(
        resolve_tracking_uri(config.tracking.uri, config.run.local_dir),
        config.tracking.experiment,
        config.run.local_dir,
    )
    run_id, _ = tracker.reopen_or_create(None, "eval", tags={"atoken.stage": "eval", "atoken.checkpoint": folder})
    tracker.log_params(run_id, flatten(config.to_dict()))  # what `atoken compare` shows as key params
    output = join(config.run.root, "eval", run_id)
    with tracker.finishing(run_id), ray_connection(config) as connect_ray:
        connect_ray()
        extra = {"stale_inputs": ", ".join(stale)} if stale else {}
        summary = evaluate_outputs(config, storage, outputs, checkpoint, output, tracker, run_id, extra)
        tracker.log_metrics(run_id, summary)
    return run_id, summary
