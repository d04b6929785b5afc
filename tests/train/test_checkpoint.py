"""train/checkpoint.py: safetensors + JSON checkpoints (the Checkpointer: DCP shards, per-rank state, commit,
keep_last, async, S3 multipart) whose restore continues training bit for bit, and the stage's final model; in one
process here, two processes under FSDP in test_checkpoint_distributed.py."""

from __future__ import annotations

import json
import struct
import threading
import uuid

import boto3
import pytest
import torch
from safetensors.torch import load
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

import atoken.train.checkpoint as checkpoint_module
from atoken.pipeline.config import ModelSection, StorageSection, TrainStageSection
from atoken.pipeline.storage import Storage, join
from atoken.train.checkpoint import (
    Checkpointer,
    load_model_weights,
    restore_rng,
    rng_tensors,
    save_model,
)
from atoken.train.losses import reconstruction_losses, weighted_total
from atoken.train.model import build_model
from atoken.train.optim import learning_rate

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


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests reseed torch's global RNG; give the next test the state it would have had."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def save_at(checkpointer: Checkpointer, step: int, model, optimizer, ema=None, position: int = 0) -> None:
    checkpointer.save(step, model, optimizer, ema, {"step": step, "stage": "stage1"},
                      {"positions": {"image": position}}, rng_tensors())


def restore(checkpointer: Checkpointer, ema_like=None):
    model, optimizer = new_model_and_optimizer(seed=12345)  # other weights, other RNG: all must be restored
    ema = None if ema_like is None else {name: torch.zeros_like(t) for name, t in ema_like.items()}
    restored = checkpointer.load_latest(model, optimizer, ema)
    if restored is not None:
        restore_rng(restored.rank_tensors)
    return model, optimizer, ema, restored


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    return {f"{index}.{slot}": value for index, slots in optimizer.state_dict()["state"].items()
            for slot, value in slots.items()}


def test_checkpointer_resume_is_bitwise_identical_to_uninterrupted(tmp_path):
    checkpointer = Checkpointer(Storage(), str(tmp_path / "stage"), rank=0, world_size=1)
    assert checkpointer.load_latest(*new_model_and_optimizer(seed=1), None) is None
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(0, 3))
    ema = {name: tensor.detach().clone() * 0.5 for name, tensor in model.state_dict().items()}
    save_at(checkpointer, 3, model, optimizer, ema, position=12)
    train(model, optimizer, range(3, 7))
    uninterrupted, uninterrupted_rng = parameters(model), torch.get_rng_state()

    restored_model, restored_optimizer, restored_ema, restored = restore(checkpointer, ema_like=ema)
    assert (restored.step, restored.shared_state) == (3, {"step": 3, "stage": "stage1"})
    assert restored.rank_state == {"positions": {"image": 12}} and restored.saved_world_size == 1
    assert_bitwise_equal(restored_ema, ema)
    train(restored_model, restored_optimizer, range(3, 7))

    assert_bitwise_equal(parameters(restored_model), uninterrupted)
    assert_bitwise_equal(optimizer_tensors(restored_optimizer), optimizer_tensors(optimizer))
    assert restored_optimizer.param_groups[0]["weight_decay"] == SCHEDULE.weight_decay
    assert restored_optimizer.param_groups[0]["betas"][0] == 0.9
    assert torch.equal(torch.get_rng_state(), uninterrupted_rng)


def test_without_restoring_the_rng_training_diverges(tmp_path):
    """The check above can fail: the latent is sampled from the global RNG, so a wrong RNG changes weights."""
    checkpointer = Checkpointer(Storage(), str(tmp_path / "stage"), rank=0, world_size=1)
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(0, 3))
    save_at(checkpointer, 3, model, optimizer)
    at_step_3 = parameters(model)
    train(model, optimizer, range(3, 5))

    restored_model, restored_optimizer = new_model_and_optimizer(seed=12345)
    checkpointer.load_latest(restored_model, restored_optimizer, None)  # rank_tensors' RNG left unrestored
    assert_bitwise_equal(parameters(restored_model), at_step_3)  # so only the RNG differs from here on
    torch.manual_seed(777)
    train(restored_model, restored_optimizer, range(3, 5))

    assert any(not torch.equal(a, b) for a, b in zip(parameters(model).values(),
                                                     parameters(restored_model).values(), strict=True))


