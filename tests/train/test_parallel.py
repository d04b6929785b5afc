"""train/parallel.py: bf16 FSDP2 on 2 CPU processes (gloo), as a GPU run computes. The sigmoid loss's temperature
and bias keep float32 while the transformer computes in bf16; the control shards the model as before, without
their own group, and sees them rounded."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORLD = 2


def rank_main(rank: int, folder: str, grouped: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from atoken.train.model import Tokenizer
    from atoken.train.model.tokens import pack_images
    from atoken.train.parallel import bf16_policy, shard_with_policy

    root = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{root / f'store-{grouped}'}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = Tokenizer.from_preset("tiny")
    blocks = [*model.encoder.layers, *model.decoder.layers]
    policy = bf16_policy()  # distribute()'s on a GPU
    if grouped == "yes":
        shard_with_policy(model, blocks, policy)
    else:  # the control: blocks and the whole model only
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    seen = {}  # the dtype a block's weight has while it runs: FSDP2's unsharded parameter, cast by the policy
    model.encoder.layers[0].register_forward_pre_hook(  # a hook that returns None keeps the inputs
        lambda module, _: seen.setdefault("block_weight", str(next(module.parameters()).dtype)) and None)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the loop runs the forward on a GPU
        out = model(pack_images(pixels, 16, model.config.temporal_patch), embed=True)  # through FSDP2's hooks
    (out["logit_scale"].float().sum() + out["logit_bias"].float().sum() + out["mean"].float().pow(2).mean()).backward()
    gradient = model.logits.scale.grad
    if rank == 0:
        (root / f"result-{grouped}.json").write_text(json.dumps({
            "scale_dtype": str(out["logit_scale"].dtype), "scale": out["logit_scale"].item(),
            "bias": out["logit_bias"].item(), "block_weight_dtype": seen["block_weight"],
            "scale_gradient_dtype": str(gradient.dtype) if gradient is not None else None}))
    dist.barrier()  # neither rank leaves the group while the other's backward may still reduce
    dist.destroy_process_group()


def run_ranks(folder: Path, grouped: str, timeout: float = 120) -> None:
    from helpers import run_script_ranks  # here: the ranks run this file as a script, without tests/ on the path

    run_script_ranks(__file__, WORLD, ["{rank}", str(folder), grouped], timeout)


def test_bf16_fsdp2_keeps_the_sigmoid_temperature_and_bias_in_float32(tmp_path):
    run_ranks(tmp_path, "yes")
    run_ranks(tmp_path, "no")
    grouped, control = (json.loads((tmp_path / f"result-{name}.json").read_text()) for name in ("yes", "no"))
    assert grouped["block_weight_dtype"] == control["block_weight_dtype"] == "torch.bfloat16", "blocks run in bf16"
    assert grouped["scale_dtype"] == "torch.float32" and grouped["scale"] == pytest.approx(math.log(10.0), abs=1e-7)
    assert grouped["bias"] == -10.0 and grouped["scale_gradient_dtype"] == "torch.float32"
    # The control: in the model's bf16 group, log(10) = 2.3026 rounds to 2.2969.
    assert control["scale_dtype"] == "torch.bfloat16" and control["scale"] == 2.296875


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
