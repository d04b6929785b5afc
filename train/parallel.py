"""How a stage's model is spread over workers: DDP or FSDP2, gradient sync per micro-batch, compile, recompute."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch.distributed.fsdp import FSDPModule

from atoken.pipeline.config import TrainStageSection

if TYPE_CHECKING:
    from atoken.train.loop import WorkerRuntime


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, last: bool):
    """Gradient reduction on the step's last micro-batch only: DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync` (no reduce-scatter per micro-batch)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        yield
    elif not last and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def distribute(model: torch.nn.Module, runtime: WorkerRuntime, stage: TrainStageSection) -> torch.nn.Module:
    """DDP through Ray Train's prepare_model; FSDP2 (`fully_shard`, per transformer block, then the whole model),
    which also runs on CPU with gloo, so that the sharded path is tested where there is no GPU. On GPU, FSDP2
    computes in bf16 and reduces gradients in float32 (`MixedPrecisionPolicy`). `compile` compiles each block
    in place (`Module.compile`: parameter names, and so checkpoints, unchanged)."""
    blocks = [block for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None))
              for block in getattr(stack, "layers", [])]
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        if stack is not None and hasattr(stack, "checkpointing"):
            stack.checkpointing = stage.activation_checkpointing
    if stage.compile and runtime.device.type == "cuda":  # Inductor on CPU compiles for minutes, gains nothing here
        for block in blocks:
            block.compile()
    if runtime.world_size == 1:
        return runtime.prepare_model(model)
    if stage.strategy == "ddp":
        # Tasks use different heads (pixels, Gaussians, pooling): DDP must expect unused parameters.
        return runtime.prepare_model(model, parallel_strategy="ddp",
                                     parallel_strategy_kwargs={"find_unused_parameters": True})
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(runtime.device)
    bf16 = runtime.device.type == "cuda" and stage.bf16
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
