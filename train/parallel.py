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
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model.to(runtime.device)
    bf16 = runtime.device.type == "cuda" and stage.bf16
    policy = bf16_policy() if bf16 else MixedPrecisionPolicy()
    shard_with_policy(model, blocks, policy)
    return model


def bf16_policy():
    """bf16 compute, float32 gradient reduction. Inputs are not cast by FSDP2: the loop runs the forward under bf16
    autocast already, and FSDP2's input cast rebuilds dataclass inputs with `dataclasses.replace`, which a
    PackedBatch (its cached block mask is not an init field) refuses on the first step
    (tests/train/test_parallel.py)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_with_policy(model: torch.nn.Module, blocks: list[torch.nn.Module], policy) -> None:
    """FSDP2 per block, then the whole model, computing under `policy`; the sigmoid loss's temperature and bias
    (`SigmoidLogits`) compute in float32 whatever the policy (their own FSDP2 group: two scalars)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for block in blocks:
        fully_shard(block, mp_policy=policy)
    if getattr(model, "logits", None) is not None:
        fully_shard(model.logits, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                 reduce_dtype=torch.float32))
    fully_shard(model, mp_policy=policy)
