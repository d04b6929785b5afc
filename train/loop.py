"""One training stage: a thin loop run by every Ray Train worker, and the launcher that starts it.

The loop reads like pseudocode: for each task of the stage's round-robin, a micro-batch, forward, loss terms,
backward (gradients accumulate); then clip, step, EMA, log, maybe checkpoint. It resumes from the newest
committed checkpoint in its own output (exact: model, EMA, optimizer, RNG and every task's data position), or
starts from the previous stage's final model (grown when the latent widens).
"""

from __future__ import annotations

import contextlib
import functools
import math
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
from atoken.train.checkpoint import load_latest_checkpoint, load_model_weights, save_checkpoint, save_model
from atoken.train.model import build_model
from atoken.train.tasks import Frozen, TaskShards, build_tasks, task_streams

ENCODER_PREFIXES = ("embeddings.", "encoder.", "post_layernorm.")


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


def learning_rate(step: int, stage: TrainStageSection) -> float:
    """Linear warm-up, then cosine to 10% of the peak (the paper's 3e-4 → 3e-5 shape)."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def parameter_groups(model: torch.nn.Module, stage: TrainStageSection) -> list[dict]:
    """AdamW groups: the encoder at encoder_lr_scale (it starts from SigLIP2); no weight decay on gains, biases
    and the sigmoid loss's scale and bias (vectors and scalars), as is usual for transformers."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        key = (name.startswith(ENCODER_PREFIXES), parameter.dim() >= 2)
        groups.setdefault(key, []).append(parameter)
    return [{"params": params, "lr_scale": stage.encoder_lr_scale if encoder else 1.0,
             "weight_decay": stage.weight_decay if decays else 0.0}
            for (encoder, decays), params in sorted(groups.items())]


class EMA:
    """Exponential moving average of the weights (spec: 0.9999), kept in float32 beside the model. Under FSDP
    the averages are sharded like the weights (DTensors), so no rank holds a whole copy until `full()`."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.weights = {name: tensor.detach().float().clone() for name, tensor in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                self.weights[name].lerp_(tensor.float(), 1.0 - self.decay)
            else:
                self.weights[name].copy_(tensor)

    def full(self) -> dict[str, torch.Tensor]:
        """Whole tensors on the CPU (a collective under FSDP: every rank calls it)."""
        return {name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()
                for name, tensor in self.weights.items()}


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


def train_worker(job: StageJob, runtime: WorkerRuntime | None = None) -> dict[str, float]:
    """Train one stage to `job.stage.steps`; returns the last logged metrics."""
    runtime = runtime or ray_train_runtime()
    rank, world_size, device, stage = runtime.rank, runtime.world_size, runtime.device, job.stage
    torch.manual_seed(job.seed)  # the same initial weights on every rank: FSDP keeps each rank's own shard of them
    raw_model = build_model(job.model)
    if job.init_weights:
        grown = load_model_weights(job.storage, job.init_weights, raw_model)
        if grown and rank == 0:
            runtime.progress(stage.name, 0, stage.steps, note=f"grew {', '.join(grown)} from the previous stage")
    model = distribute(raw_model, runtime, stage)
    tasks = build_tasks(stage, job.losses)
    semantic = hasattr(raw_model, "embed") and job.losses.semantic > 0
    perceptual = ("image" in tasks and job.losses.lpips + job.losses.gram + job.losses.clip_perceptual > 0) or \
        ("3d" in tasks and job.losses.render_lpips > 0)
    # Loading the frozen networks draws from the RNG (transformers initialises before it loads), so it happens
    # before the RNG is seeded or restored: a resumed run then draws exactly what the uninterrupted one drew.
    frozen = Frozen(job.losses, device, need_perceptual=perceptual, need_text=semantic)
    torch.manual_seed(job.seed + rank)  # then each rank its own noise (KL samples, rendered views)
    optimizer = torch.optim.AdamW(parameter_groups(raw_model, stage), lr=stage.lr, betas=(0.9, 0.95))
    ema = EMA(raw_model, stage.ema_decay) if stage.ema_decay else None
    state = load_latest_checkpoint(job.storage, job.output, model, optimizer, ema.weights if ema else None)
    state = state or {"step": 0, "positions": {}}
    if state["step"] > 0 and rank == 0:
        runtime.progress(stage.name, state["step"], stage.steps,
                         note=f"resuming at step {state['step']} from its last checkpoint")
    positions: dict[str, int] = dict(state["positions"])
    streams = task_streams(tasks, job.shards, job.storage, job.seed, rank, world_size, positions)
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
        terms: dict[str, float] = {}
        for index, name in enumerate(stage.tasks):
            waited = time.perf_counter()
            batch, positions[name] = next(streams[name])
            window["data_wait"] += time.perf_counter() - waited
            batch = batch.to(device)
            last = index == len(stage.tasks) - 1
            # Gradients of all but the last micro-batch stay local: one all-reduce per optimizer step.
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:
                    total, task_terms = tasks[name].losses_of(model, raw_model, batch, frozen)
                (total / len(stage.tasks)).backward()
            terms |= {f"{name}/{k}": float(v.detach()) for k, v in task_terms.items()}
            window["tokens"] += batch.tokens if hasattr(batch, "tokens") else batch.patches.shape[0]
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
            metrics = {f"train/{k}": v for k, v in terms.items()}
            metrics |= {"train/loss": sum(terms[f"{n}/total"] for n in dict.fromkeys(stage.tasks)),
                        "train/lr": rate, "train/grad_norm": float(grad_norm),
                        "train/steps_per_second": window["steps"] / max(seconds, 1e-9),
                        "train/tokens_per_second": window["tokens"] * world_size / max(seconds, 1e-9),
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
            # Every rank gathers (FSDP shards are collected collectively); rank 0 writes.
            save_checkpoint(job.storage, job.output, model, optimizer,
                            {"step": step, "positions": positions, "stage": stage.name},
                            ema.full() if ema else None, write=rank == 0)
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


def distribute(model: torch.nn.Module, runtime: WorkerRuntime, stage: TrainStageSection) -> torch.nn.Module:
    """DDP through Ray Train's prepare_model; FSDP2 (`fully_shard`, per transformer block, then the whole model),
    which also runs on CPU with gloo, so that the sharded path is tested where there is no GPU."""
    if runtime.world_size == 1:
        return runtime.prepare_model(model)
    if stage.strategy == "ddp":
        # Tasks use different heads (pixels, Gaussians, pooling): DDP must expect unused parameters.
        return runtime.prepare_model(model, parallel_strategy="ddp",
                                     parallel_strategy_kwargs={"find_unused_parameters": True})
    from torch.distributed.fsdp import fully_shard

    model.to(runtime.device)
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        for block in getattr(stack, "layers", []):
            fully_shard(block)
    fully_shard(model)
    return model


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

