"""One training stage: a thin loop run by every Ray Train worker, and the launcher that starts it.

The loop reads like pseudocode: batch, forward, losses, backward, step, log, maybe checkpoint. It
resumes from the newest committed checkpoint in its own output (exact: model, optimizer, RNG and data
position), or starts from the previous stage's final model.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from atoken.pipeline.config import ModelSection, TrainStageSection
from atoken.pipeline.storage import Storage
from atoken.pipeline.tracking import Tracker
from atoken.train.checkpoint import load_latest_checkpoint, load_model_weights, save_checkpoint, save_model
from atoken.train.data import ShardInfo, ShardStream
from atoken.train.losses import packed_reconstruction_losses, reconstruction_losses, weighted_total
from atoken.train.model import build_model


@dataclass
class StageJob:
    """Everything a worker needs, picklable; no credentials (workers read the standard AWS_* chain)."""
    stage: TrainStageSection
    model: ModelSection
    shards: list[ShardInfo]
    output: str
    init_weights: str | None  # the previous stage's model.safetensors
    storage: Storage
    tracker: Tracker | None  # None: no MLflow (benchmarks)
    run_id: str
    seed: int


def learning_rate(step: int, stage: TrainStageSection) -> float:
    """Linear warm-up, then cosine to 10% of the peak (the paper's 3e-4 → 3e-5 shape)."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class WorkerRuntime:
    """What the loop needs from whoever runs it: Ray Train on a cluster, or a plain process."""
    rank: int
    world_size: int
    device: torch.device
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module]
    report: Callable[[dict[str, float]], None]


def ray_train_runtime() -> WorkerRuntime:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return WorkerRuntime(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                         ray.train.torch.prepare_model, ray.train.report)


def single_process_runtime(device: str = "cpu") -> WorkerRuntime:
    """One process, no Ray: what the GPU benchmark runs (the lent GPU has no Ray installed)."""
    target = torch.device(device)
    return WorkerRuntime(0, 1, target, lambda model: model.to(target), lambda metrics: None)


def train_worker(job: StageJob, runtime: WorkerRuntime | None = None) -> dict[str, float]:
    """Train one stage to `job.stage.steps`; returns the last logged metrics."""
    runtime = runtime or ray_train_runtime()
    rank, world_size, device = runtime.rank, runtime.world_size, runtime.device
    torch.manual_seed(job.seed + rank)
    model = build_model(job.model)
    if job.init_weights:
        load_model_weights(job.storage, job.init_weights, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.stage.lr, betas=(0.9, 0.95),
                                  weight_decay=job.stage.weight_decay)
    state = load_latest_checkpoint(job.storage, job.output, model, optimizer) or {"step": 0, "position": 0}
    if state["step"] > 0 and rank == 0:
        print(f"[{job.stage.name}] resuming at step {state['step']} from its last checkpoint", flush=True)
    model = runtime.prepare_model(model)
    stream = ShardStream(job.shards, job.storage, job.seed, rank, world_size)
    if job.stage.max_tokens:
        batches = stream.packed_batches(job.stage.max_tokens, position=state["position"])
    else:
        batches = ((pixels, None) for pixels in stream.batches(job.stage.batch_size, position=state["position"]))

    step, position = state["step"], state["position"]
    window_start, window_steps = time.perf_counter(), 0
    metrics: dict[str, float] = {}
    while step < job.stage.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, job.stage)
        batch, next_position = next(batches)
        batch = batch.to(device)  # (B, 3, H, W) images, or a PackedBatch of images and clips
        out = model(batch)
        if job.stage.max_tokens:
            terms = packed_reconstruction_losses(batch, out["patches"], out["mean"], out["logvar"])
        else:
            terms = reconstruction_losses(batch, out["reconstruction"], out["mean"], out["logvar"])
        loss = weighted_total(terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        position = next_position if next_position is not None else position + job.stage.batch_size
        step, window_steps = step + 1, window_steps + 1

        if step % job.stage.log_every == 0 or step == job.stage.steps:
            seconds = time.perf_counter() - window_start
            metrics = {f"train/{k}": float(v) for k, v in terms.items()}
            metrics |= {"train/loss": float(loss), "train/lr": learning_rate(step - 1, job.stage),
                        "train/steps_per_second": window_steps / max(seconds, 1e-9)}
            if rank == 0 and job.tracker is not None:
                job.tracker.log_metrics(job.run_id, metrics, step=step)
                print(f"[{job.stage.name}] step {step}/{job.stage.steps} loss {float(loss):.4f} "
                      f"{metrics['train/steps_per_second']:.1f} steps/s", flush=True)
            runtime.report(metrics)
            window_start, window_steps = time.perf_counter(), 0
        if rank == 0 and (step % job.stage.checkpoint_every == 0 or step == job.stage.steps):
            save_checkpoint(job.storage, job.output, _unwrap(model), optimizer,
                            {"step": step, "position": position, "stage": job.stage.name})
    if rank == 0:
        save_model(job.storage, job.output, _unwrap(model), {"model": asdict(job.model), "steps": step})
    return metrics


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def run_train_stage(job: StageJob, local_dir: str, resources: dict[str, float] | None = None) -> None:
    """Run `train_worker` on Ray Train workers and wait; raises if any worker fails.

    `resources`: Ray custom resources each worker also asks for (config `ray.train_resources`), which keeps
    training on a cluster's GPU workers.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
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
        run_config=RunConfig(name=f"{job.stage.name}-{job.run_id[:8]}",
                             storage_path=str(Path(local_dir).resolve() / "ray_train")),
    )
    trainer.fit()


def _threads_then_train(job: StageJob, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    train_worker(job)

