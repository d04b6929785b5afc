"""train/checkpoint.py: safetensors + JSON checkpoints whose restore continues training bit for bit."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load

from atoken.pipeline.config import ModelSection, StorageSection, TrainStageSection
from atoken.pipeline.storage import Storage, join
from atoken.train.checkpoint import load_latest_checkpoint, load_model_weights, save_checkpoint, save_model
from atoken.train.loop import learning_rate
from atoken.train.losses import reconstruction_losses, weighted_total
from atoken.train.model import build_model

SCHEDULE = TrainStageSection(steps=8, lr=2e-3, warmup_steps=2, weight_decay=0.01)


def batch(step: int) -> torch.Tensor:
    """The data of a step, independent of the global RNG (the data stream has its own resume position)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1  # (B, 3, H, W)


def new_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = build_model(ModelSection())
    optimizer = torch.optim.AdamW(model.parameters(), lr=SCHEDULE.lr, betas=(0.9, 0.95),
                                  weight_decay=SCHEDULE.weight_decay)
    return model, optimizer


def train(model, optimizer, steps: range) -> None:
    """The loop's step: schedule, forward (which samples the latent from the global RNG), losses, update."""
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, SCHEDULE)
        out = model(batch(step))
        loss = weighted_total(reconstruction_losses(batch(step), out["reconstruction"], out["mean"], out["logvar"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"parameters differ: {different}"


def continue_from_checkpoint(storage: Storage, output: str):
    model, optimizer = new_model_and_optimizer(seed=12345)  # other weights, other RNG: all must be restored
    state = load_latest_checkpoint(storage, output, model, optimizer)
    return model, optimizer, state


def test_restored_training_is_bitwise_identical_to_uninterrupted(tmp_path):
    storage, output = Storage(), str(tmp_path / "stage")
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(0, 3))
    save_checkpoint(storage, output, model, optimizer, {"step": 3, "position": 12, "stage": "stage1"})
    train(model, optimizer, range(3, 7))
    uninterrupted, uninterrupted_rng = parameters(model), torch.get_rng_state()

    restored, restored_optimizer, state = continue_from_checkpoint(storage, output)
    assert state == {"step": 3, "position": 12, "stage": "stage1"}
    train(restored, restored_optimizer, range(state["step"], 7))

    assert_bitwise_equal(parameters(restored), uninterrupted)
    for group, restored_group in zip(optimizer.param_groups, restored_optimizer.param_groups, strict=True):
        assert restored_group["betas"][0] == 0.9 and restored_group["weight_decay"] == group["weight_decay"]
    assert torch.equal(torch.get_rng_state(), uninterrupted_rng)
    assert torch.equal(restored_optimizer.state_dict()["state"][0]["exp_avg_sq"],
                       optimizer.state_dict()["state"][0]["exp_avg_sq"])


def test_without_restoring_the_rng_training_diverges(tmp_path):
    """The check above can fail: the latent is sampled from the global RNG, so a wrong RNG changes weights."""
    storage, output = Storage(), str(tmp_path / "stage")
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(0, 3))
    save_checkpoint(storage, output, model, optimizer, {"step": 3, "position": 12})
    train(model, optimizer, range(3, 5))

    restored, restored_optimizer, _ = continue_from_checkpoint(storage, output)
    torch.manual_seed(777)
    train(restored, restored_optimizer, range(3, 5))

    assert any(not torch.equal(a, b) for a, b in zip(parameters(model).values(), parameters(restored).values(),
                                                     strict=True))


def test_files_are_safetensors_and_json_only(tmp_path):
    storage, output = Storage(), str(tmp_path / "stage")
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(2))
    folder = save_checkpoint(storage, output, model, optimizer, {"step": 2, "position": 8})
    save_model(storage, output, model, {"model": {"kind": "patch_autoencoder"}, "steps": 2})

    files = sorted(Path(output).rglob("*"))
    files = [p for p in files if p.is_file()]
    assert sorted(p.relative_to(output).as_posix() for p in files) == [
        "checkpoints/latest.json", "checkpoints/step-00000002/model.safetensors",
        "checkpoints/step-00000002/optimizer.safetensors", "checkpoints/step-00000002/state.json",
        "model.json", "model.safetensors",
    ]
    for path in files:
        data = path.read_bytes()
        assert not data.startswith((b"\x80", b"PK")), f"{path} looks like a pickle or a torch.save zip"
        if path.suffix == ".json":
            json.loads(data)
        else:
            (header_length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + header_length])
            assert all(entry["dtype"] in ("F32", "U8", "I64") for k, entry in header.items() if k != "__metadata__")
    assert storage.read_json(join(output, "checkpoints", "latest.json")) == {"step": 2, "folder": folder}
    optimizer_tensors = load(storage.read_bytes(join(folder, "optimizer.safetensors")))
    assert "rng.torch" in optimizer_tensors
    assert any(name.endswith(".exp_avg") for name in optimizer_tensors)
    state = storage.read_json(join(folder, "state.json"))
    assert state["step"] == 2 and state["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]


def test_latest_points_at_the_newest_checkpoint(tmp_path):
    storage, output = Storage(), str(tmp_path / "stage")
    model, optimizer = new_model_and_optimizer(seed=0)
    assert load_latest_checkpoint(storage, output, model, optimizer) is None

    train(model, optimizer, range(2))
    save_checkpoint(storage, output, model, optimizer, {"step": 2, "position": 8})
    train(model, optimizer, range(2, 4))
    save_checkpoint(storage, output, model, optimizer, {"step": 4, "position": 16})
    at_step_4 = parameters(model)

    restored, _, state = continue_from_checkpoint(storage, output)
    assert state == {"step": 4, "position": 16}
    assert_bitwise_equal(parameters(restored), at_step_4)


def test_final_model_round_trip(tmp_path):
    storage, output = Storage(), str(tmp_path / "stage")
    model, _ = new_model_and_optimizer(seed=5)
    uri = save_model(storage, output, model, {"steps": 10})
    other, _ = new_model_and_optimizer(seed=6)

    load_model_weights(storage, uri, other)

    assert_bitwise_equal(parameters(other), parameters(model))
    assert storage.read_json(join(output, "model.json")) == {"steps": 10}


def test_checkpoint_round_trip_through_s3(s3_endpoint, s3_credentials, tmp_path):
    bucket = f"atoken-ckpt-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    storage, output = Storage(StorageSection(endpoint_url=s3_endpoint)), f"s3://{bucket}/run/train_stage1/abc"
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(2))
    save_checkpoint(storage, output, model, optimizer, {"step": 2, "position": 8})
    train(model, optimizer, range(2, 4))

    restored, restored_optimizer, state = continue_from_checkpoint(storage, output)
    train(restored, restored_optimizer, range(state["step"], 4))

    assert_bitwise_equal(parameters(restored), parameters(model))


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests reseed torch's global RNG; give the next test the state it would have had."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)
