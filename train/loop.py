"""One training stage: a thin loop run by every Ray Train worker, and the launcher that starts it.

The loop reads like pseudocode: for each task of the stage's round-robin, a micro-batch, forward, loss terms,
backward (gradients accumulate); then clip, step, EMA, log, maybe checkpoint. It resumes from the newest
committed checkpoint in its own output (exact: model, EMA, optimizer, RNG and every task's data position), or
starts from the previous stage's final model (grown when the latent widens).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from atoken.pipeline.config import LossSection, ModelSection, TrainStageSection
from atoken.pipeline.console import print_progress
from atoken.pipeline.storage import Storage
from atoken.pipeline.tracking import Tracker
from atoken.train.checkpoint import Checkpointer, load_model_weights, restore_rng, rng_tensors, save_model
from atoken.train.frozen import Frozen
from atoken.train.model import build_model
from atoken.train.optim import EMA, learning_rate, parameter_groups
from atoken.train.parallel import distribute, gradient_sync
from atoken.train.streams import TaskStreams, loader_settings, worker_streams
from atoken.train.tasks import TaskShards, build_tasks, micro_batch


@dataclass
class StageJob:
    """Everything a worker needs, picklable; no credentials (workers read the standard AWS_* chain)."""
    stage: TrainStageSection
    model: ModelSection  # with this stage's latent width
    shards: TaskShards
    output: str
    init_weights: str | None  # the previous stage's model.safetensors
    storage: Storage
    tracker: Tracker | None  # None: no MLflow (benchmarks)
    run_id: str
    seed: int
    losses: LossSection = field(default_factory=LossSection)
    artifacts: bool = True  # reconstruction grid, clip and turntable at the stage's end (rank 0)


@dataclass
class WorkerRuntime:
    """What the loop needs from whoever runs it: Ray Train on a cluster, or a plain process."""
    rank: int
    world_size: int
    device: torch.device
    prepare_model: Callable[..., torch.nn.Module]
    report: Callable[[dict[str, float]], None]
    # (stage, step, steps, figures) on log steps, rank 0: the driver's progress bar under Ray, a line otherwise.
    progress: Callable[..., None] = print_progress


def ray_train_runtime() -> WorkerRuntime:
    import ray.train
    import ray.train.torch

    from atoken.pipeline.console import report_progress

    context = ray.train.get_context()
    return WorkerRuntime(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                         ray.train.torch.prepare_model, ray.train.report, report_progress)


def single_process_runtime(device: str = "cpu") -> WorkerRuntime:
    """One process, no Ray: what the GPU benchmark runs (the lent GPU has no Ray installed)."""
    target = torch.device(device)
    return WorkerRuntime(0, 1, target, lambda model, **_: model.to(target), lambda metrics: None)


def initial_model(job: StageJob, runtime: WorkerRuntime) -> torch.nn.Module:
    """The stage's starting weights, the same on every rank: the previous stage's model (grown when the latent
    widens), else SigLIP2 (`train.model.init_from`), else the seeded random initialisation."""
    torch.manual_seed(job.seed)
    model = build_model(job.model)
    if job.init_weights:
        grown = load_model_weights(job.storage, job.init_weights, model)
        if grown and runtime.rank == 0:
            runtime.progress(job.stage.name, 0, job.stage.steps,
                             note=f"grew {', '.join(grown)} from the previous stage")
    elif job.model.init_from:
        from atoken.train.model.pretrained import load_siglip2_weights

        loaded = load_siglip2_weights(model, job.model.init_from)
        if runtime.rank == 0:
            runtime.progress(job.stage.name, 0, job.stage.steps,
                             note=f"encoder from SigLIP2 at {job.model.init_from} ({len(loaded)} tensors)")
    return model


def gather_positions(positions: dict[str, int], world_size: int) -> dict[str, int]:
    """Every worker's stream positions (each worker holds its own streams'): what a checkpoint records."""
    if world_size == 1:
        return dict(positions)
    import torch.distributed as dist

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, dict(positions))
    return {key: value for part in gathered for key, value in part.items()}


def global_terms(terms: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """The logged terms: each worker's share summed and divided by the world size, i.e. the global batch's
    mean (the shares are scaled by `WorldShare`). The loss terms reach the host here only, on log steps."""
    names = sorted(terms)
    values = torch.stack([terms[name].detach().float().reshape(()) for name in names])
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
        values = values / world_size
    return dict(zip(names, values.tolist(), strict=True))


# The version of the data order a checkpoint's positions refer to: 2 since the loader's shard streams (train/loader.py)
# and equal contiguous blocks when shards are fewer than ranks (train/data.py); 3 since shards are shuffled a window
# at a time (train/data.py) and sizes drawn by `keyed_draw` (train/loader.py).
DATA_LAYOUT = 3


def train_worker(job: StageJob, runtime: WorkerRuntime | None = None) -> dict[str, float]:
    """Train one stage to `job.stage.steps`; returns the last logged metrics."""
    runtime = runtime or ray_train_runtime()
    rank, world_size, device, stage = runtime.rank, runtime.world_size, runtime.device, job.stage
    if stage.deterministic:
        # cuBLAS is deterministic only with a fixed workspace (PyTorch's reproducibility notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels have no deterministic version (bilinear interpolation's, used
        # to resize for the perceptual terms; gsplat's rasteriser backward): they warn, naming themselves,
        # instead of stopping the run. CPU kernels are deterministic already.
        torch.use_deterministic_algorithms(True, warn_only=True)
    raw_model = initial_model(job, runtime)
    model = distribute(raw_model, runtime, stage)
    embeds = hasattr(raw_model, "embed")
    patch = job.model.patch_size if job.model.kind == "atoken" else 16
    tasks = build_tasks(stage, job.losses, embeds=embeds, patch=patch)
    semantic = embeds and job.losses.semantic > 0
    perceptual = ("image" in tasks and job.losses.lpips + job.losses.gram + job.losses.clip_perceptual > 0) or \
        ("3d" in tasks and job.losses.render_lpips > 0)
    frozen = Frozen(job.losses, device, need_perceptual=perceptual, need_text=semantic, bf16=stage.bf16)
    # Training draws nothing from the global RNG (noise and views come from per-stream generators); it is
    # seeded per rank all the same, for anything a library draws.
    torch.manual_seed(job.seed + rank)
    optimizer = torch.optim.AdamW(parameter_groups(raw_model, stage), lr=stage.lr, betas=(0.9, 0.95))
    ema = EMA(raw_model, stage.ema_decay) if stage.ema_decay else None
    # Each rank writes its own shard (DCP) and reads back only the byte ranges it needs.
    checkpointer = Checkpointer(job.storage, job.output, rank, world_size, keep_last=stage.keep_checkpoints,
                                async_save=stage.async_checkpoint)
    restored = checkpointer.load_latest(model, optimizer, ema.weights if ema else None)
    state = restored.shared_state if restored else {"step": 0, "positions": {}}
    data_streams = stage.data_streams or stage.num_workers
    if restored is not None:
        if restored.rank_tensors is not None:  # the same world size: this rank's own RNG
            restore_rng(restored.rank_tensors)
        if stage.data_streams is None:  # unset: the streams the checkpoint was written with, on any world size
            data_streams = state.get("data_streams", data_streams)
        if state.get("data_streams", data_streams) != data_streams:
            raise ValueError(f"{stage.name}'s checkpoint was written with {state['data_streams']} data streams, this "
                             f"run has {data_streams}: keep train.stages[].data_streams to resume it")
        if state.get("data_layout", 1) != DATA_LAYOUT:
            raise ValueError(f"{stage.name}'s checkpoint was written by a loader that orders the data differently "
                             f"(layout {state.get('data_layout', 1)}, this one {DATA_LAYOUT}): its data positions "
                             "would resume onto other samples; start the stage again")
        if state.get("shard_interleave", 1) != stage.shard_interleave:
            raise ValueError(f"{stage.name}'s checkpoint was written with shard_interleave "
                             f"{state.get('shard_interleave', 1)}, this run has {stage.shard_interleave}: keep "
                             "train.stages[].shard_interleave to resume it")
        if rank == 0:
            workers = "" if restored.saved_world_size == world_size else \
                f" (written by {restored.saved_world_size} workers, resharded to {world_size})"
            runtime.progress(stage.name, state["step"], stage.steps,
                             note=f"resuming at step {state['step']} from its last checkpoint{workers}")
    streams = TaskStreams(tasks, job.shards, job.storage, job.seed, worker_streams(data_streams, rank, world_size),
                          data_streams, state["positions"], loader_settings(stage, device))
    # The per-micro-batch exchange of captions and counts (host objects) on gloo: it never waits on the GPU.
    objects_group = None
    if world_size > 1:
        import torch.distributed as dist

        objects_group = dist.new_group(backend="gloo")
    if rank == 0 and job.tracker is not None:
        job.tracker.set_tags(job.run_id, frozen.stand_ins())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and stage.bf16)

    step = state["step"]
    window = {"start": time.perf_counter(), "steps": 0, "tokens": 0, "data_wait": 0.0}
    metrics: dict[str, float] = {}
    while step < stage.steps:
        rate = learning_rate(step, stage)
        for group in optimizer.param_groups:
            group["lr"] = rate * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        for slot, name in enumerate(stage.tasks):
            waited = time.perf_counter()
            batch, parts = streams.next(name)
            micro = micro_batch(tasks[name], batch, parts, job.seed, slot, step, world_size, device, objects_group)
            window["data_wait"] += time.perf_counter() - waited
            # Gradients of all but the last micro-batch stay local: one all-reduce per optimizer step.
            with gradient_sync(model, last=slot == len(stage.tasks) - 1):
                with autocast:
                    total, task_terms = tasks[name].losses_of(model, micro, frozen)
                (total / len(stage.tasks)).backward()
            repeats = stage.tasks.count(name)  # a task listed k times logs the mean of its k micro-batches
            for key, value in task_terms.items():
                terms[f"{name}/{key}"] = terms.get(f"{name}/{key}", 0.0) + value.detach() / repeats
            window["tokens"] += sum(part.tokens for part in parts)
        parameters = [p for p in raw_model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, stage.grad_clip or math.inf)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        if ema is not None:
            ema.update(raw_model)
        step += 1
        window["steps"] += 1

        if step % stage.log_every == 0 or step == stage.steps:
            seconds = time.perf_counter() - window["start"]
            logged = global_terms(terms | {"tokens": torch.tensor(float(window["tokens"]), device=device)}, world_size)
            tokens = logged.pop("tokens") * world_size  # every worker's (packs differ in size)
            metrics = {f"train/{k}": v for k, v in logged.items()}
            metrics |= {"train/loss": sum(logged[f"{n}/total"] for n in dict.fromkeys(stage.tasks)),
                        "train/lr": rate, "train/grad_norm": float(grad_norm),
                        "train/steps_per_second": window["steps"] / max(seconds, 1e-9),
                        "train/tokens_per_second": tokens / max(seconds, 1e-9),
                        "train/step_seconds": seconds / window["steps"],
                        "train/data_wait_seconds": window["data_wait"] / window["steps"]}
            if rank == 0 and job.tracker is not None:
                job.tracker.log_metrics(job.run_id, metrics, step=step)
            if rank == 0:
                runtime.progress(stage.name, step, stage.steps, loss=metrics["train/loss"],
                                 steps_per_s=metrics["train/steps_per_second"])
            runtime.report(metrics)
            window = {"start": time.perf_counter(), "steps": 0, "tokens": 0, "data_wait": 0.0}
        if step % stage.checkpoint_every == 0 or step == stage.steps:
            # Positions of every stream (world-size independent) in the shared state; RNG per rank.
            positions = gather_positions(streams.positions, world_size)
            checkpointer.save(step, model, optimizer, ema.weights if ema else None,
                              shared_state={"step": step, "positions": positions, "stage": stage.name,
                                            "data_streams": data_streams,
                                            "shard_interleave": stage.shard_interleave,
                                            "data_layout": DATA_LAYOUT},
                              rank_state={}, rank_tensors=rng_tensors())
    streams.close()
    checkpointer.wait()  # the last commit is done (and an asynchronous write's failure raised) before the end
    # EMA gathered on every rank (a collective under FSDP) like the weights.
    # The last log step's loss and rate travel in model.json: Ray Train v2's result carries metrics only with
    # checkpoints, and the stage's end line wants them.
    last = {name: metrics[f"train/{name}"] for name in ("loss", "steps_per_second") if f"train/{name}" in metrics}
    save_model(job.storage, job.output, model, {"model": asdict(job.model), "steps": step, "ema": ema is not None,
                                                "last_metrics": last},
               write=rank == 0, ema=ema.full() if ema else None)
    if rank == 0 and job.artifacts and job.tracker is not None and not isinstance(model, FSDPModule):
        from atoken.train.artifacts import log_stage_artifacts

        log_stage_artifacts(job, raw_model, tasks)
    return metrics


def run_train_stage(job: StageJob, local_dir: str, resources: dict[str, float] | None = None) -> None:
    """Run `train_worker` on Ray Train workers and wait; raises if any worker fails.

    `resources`: Ray custom resources each worker also asks for (config `ray.train_resources`), which keeps
    training on a cluster's GPU workers.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = resources or {}
    # A worker lives on one node: share the largest eligible node's CPUs, not the cluster's total.
    node_cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]
                 and all(node["Resources"].get(name, 0) >= amount for name, amount in resources.items())]
    cpus = max(1, int(max(node_cpus, default=1)) // job.stage.num_workers)
    # Ray sets OMP_NUM_THREADS=1 in its workers: give torch the cores each CPU worker was granted.
    threads = None if job.stage.use_gpu else cpus
    trainer = TorchTrainer(
        functools.partial(_threads_then_train, job, threads),
        scaling_config=ScalingConfig(num_workers=job.stage.num_workers, use_gpu=job.stage.use_gpu,
                                     resources_per_worker=({"GPU": 1} if job.stage.use_gpu else {"CPU": cpus})
                                     | resources),
        # A dead worker restarts the group; train_worker then resumes from the stage's own latest checkpoint.
        run_config=RunConfig(name=f"{job.stage.name}-{job.run_id[:8]}",
                             storage_path=str(Path(local_dir).resolve() / "ray_train"),
                             failure_config=FailureConfig(max_failures=job.stage.max_failures)),
    )
    trainer.fit()


def _threads_then_train(job: StageJob, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    train_worker(job)

