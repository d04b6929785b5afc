"""The stages of a run, built from its config: ingest → train_<stage> ... → evaluate.

Each stage reads URIs and manifests of the stages before it and writes its own; the work itself
lives in preprocess/, train/ and evaluate/, and runs on Ray.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import sys
from typing import Any

import pyarrow.parquet as pq

from atoken.pipeline.config import PipelineConfig
from atoken.pipeline.dag import Stage, StageContext
from atoken.pipeline.storage import join
from atoken.pipeline.tracking import grid_png
from atoken.train.data import ShardInfo


def build_stages(config: PipelineConfig) -> list[Stage]:
    from atoken.preprocess.job import CODE, DECODERS

    # Each ingest stage's fingerprint: its config section, the code it runs and its decoders' versions.
    stages = [Stage("ingest", (), CODE["images"], lambda c: c.ingest, run_ingest, preflight=preflight_ingest,
                    libraries=DECODERS["images"])]
    if config.videos.sources:
        stages.append(Stage("ingest_videos", (), CODE["videos"], lambda c: c.videos, run_ingest_videos,
                            preflight=preflight_videos, libraries=DECODERS["videos"]))
    if config.objects.sources:
        stages.append(Stage("ingest_3d", (), CODE["3d"], lambda c: c.objects, run_ingest_3d,
                            preflight=preflight_3d, libraries=DECODERS["3d"]))
    previous = None
    for index, train_stage in enumerate(config.train.stages):
        name = f"train_{train_stage.name}"
        # A stage reads the ingest outputs its tasks need; every stage after the first starts from the one before.
        inputs = ["ingest"]
        if "video" in train_stage.tasks:
            inputs.append("ingest_videos")
        if "3d" in train_stage.tasks:
            inputs.append("ingest_3d")
        if previous:
            inputs.append(previous)
        stages.append(Stage(
            name, tuple(inputs), ("train",),
            # The model's shape, the losses and the stage's schedule; the seed changes the samples it sees.
            lambda c, i=index: {"model": c.train.stage_model(i), "losses": c.train.losses,
                                "stage": c.train.stages[i], "seed": c.run.seed},
            lambda ctx, i=index, prev=previous: run_train(ctx, i, prev),
            preflight=preflight_model if index == 0 else None,
        ))
        previous = name
    if config.evaluate.baseline is not None:
        # The conventional baseline: the same stage-1 harness, the same images, the same number of steps.
        stages.append(Stage("train_baseline", ("ingest",), ("train",),
                            lambda c: {"model": c.evaluate.baseline, "stage": baseline_config(c).train.stages[0],
                                       "seed": c.run.seed},
                            lambda ctx: run_train(dataclasses.replace(ctx, config=baseline_config(ctx.config)), 0,
                                                  None)))
    from atoken.evaluate.stage import OPTIONAL_INPUTS

    optional = tuple(s.name for s in stages if s.name in OPTIONAL_INPUTS)
    stages.append(Stage("evaluate", ("ingest", previous, *optional), ("evaluate", "train"),
                        lambda c: c.evaluate, lambda ctx, last=previous: run_evaluate(ctx, last)))
    return stages


def preflight_videos(config: PipelineConfig) -> None:
    from atoken.pipeline.storage import Storage
    from atoken.preprocess.job import first_items

    first_items(config.videos, Storage(config.storage))


def run_ingest_videos(ctx: StageContext) -> dict[str, Any]:
    from atoken.preprocess.job import run_video_job

    stats = run_video_job(ctx.config.videos, ctx.storage, ctx.output, progress=ctx.progress,
                          resources=ctx.config.ray.preprocess_resources)
    for name in ("manifest.parquet", "errors.parquet", "_stats.json"):
        ctx.tracker.log_bytes(ctx.run_id, ctx.storage.read_bytes(join(ctx.output, name)), f"ingest_videos/{name}")
    return stats


def preflight_ingest(config: PipelineConfig) -> None:
    """Every source lists at least one item (its first: a 10M-item source is not listed here), and the sources'
    pinned splits leave room for both splits. Whether hashing puts an item in each split is known only once
    everything is listed: run_ingest checks it."""
    from atoken.pipeline.storage import Storage
    from atoken.preprocess.job import first_items

    first_items(config.ingest, Storage(config.storage))
    pinned = {source.split for source in config.ingest.sources}
    for split in ("train", "val"):
        if "auto" not in pinned and split not in pinned:
            raise ValueError(f"ingest.sources: no item lands in the {split} split (check the sources' `split`)")


def preflight_model(config: PipelineConfig) -> None:
    """A local run that asks for GPUs on a machine without one would wait for them forever: refuse it."""
    import os

    import torch

    from atoken.pipeline.config import ConfigError

    if os.environ.get("RAY_ADDRESS") or torch.cuda.is_available():
        return  # a cluster may bring its GPUs with it
    for index, stage in enumerate(config.train.stages):
        if stage.use_gpu:
            raise ConfigError(f"train.stages[{index}].use_gpu: this machine has no GPU; set RAY_ADDRESS to run on "
                              "a cluster, or --set train.stages.N.use_gpu=false")


def run_ingest(ctx: StageContext) -> dict[str, Any]:
    from atoken.evaluate.reconstruction import to_uint8
    from atoken.preprocess.job import run_image_job
    from atoken.train.data import decode_image, shard_samples

    stats = run_image_job(ctx.config.ingest, ctx.storage, ctx.output, progress=ctx.progress,
                          resources=ctx.config.ray.preprocess_resources)
    for split in ("train", "val"):
        if not stats[f"samples_{split}"]:
            raise ValueError(f"ingest: no sample landed in the {split} split ({stats['items']} items, "
                             f"{stats['failures']} failed; check the sources' `split` and ingest.val_every)")
    for name in ("manifest.parquet", "errors.parquet", "_stats.json"):
        ctx.tracker.log_bytes(ctx.run_id, ctx.storage.read_bytes(join(ctx.output, name)), f"ingest/{name}")
    first = sorted(_shards(ctx.storage, ctx.output, "train"), key=lambda s: s.uri)
    if first:
        samples = list(itertools.islice(shard_samples(ctx.storage, first[0].uri), 16))  # not the whole shard
        tiles = [to_uint8(decode_image(s)) for s in samples]
        ctx.tracker.log_bytes(ctx.run_id, grid_png([tiles[:8], tiles[8:16]] if len(tiles) > 8 else [tiles]),
                              "ingest/sample_grid.png")
    return stats


def _shards(storage, ingest_output: str, split: str) -> list[ShardInfo]:
    """The split's shards with their sample counts, from the ingest manifest."""
    import pyarrow.compute as pc

    from atoken.preprocess.writer import shard_uri

    # Two columns of the manifest, counted in Arrow: at 10M samples the rows are never Python objects.
    table = pq.read_table(io.BytesIO(storage.read_bytes(join(ingest_output, "manifest.parquet"))),
                          columns=["shard", "split"])
    counts = table.filter(pc.equal(table.column("split"), split)).column("shard").value_counts().to_pylist()
    return [ShardInfo(shard_uri(ingest_output, c["values"]), c["counts"])
            for c in sorted(counts, key=lambda c: c["values"])]


