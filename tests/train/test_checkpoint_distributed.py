"""train/checkpoint.py on two processes (gloo on loopback, FSDP2): each rank writes and reads its own shards,
only rank 0 reads the shard headers, a checkpoint loads on another world size (DCP reshards 1 -> 2 and 2 -> 1),
and one rank's failed upload stops both ranks at once, committing nothing."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import boto3
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from atoken.pipeline.storage import Storage, StorageError
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


class CountingStorage(Storage):
    """Counts this rank's requests to storage, as GETs and LISTs on S3: reads of a shard file's header (the
    8-byte length at 0 and the JSON at 8; no tensor's data starts before byte 9), other ranged reads (tensor
    data), whole-object reads (JSON, rank files) and listings."""

    def __init__(self):
        super().__init__()
        self.requests: Counter[str] = Counter()

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        self.requests["header" if start <= 8 else "data"] += 1
        return super().read_range(uri, start, length)

    def read_bytes(self, uri: str) -> bytes:
        self.requests["whole"] += 1
        return super().read_bytes(uri)

    def list(self, prefix: str) -> list[str]:
        self.requests["list"] += 1
        return super().list(prefix)


def rank_main(rank: int, folder: str) -> None:
    root = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=WORLD)
    storage = CountingStorage()

    # 1 -> 2: a single process's checkpoint, resharded onto FSDP; its rank state belongs to another world size.
    model, optimizer, ema = fresh(shard=True)
    restored = Checkpointer(storage, str(root / "single"), rank, WORLD).load_latest(model, optimizer, ema)
    requests = {"single": dict(storage.requests)}
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
    storage.requests.clear()
    restored = Checkpointer(storage, str(root / "sharded"), rank, WORLD).load_latest(model, optimizer, ema)
    requests["sharded"] = dict(storage.requests)
    assert_same(whole(model, optimizer, ema), expected)
    assert restored.shared_state == {"step": 2, "stage": "s"} and restored.saved_world_size == WORLD
    assert restored.rank_state == {"positions": {"image": 20 + rank}}
    assert not optimizer.state[model.head.weight], "the untrained head has no AdamW state, as when saved"
    (root / f"read-{rank}.json").write_text(json.dumps({"bytes_read": restored.bytes_read,
                                                               "requests": requests}))
    dist.destroy_process_group()


def failed_upload_main(rank: int, folder: str, output: str) -> None:
    """Async saves to S3 (`output`); rank 1's upload of step 2 fails. Both ranks record what `wait()` raised and
    how long it took, then meet in a barrier: a rank that raised stays in the group, as in training, so a rank
    left waiting for it would wait (the gloo timeout, 30 min) rather than see it exit."""
    root = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=WORLD)
    storage = Storage()  # the moto endpoint: AWS_ENDPOINT_URL
    model, optimizer, ema = trained(seed=0, shard=True)
    checkpointer = Checkpointer(storage, output, rank, WORLD, async_save=True,
                                staging_dir=str(root / f"staging-{rank}"))
    for step in (1, 2):
        if step == 2 and rank == 1:
            def failing_upload(source, uri):
                raise StorageError(f"injected: cannot upload {uri}")

            storage.upload = failing_upload
        checkpointer.save(step, model, optimizer, ema, {"step": step}, {"positions": {}},
                          {"rng.torch": torch.get_rng_state()})
        start, raised = time.monotonic(), None
        try:
            checkpointer.wait()
        except RuntimeError as exc:
            raised = str(exc)
        (root / f"outcome-{rank}-{step}.json").write_text(json.dumps({"raised": raised,
                                                                     "seconds": time.monotonic() - start}))
    dist.barrier()
    dist.destroy_process_group()


SCENARIOS = {"round_trip": rank_main, "failed_upload": failed_upload_main}


def run_ranks(folder: Path, scenario: str = "round_trip", *args: str, timeout: float = 120) -> None:
    """A scenario's main on WORLD processes: this file run as a script, once per rank."""
    from helpers import run_script_ranks  # here: the ranks run this file as a script, without tests/ on the path

    run_script_ranks(__file__, WORLD, [scenario, "{rank}", str(folder), *args], timeout)


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
    reads = [json.loads((tmp_path / f"read-{rank}.json").read_text()) for rank in range(WORLD)]
    for rank, read in enumerate(reads):
        assert read["bytes_read"] < 0.7 * sizes, f"rank {rank} read {read['bytes_read']} of {sizes} shard bytes"
    # The headers (2 reads a file: its length, then its JSON) and the listing of the files: on rank 0 only, which
    # broadcasts the metadata. Before, every rank read every file's header: W x W x 2 GETs in all.
    for checkpoint, files in (("single", 1), ("sharded", len(shards))):
        assert reads[0]["requests"][checkpoint]["header"] == 2 * files and reads[0]["requests"][checkpoint]["list"] == 1
        assert reads[1]["requests"][checkpoint].get("header", 0) == 0, reads[1]["requests"]
        assert reads[1]["requests"][checkpoint].get("list", 0) == 0, reads[1]["requests"]
    # 2 -> 1: one plain process (no process group) gets the whole tensors back.
    model, optimizer, ema = fresh(shard=False)
    restored = Checkpointer(Storage(), str(tmp_path / "sharded"), 0, 1).load_latest(model, optimizer, ema)
    assert restored.saved_world_size == WORLD and restored.rank_state is None and restored.rank_tensors is None
    assert_same(whole(model, optimizer, ema), load_file(tmp_path / "sharded.safetensors"))


def test_a_failed_upload_on_one_rank_raises_on_every_rank_at_once_and_commits_nothing(
        s3_endpoint, s3_credentials, tmp_path, monkeypatch):
    bucket = f"atoken-ckpt-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    output = f"s3://{bucket}/run/train_stage1/abc"

    run_ranks(tmp_path, "failed_upload", output, timeout=150)  # without the agreement: 30 min in a barrier

    outcomes = [[json.loads((tmp_path / f"outcome-{rank}-{step}.json").read_text()) for step in (1, 2)]
                for rank in range(WORLD)]
    assert all(first["raised"] is None for first, _ in outcomes), "step 1 saves on both"
    assert "injected: cannot upload" in outcomes[1][1]["raised"]
    assert "step 2 is not committed: another rank failed" in outcomes[0][1]["raised"]
    assert all(second["seconds"] < 20 for _, second in outcomes), outcomes
    latest = Storage().read_json(f"{output}/checkpoints/latest.json")
    assert (latest["step"], latest["kept"]) == (1, [1]), "step 1 is still what loads"
    assert not list((tmp_path / "staging-1").iterdir()), "the staged shard is removed after the failure too"


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](int(sys.argv[2]), *sys.argv[3:])
