"""Two Ray Train workers on CPU (gloo): DDP and FSDP2 train the same stage to the same weights, and both write
whole (unsharded) checkpoints that a single process can load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import ray
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load

from atoken.pipeline.config import LossSection, ModelSection, TrainStageSection
from atoken.pipeline.storage import Storage
from atoken.train.data import ShardInfo
from atoken.train.loop import StageJob, run_train_stage
from atoken.train.model import build_model
from atoken.train.tasks import TaskShards

pytestmark = pytest.mark.slow


def write_image_shards(folder, shards: int, per_shard: int) -> list[ShardInfo]:
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    infos = []
    for index in range(shards):
        path = folder / f"train-{index:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for item in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
                sink.write({"__key__": f"s{index}_{item}", "png": buffer.getvalue(), "json": b'{"caption": "x"}'})
        infos.append(ShardInfo(str(path), per_shard))
    return infos


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def train_with(strategy: str, tmp_path, shards: list[ShardInfo]) -> dict[str, torch.Tensor]:
    stage = TrainStageSection(name=f"dist_{strategy}", steps=4, batch_size=4, lr=1e-3, warmup_steps=1,
                              checkpoint_every=2, log_every=2, num_workers=2, strategy=strategy, ema_decay=0.9)
    model = ModelSection(kind="atoken", preset="tiny", patch_size=16, latent_channels=8, text_dim=None,
                         gaussians_per_voxel=2, voxel_grid=16)
    losses = LossSection(semantic=0.0, lpips=0.0, gram=0.0, clip_perceptual=0.0)
    output = str(tmp_path / strategy)
    job = StageJob(stage, model, TaskShards(image=shards), output, None, Storage(), None, "run" + strategy, seed=0,
                   losses=losses, artifacts=False)
    run_train_stage(job, str(tmp_path / "local"))
    weights = load((tmp_path / strategy / "model.safetensors").read_bytes())
    # Whole tensors in the files a single process loads: FSDP's shards were gathered before writing.
    build_model(model).load_state_dict(weights)
    ema = load((tmp_path / strategy / "ema.safetensors").read_bytes())
    assert set(ema) == set(weights)
    checkpoint = load((tmp_path / strategy / "checkpoints" / "step-00000004" / "optimizer.safetensors").read_bytes())
    assert any(name.endswith(".exp_avg") for name in checkpoint)
    return weights


def test_ddp_and_fsdp_train_to_the_same_weights(local_ray, tmp_path):
    shards = write_image_shards(tmp_path / "shards", shards=4, per_shard=8)
    ddp = train_with("ddp", tmp_path, shards)
    fsdp = train_with("fsdp", tmp_path, shards)
    initial = build_model(ModelSection(kind="atoken", preset="tiny", patch_size=16, latent_channels=8,
                                       gaussians_per_voxel=2, voxel_grid=16)).state_dict()
    moved = [name for name in ddp if not torch.equal(ddp[name], initial[name])]
    assert moved, "training changed nothing"
    for name in ddp:
        assert torch.allclose(ddp[name], fsdp[name], atol=1e-5), name