def test_checkpointer_files_are_safetensors_and_json_only(tmp_path):
    output = tmp_path / "stage"
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(2))
    save_at(Checkpointer(Storage(), str(output), 0, 1), 2, model, optimizer)
    save_model(Storage(), str(output), model, {"model": {"kind": "patch_autoencoder"}, "steps": 2})

    files = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    shard_file = "checkpoints/step-00000002/shards/shard-00001-model-00001-of-00001.safetensors"
    assert files == ["checkpoints/latest.json", "checkpoints/step-00000002/checkpoint.json",
                     "checkpoints/step-00000002/rank-00000.json", "checkpoints/step-00000002/rank-00000.safetensors",
                     shard_file, "model.json", "model.safetensors"]
    for path in output.rglob("*.*"):
        data = path.read_bytes()
        assert not data.startswith((b"\x80", b"PK")), f"{path} looks like a pickle or a torch.save zip"
        if path.suffix == ".json":
            json.loads(data)
        else:
            (header_length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + header_length])
            assert all(entry["dtype"] in ("F32", "U8", "I64") for k, entry in header.items() if k != "__metadata__")
    shard = load((output / shard_file).read_bytes())
    assert any(name.startswith("optimizer.") and name.endswith(".exp_avg") for name in shard)
    assert "rng.torch" in load((output / "checkpoints/step-00000002/rank-00000.safetensors").read_bytes())
    saved = json.loads((output / "checkpoints/step-00000002/checkpoint.json").read_text())
    assert saved["step"] == 2 and saved["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]
    assert {"step": 2, "folder": "step-00000002", "kept": [2]} == json.loads(
        (output / "checkpoints" / "latest.json").read_text())


def test_checkpointer_keeps_the_last_committed_and_never_loads_an_uncommitted_folder(tmp_path, monkeypatch):
    root = tmp_path / "stage" / "checkpoints"
    checkpointer = Checkpointer(Storage(), str(tmp_path / "stage"), 0, 1, keep_last=2)
    model, optimizer = new_model_and_optimizer(seed=0)
    for step in (1, 2, 3):
        train(model, optimizer, range(step - 1, step))
        save_at(checkpointer, step, model, optimizer, position=step)
    at_step_3 = parameters(model)
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000002", "step-00000003"]

    # A crash after every file of step 4 was written, before the commit: step 3 is still what loads.
    train(model, optimizer, range(3, 4))
    with monkeypatch.context() as crash:
        crash.setattr(checkpointer, "_commit", lambda step: None)
        save_at(checkpointer, 4, model, optimizer, position=4)
    assert (root / "step-00000004" / "checkpoint.json").exists()
    restored_model, _, _, restored = restore(checkpointer)
    assert restored.step == 3 and restored.rank_state == {"positions": {"image": 3}}
    assert_bitwise_equal(parameters(restored_model), at_step_3)

    # The control: committed, the same save is what loads, and the oldest kept one goes.
    save_at(checkpointer, 4, model, optimizer, position=4)
    assert restore(checkpointer)[3].step == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000003", "step-00000004"]
    with pytest.raises(ValueError, match="already committed"):  # rewriting it would first delete it
        save_at(checkpointer, 4, model, optimizer)


@pytest.mark.parametrize("form", ["relative", "file_uri"])
def test_checkpointer_keep_last_deletes_under_a_relative_or_file_uri_root(tmp_path, monkeypatch, form):
    """Storage.list gives local paths normalised (no ./, no file://): the old folders must be found all the same."""
    monkeypatch.chdir(tmp_path)
    stage = "./stage" if form == "relative" else f"file://{tmp_path / 'stage'}"
    checkpointer = Checkpointer(Storage(), stage, 0, 1, keep_last=2)
    model, optimizer = new_model_and_optimizer(seed=0)
    for step in (1, 2, 3):
        save_at(checkpointer, step, model, optimizer, position=step)

    root = tmp_path / "stage" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000002", "step-00000003"]
    assert restore(checkpointer)[3].rank_state == {"positions": {"image": 3}}


def test_checkpointer_async_save_writes_what_the_tensors_were_when_save_returned(tmp_path, monkeypatch):
    checkpointer = Checkpointer(Storage(), str(tmp_path / "stage"), 0, 1, async_save=True)
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(2))
    ema = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    saved, saved_ema, saved_optimizer = parameters(model), {k: v.clone() for k, v in ema.items()}, \
        {k: v.clone() for k, v in optimizer_tensors(optimizer).items()}
    release = threading.Event()

    class HeldWriter(HuggingFaceStorageWriter):
        """Writes nothing until released: what DCP writes then is whatever it staged when save returned."""

        def write_data(self, plan, planner):
            release.wait(timeout=30)
            return super().write_data(plan, planner)

    monkeypatch.setattr(checkpoint_module, "shard_writer",
                        lambda folder: HeldWriter(str(folder), save_distributed=True))

    save_at(checkpointer, 2, model, optimizer, ema)
    assert not list((tmp_path / "stage").rglob("shard-*")), "save returned before the shards were written"
    train(model, optimizer, range(2, 4))  # training goes on, in place, while the files are written
    for tensor in ema.values():
        tensor.add_(1.0)
    release.set()
    checkpointer.wait()
    assert list((tmp_path / "stage").rglob("shard-*")) and (tmp_path / "stage" / "checkpoints" / "latest.json").exists()

    restored_model, restored_optimizer, restored_ema, restored = restore(checkpointer, ema_like=ema)
    assert restored.step == 2
    assert_bitwise_equal(parameters(restored_model), saved)
    assert_bitwise_equal(restored_ema, saved_ema)
    assert_bitwise_equal(optimizer_tensors(restored_optimizer), saved_optimizer)