def preflight_3d(config: PipelineConfig) -> None:
    """Every 3D source lists an asset (its first: a preflight does not list 800k assets)."""
    from atoken.preprocess.objects import first_3d_items

    first_3d_items(config.objects.sources)


def run_ingest_3d(ctx: StageContext) -> dict[str, Any]:
    from atoken.preprocess.objects import ObjectSettings, iter_3d_items, run_object_job
    from atoken.preprocess.render import render_settings
    from atoken.preprocess.voxels import VoxelSettings

    section = ctx.config.objects
    render = render_settings(section.preset, section.parallelism, views=section.views, eval_views=section.eval_views,
                             resolution=section.resolution, samples=section.samples, timeout_s=section.timeout_s)
    items = iter_3d_items(section.sources, section.limit)  # streamed into the job's planner, never a list
    settings = ObjectSettings(render, VoxelSettings(grid=section.voxel_grid, min_voxels=section.min_voxels),
                              ctx.output, ctx.storage, max_item_bytes=section.max_item_mb << 20, log_assets=False)
    stats = run_object_job(items, settings, section.assets_per_shard, section.val_every, section.parallelism,
                           ctx.progress, "ingest 3d", resources=ctx.config.ray.preprocess_resources)
    for name in ("manifest.parquet", "errors.parquet", "_stats.json"):
        ctx.tracker.log_bytes(ctx.run_id, ctx.storage.read_bytes(join(ctx.output, name)), f"ingest_3d/{name}")
    return {k: v for k, v in stats.items() if isinstance(v, int | float)}


