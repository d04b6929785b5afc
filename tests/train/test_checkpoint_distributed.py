"""train/checkpoint.py on two processes (gloo on loopback, FSDP2): each rank writes and reads its own shards,
and a checkpoint loads on another world size (DCP reshards 1 -> 2 and 2 -> 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from atoken.pipeline.storage import Storage
from atoken.train.checkpoint import Checkpointer

pytestmark = pytest.mark.slow

WORLD = 2


class Tiny(torch.nn.Module):
    """Uneven shards (5 rows over 2 ranks; a 1-element gain leaves rank 1 an empty shard) and a head nothing
    trains (no AdamW state), as the Gaussian head before stage 3."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 256), torch.nn.Linear(256, 5)])
        self.gain = torch.nn.Parameter(torch.ones(1))
        self.head = torch.nn.Linear(256, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.relu(self.layers[0](x))) * self.gain


def trained(seed: int, shard: bool) -> tuple[Tiny, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """A model two AdamW steps in, with an EMA of its weights (sharded like them under FSDP)."""
    torch.manual_seed(seed)
    model = Tiny()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    for step in range(2):
        model(torch.randn(4, 64, generator=torch.Generator().manual_seed(100 * step + rank))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, tensor in model.state_dict().items():
            ema[name].lerp_(tensor.detach(), 0.5)
    return model, optimizer, ema


def fresh(shard: bool) -> tuple[Tiny, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    model, optimizer, ema = trained(seed=999, shard=shard)  # other weights and state: all must be overwritten
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), {k: torch.zeros_like(v) for k, v in ema.items()}


def whole(model, optimizer, ema) -> dict[str, torch.Tensor]:
    """Every tensor of the three, whole (gathered under FSDP: a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.tensor import DTensor

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors |= {f"optimizer.{fqn}.{slot}": value for fqn, slots in optimizer_state["state"].items()
                for slot, value in slots.items()}
    tensors |= {f"ema.{k}": v.full_tensor() if isinstance(v, DTensor) else v for k, v in ema.items()}
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different}"


def rank_main(rank: int, folder: str) -> None:
    root = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=WORLD)
    storage = Storage()

    # 1 -> 2: a single process's checkpoint, resharded onto FSDP; its rank state belongs to another world size.
    model, optimizer, ema = fresh(shard=True)
    restored = Checkpointer(storage, str(root / "single"), rank, WORLD).load_latest(model, optimizer, ema)
    assert restored.saved_world_size == 1 and restored.rank_state is None and restored.rank_tensors is None
    assert_same(whole(model, optimizer, ema), load_file(root / "single.safetensors"))

    # 2 ranks write their own shards, in step (step 1) and asynchronously (step 2: the write, upload and commit
    # on a gloo group of their own) ...
    model, optimizer, ema = trained(seed=0, shard=True)
    expected = whole(model, optimizer, ema)
    if rank == 0:
        save_file(expected, root / "sharded.safetensors")
    for step, async_save in ((1, False), (2, True)):
        checkpointer = Checkpointer(storage, str(root / "sharded"), rank, WORLD, async_save=async_save)
        checkpointer.save(step, model, optimizer, ema, {"step": step, "stage": "s"},
                          {"positions": {"image": 10 * step + rank}}, {"rng.torch": torch.get_rng_state()})
        checkpointer.wait()

    # ... and read back only theirs, exactly, rank state included.
    model, optimizer, ema = fresh(shard=True)
    restored = Checkpointer(storage, str(root / "sharded"), rank, WORLD).load_latest(model, optimizer, ema)
    assert_same(whole(model, optimizer, ema), expected)
    assert restored.shared_state == {"step": 2, "stage": "s"} and restored.saved_world_size == WORLD
    assert restored.rank_state == {"positions": {"image": 20 + rank}}
    assert not optimizer.state[model.head.weight], "the untrained head has no AdamW state, as when saved"
    (root / f"read-{rank}.json").write_text(json.dumps({"bytes_read": restored.bytes_read}))
    dist.destroy_process_group()


def run_ranks(folder: Path) -> None:
    """`rank_main` on WORLD processes, torchrun-style: this file run as a script, once per rank."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(rank), str(folder)], env=env, stderr=subprocess.PIPE,
                              text=True) for rank in range(WORLD)]
    errors = [process.communicate(timeout=120)[1] for process in ranks]
    failed = [(rank, error) for rank, (process, error) in enumerate(zip(ranks, errors, strict=True))
              if process.returncode != 0]
    assert not failed, "\n".join(f"rank {rank} failed:\n{error[-3000:]}" for rank, error in failed)


def test_fsdp_shards_round_trip_and_reshard_to_other_world_sizes(tmp_path):
    model, optimizer, ema = trained(seed=1, shard=False)
    save_file(whole(model, optimizer, ema), tmp_path / "single.safetensors")
    Checkpointer(Storage(), str(tmp_path / "single"), 0, 1).save(
        2, model, optimizer, ema, {"step": 2}, {"positions": {}}, {"rng.torch": torch.get_rng_state()})

    run_ranks(tmp_path)

    checkpoints = tmp_path / "sharded" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step-00000001", "step-00000002"]
    shards = sorted((checkpoints / "step-00000002" / "shards").iterdir())
    assert [p.name for p in shards] == ["shard-00001-model-00001-of-00001.safetensors",
                                        "shard-00002-model-00001-of-00001.safetensors"]
    sizes = sum(p.stat().st_size for p in shards)
    for rank in range(WORLD):
        read = json.loads((tmp_path / f"read-{rank}.json").read_text())["bytes_read"]
        assert read < 0.7 * sizes, f"rank {rank} read {read} of {sizes} shard bytes: not only its own"
    # 2 -> 1: one plain process (no process group) gets the whole tensors back.
    model, optimizer, ema = fresh(shard=False)
    restored = Checkpointer(Storage(), str(tmp_path / "sharded"), 0, 1).load_latest(model, optimizer, ema)
    assert restored.saved_world_size == WORLD and restored.rank_state is None and restored.rank_tensors is None
    assert_same(whole(model, optimizer, ema), load_file(tmp_path / "sharded.safetensors"))


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), sys.argv[2])