def test_checkpointer_async_failure_is_raised_by_wait(tmp_path, monkeypatch):
    checkpointer = Checkpointer(Storage(), str(tmp_path / "stage"), 0, 1, async_save=True)
    model, optimizer = new_model_and_optimizer(seed=0)
    train(model, optimizer, range(1))

    def full_disk(step):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointer, "_commit", full_disk)
    save_at(checkpointer, 1, model, optimizer)
    with pytest.raises(RuntimeError, match="asynchronous checkpoint save failed: No space left"):
        checkpointer.wait()
    checkpointer.wait()  # raised once


def test_checkpointer_resumes_a_model_whose_heads_are_untrained(tmp_path):
    """Stage 1 never trains the Gaussian head: AdamW has no state for it, and resuming must accept that."""

    def fresh():
        torch.manual_seed(32)
        model = build_model(ModelSection(kind="atoken", preset="tiny", patch_size=16, latent_channels=32,
                                         text_dim=8, gaussians_per_voxel=2, voxel_grid=16))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, optimizer = fresh()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    model(pixels)["reconstruction"].sub(pixels).abs().mean().backward()
    optimizer.step()
    assert model.gaussian_head.proj.weight not in optimizer.state, "the premise: an untrained head"
    checkpointer = Checkpointer(Storage(), str(tmp_path), 0, 1)
    save_at(checkpointer, 1, model, optimizer, position=2)
    restored_model, restored_optimizer = fresh()
    restored = checkpointer.load_latest(restored_model, restored_optimizer, None)

    assert restored.rank_state == {"positions": {"image": 2}}
    assert_bitwise_equal(parameters(restored_model), parameters(model))
    assert restored_model.gaussian_head.proj.weight not in restored_optimizer.state, "no state, as when saved"
    assert torch.equal(optimizer.state[model.decoder_in.weight]["exp_avg"],
                       restored_optimizer.state[restored_model.decoder_in.weight]["exp_avg"])


class Wide(torch.nn.Module):
    """Big enough (2 x 4 MiB weights, 24 MiB with AdamW's two slots) for 5 MiB multipart parts."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))

    def forward(self, x):
        return self.layers(x)


def test_checkpointer_on_s3_uploads_in_parts_and_reads_back_exactly(s3_endpoint, s3_credentials, tmp_path):
    bucket = f"atoken-ckpt-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    storage = Storage(StorageSection(endpoint_url=s3_endpoint, multipart_chunk_mb=5))
    output = f"s3://{bucket}/run/train_stage1/abc"
    torch.manual_seed(0)
    model = Wide()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1024)).square().mean().backward()
    optimizer.step()
    checkpointer = Checkpointer(storage, output, 0, 1, staging_dir=str(tmp_path / "staging"))
    rng = rng_tensors()
    checkpointer.save(1, model, optimizer, None, {"step": 1}, {"positions": {"image": 8}}, rng)
    save_model(storage, output, model, {"steps": 1})

    def parts(uri: str) -> int:
        etag = client.head_object(Bucket=bucket, Key=uri.split("/", 3)[3])["ETag"].strip('"')
        return int(etag.rsplit("-", 1)[1]) if "-" in etag else 1

    shard = join(checkpointer.folder(1), "shards", "shard-00001-model-00001-of-00001.safetensors")
    assert parts(shard) == 5, "24 MiB in 5 MiB parts"
    assert parts(join(output, "model.safetensors")) == 2, "write_bytes: 8 MiB in 5 MiB parts"
    assert parts(join(checkpointer.folder(1), "checkpoint.json")) == 1
    assert list((tmp_path / "staging").iterdir()) == [], "the staged shard is removed once uploaded"

    torch.manual_seed(1)
    restored_model = Wide()
    restored_optimizer = torch.optim.AdamW(restored_model.parameters(), lr=1e-3)
    restored = checkpointer.load_latest(restored_model, restored_optimizer, None)
    assert_bitwise_equal(parameters(restored_model), parameters(model))
    assert_bitwise_equal(optimizer_tensors(restored_optimizer), optimizer_tensors(optimizer))
    assert (restored.step, restored.shared_state, restored.rank_state) == (1, {"step": 1}, {"positions": {"image": 8}})
    assert_bitwise_equal(restored.rank_tensors, rng)  # the RNG: with weights and optimizer, an exact resume
    assert restored.bytes_read < storage.size(shard) + 10_000, "the shard once, its header and the rank files"


def test_final_model_round_trip(tmp_path):
    storage, output = Storage(), str(tmp_path / "stage")
    model, _ = new_model_and_optimizer(seed=5)
    uri = save_model(storage, output, model, {"steps": 10})
    other, _ = new_model_and_optimizer(seed=6)

    load_model_weights(storage, uri, other)

    assert_bitwise_equal(parameters(other), parameters(model))
    assert storage.read_json(join(output, "model.json")) == {"steps": 10}