def run_train(ctx: StageContext, index: int, previous: str | None) -> dict[str, Any]:
    from atoken.train.loop import StageJob, run_train_stage
    from atoken.train.tasks import ObjectTask, TaskShards

    section = ctx.config.train.stages[index]
    shards = TaskShards(image=_shards(ctx.storage, ctx.inputs["ingest"].output, "train"))
    if not shards.image:
        raise ValueError("no training shards: every ingested item failed or went to validation")
    if "ingest_videos" in ctx.inputs:
        shards.video = _shards(ctx.storage, ctx.inputs["ingest_videos"].output, "train")
    if "ingest_3d" in ctx.inputs:
        shards.objects = _shards(ctx.storage, ctx.inputs["ingest_3d"].output, "train")
    caption_tags = check_captions(ctx, section)
    init_weights = None if previous is None else join(ctx.inputs[previous].output, "model.safetensors")
    siglip2 = ctx.config.train.model.init_from
    # The first stage starts from SigLIP2 when train.model.init_from names it; later ones from the stage before.
    init_from = init_weights or (f"siglip2:{siglip2}" if siglip2 else "random")
    ctx.tracker.set_tags(ctx.run_id, {"atoken.init_from": init_from,
                                      "atoken.tasks": " ".join(section.tasks),
                                      **({"atoken.3d_render_loss": ObjectTask.RENDER_LOSS_VIEWS}
                                         if "3d" in section.tasks else {}),
                                      "atoken.batches": f"packed, {section.max_tokens} tokens"
                                      if section.max_tokens else f"{section.batch_size} images",
                                      **caption_tags})
    job = StageJob(section, ctx.config.train.stage_model(index), shards, ctx.output, init_weights, ctx.storage,
                   ctx.tracker, ctx.run_id, ctx.config.run.seed, ctx.config.train.losses)
    run_train_stage(job, ctx.config.run.local_dir, ctx.config.ray.train_resources)
    final = ctx.storage.read_json(join(ctx.output, "model.json"))
    ctx.tracker.log_bytes(ctx.run_id, json.dumps(final, indent=2).encode(), "train/model.json")
    latest = ctx.storage.read_json(join(ctx.output, "checkpoints", "latest.json"))
    summary = {"steps": final["steps"], "last_checkpoint_step": latest["step"]}
    # The last log step's loss and rate, for the stage's end line.
    summary |= final.get("last_metrics", {})
    return summary


CAPTION_INPUTS = {"image": "ingest", "video": "ingest_videos", "3d": "ingest_3d"}


def captionless(storage, ingest_output: str) -> tuple[int, int]:
    """(training samples whose caption is empty or their own key, training samples), counted in Arrow a batch of
    rows at a time (the manifest's bytes are read, its rows never become Python objects): such a sample's
    caption is its key (train/data.py caption_of)."""
    import pyarrow.compute as pc

    manifest = pq.ParquetFile(io.BytesIO(storage.read_bytes(join(ingest_output, "manifest.parquet"))))
    columns = ["key", "caption", "split"]
    if not set(columns) <= set(manifest.schema_arrow.names):
        return 0, 0
    missing = total = 0
    for batch in manifest.iter_batches(columns=columns, batch_size=65536):
        train = batch.filter(pc.equal(batch.column("split"), "train"))
        caption = pc.fill_null(train.column("caption"), "")
        missing += int(pc.sum(pc.or_(pc.equal(caption, ""), pc.equal(caption, train.column("key")))).as_py() or 0)
        total += train.num_rows
    return missing, total


def check_captions(ctx: StageContext, section) -> dict[str, str]:
    """Tags saying how many of each task's training samples have a caption; a task whose captions are all empty
    or keys says so in one console line, since its understanding losses would align samples with file names."""
    from atoken.pipeline import console

    tags = {}
    for task in dict.fromkeys(section.tasks):
        missing, total = captionless(ctx.storage, ctx.inputs[CAPTION_INPUTS[task]].output)
        if not total:
            continue
        tags[f"atoken.captions.{task}"] = f"{total - missing} of {total} training samples captioned"
        if missing == total and ctx.config.train.losses.semantic > 0 and ctx.config.train.model.kind == "atoken":
            line = (f"[train_{section.name}] warning: all {total} {task} training captions are empty or the "
                    "sample's key, so its understanding losses align samples with file names (give captions: "
                    "key.txt / key.json sidecars, a caption column)")
            active = console.active()
            if active is not None:
                active.say(line)
            else:
                print(line, file=sys.stderr, flush=True)
    return tags


def baseline_config(config: PipelineConfig) -> PipelineConfig:
    """The run's config with the baseline model and one image stage: stage 1's schedule, baseline_steps steps,
    in batches of one size (a convolutional model packs nothing): the evaluation's image_size, else the top of
    stage 1's range."""
    first = config.train.stages[0]
    size = first.image_resolution
    if isinstance(size, list) or (size is None and config.ingest.resolution is None):
        size = config.evaluate.image_size or (size[1] if isinstance(size, list) else config.ingest.max_resolution)
    stage = dataclasses.replace(first, name="baseline", max_tokens=None, image_resolution=size,
                                steps=config.evaluate.baseline_steps or first.steps)
    train = dataclasses.replace(config.train, model=config.evaluate.baseline, stages=[stage])
    return dataclasses.replace(config, train=train)


def run_evaluate(ctx: StageContext, last_train_stage: str) -> dict[str, Any]:
    from atoken.evaluate.stage import run_evaluate_stage

    return run_evaluate_stage(ctx, last_train_stage)
