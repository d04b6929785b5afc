"""configs/base.yaml and configs/so400m.yaml run as written, at reduced width, on CPU: their stages, task mix,
video packing, strategy on 2 workers (base: DDP; so400m: FSDP2 with activation checkpointing), SigLIP2
initialisation, sharded asynchronous checkpoints and S3 storage (moto, multipart).

Only sizes and the paths of its data and frozen networks change (the --set lines below); everything else is
the file users launch. The SigLIP2 folder (teacher, text tower, CLIP-perceptual tower and the encoder's
initialisation) and the VGG16 backbone of LPIPS are tiny random networks the test saves.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
import trimesh
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load, save_file

from helpers import CAPTIONS, REPO, run_cli, save_tiny_siglip2

pytestmark = pytest.mark.slow

STAGES = ("stage1", "stage2", "stage3", "stage4")


def write_images(folder: Path, count: int = 30) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        base = np.linspace(0, 255, 48)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(base + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
        name = CAPTIONS[index % len(CAPTIONS)].split()[-1]
        Image.fromarray(pixels).save(folder / f"{name}_{index:03d}.png")
    return folder


def write_videos(folder: Path, count: int = 6) -> Path:
    from atoken.preprocess.videos import encode_clip

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        frames = np.clip(np.cumsum(rng.integers(-8, 9, (24, 48, 48, 3)), axis=0) + 128, 0, 255).astype(np.uint8)
        (folder / f"clip_{index}.mp4").write_bytes(encode_clip(frames, fps=8.0))
    return folder


def write_objaverse_mirror(root: Path) -> Path:
    """A mirror in the objaverse package's layout (object paths, metadata, GLBs) of four pybullet meshes."""
    from atoken.preprocess.objects import pybullet_data_dir

    meshes = {"duck.obj": "Rubber Duck", "bunny.obj": "Stanford Bunny", "cube.obj": "Cube",
              "soccerball.obj": "Soccer Ball"}
    versioned = root / "hf-objaverse-v1"
    (versioned / "metadata").mkdir(parents=True)
    uids = [f"{index:032x}" for index in range(len(meshes))]
    paths = {uid: f"glbs/000-{index:03d}/{uid}.glb" for index, uid in enumerate(uids)}
    with gzip.open(versioned / "object-paths.json.gz", "wt") as handle:
        json.dump(paths, handle)
    for index, (uid, (mesh, name)) in enumerate(zip(uids, meshes.items(), strict=True)):
        with gzip.open(versioned / "metadata" / f"000-{index:03d}.json.gz", "wt") as handle:
            json.dump({uid: {"uid": uid, "name": name, "license": "by"}}, handle)
        (versioned / paths[uid]).parent.mkdir(parents=True)
        trimesh.load(pybullet_data_dir() / mesh).export(versioned / paths[uid])
    return root


def write_vgg16(path: Path) -> Path:
    from atoken.evaluate.metrics.lpips import VGG16Features

    torch.manual_seed(0)
    network = VGG16Features()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return path


def sizes_and_paths(tmp_path: Path, bucket: str) -> list[str]:
    siglip2 = save_tiny_siglip2(tmp_path / "siglip2")  # the tiny preset's width, depth, heads and MLP
    vgg = write_vgg16(tmp_path / "vgg16.safetensors")
    overrides = {
        "run.root": f"s3://{bucket}/runs/paper", "run.local_dir": str(tmp_path / "local"),
        "ingest.sources.0.path": str(write_images(tmp_path / "images")),
        "ingest.max_resolution": "32",  # native mode, JPEG training shards, as the file says: smaller
        "ingest.samples_per_shard": "6", "ingest.val_every": "6", "ingest.parallelism": "2",
        "videos.sources.0.path": str(write_videos(tmp_path / "videos")), "videos.max_resolution": "32",
        "videos.clip_frames": "8", "videos.stride_frames": "8", "videos.max_clips": "2",
        "videos.videos_per_shard": "2", "videos.val_every": "6",
        "videos.parallelism": "2",
        "objects.sources": f"[objaverse:{write_objaverse_mirror(tmp_path / 'objaverse')}]",
        "objects.views": "4", "objects.resolution": "32", "objects.samples": "4", "objects.voxel_grid": "16",
        "objects.min_voxels": "8", "objects.assets_per_shard": "1", "objects.val_every": "4",
        "objects.parallelism": "2",
        "train.model.preset": "tiny", "train.model.voxel_grid": "16", "train.model.gaussians_per_voxel": "2",
        "train.model.init_from": str(siglip2),
        "train.losses.lpips_backbone": str(vgg), "train.losses.vision_tower": str(siglip2),
        "train.losses.teacher": str(siglip2), "train.losses.text_encoder": str(siglip2),
        "train.losses.perceptual_resolution": "32",
        "evaluate.image_size": "32",  # the protocol's short-side resize and centre crop, at the data's size
        # 5 MiB parts (S3's smallest) so that checkpoints and models go up in several parts
        "storage.multipart_chunk_mb": "5",
    }
    for index in range(len(STAGES)):
        prefix = f"train.stages.{index}"
        # Packed images as the file says, at 16-32 px drawn per sample, from 2 interleaved shards (the small
        # data set has few), prepared in 1 loader process per stream and task (the DataLoader path).
        overrides |= {f"{prefix}.steps": "2", f"{prefix}.batch_size": "2", f"{prefix}.warmup_steps": "1",
                      f"{prefix}.checkpoint_every": "1", f"{prefix}.log_every": "1", f"{prefix}.num_workers": "2",
                      f"{prefix}.use_gpu": "false", f"{prefix}.max_tokens": "16",
                      f"{prefix}.image_resolution": "[16, 32]", f"{prefix}.shard_interleave": "2",
                      f"{prefix}.loader_workers": "1"}
        if index > 0:
            overrides |= {f"{prefix}.video_max_tokens": "16", f"{prefix}.video_resolution": "[16, 32]"}
        if index > 1:
            overrides |= {f"{prefix}.objects_per_batch": "1", f"{prefix}.render_views": "2"}
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def safetensors_names(s3, bucket: str, key: str) -> set[str]:
    """The tensor names in a safetensors object's header, read by range."""
    length = int.from_bytes(s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-7")["Body"].read(), "little")
    header = json.loads(s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=8-{7 + length}")["Body"].read())
    return set(header) - {"__metadata__"}


@pytest.mark.parametrize("config, strategy", [("base", "ddp"), ("so400m", "fsdp")])
def test_paper_config_runs_at_reduced_width_on_two_workers_with_s3(tmp_path, s3_endpoint, s3_credentials, config,
                                                                   strategy):
    bucket = f"atoken-{config}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    args = ["run", str(REPO / "configs" / f"{config}.yaml"), "--no-progress", *sizes_and_paths(tmp_path, bucket)]
    result = run_cli(args, cwd=tmp_path, env={"AWS_ENDPOINT_URL": s3_endpoint}, timeout=1200)
    log = (tmp_path / "local" / "logs" / f"atoken-{config}-run.log")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + (log.read_text()[-4000:]
                                                                             if log.exists() else "")

    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for item in page.get("Contents", [])]
    runs = MlflowClient(f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}")
    experiment = runs.get_experiment_by_name(f"atoken-{config}")
    by_name = {r.info.run_name: r for r in runs.search_runs([experiment.experiment_id])}
    for index, stage in enumerate(STAGES):
        run = by_name[f"train_{stage}"]
        # SigLIP2 initialises stage 1; every later stage starts from the one before.
        expected = f"siglip2:{tmp_path / 'siglip2'}" if index == 0 else f"train_{STAGES[index - 1]}/"
        assert expected in run.data.tags["atoken.init_from"], stage
        # Every rank wrote its own checkpoint shard: two shard files per step, on S3.
        shards = sorted(k for k in keys if f"/train_{stage}/" in k and "/checkpoints/step-00000002/shards/" in k)
        assert len(shards) == 2, shards
        # The strategy the file names, seen in what the ranks wrote: under FSDP2 each rank holds and writes its
        # rows of every sharded weight; under DDP a replicated weight is written by one rank.
        holders = ["model.encoder.layers.0.mlp.fc1.weight" in safetensors_names(s3, bucket, key) for key in shards]
        assert sum(holders) == (2 if strategy == "fsdp" else 1), (stage, holders)
        assert run.data.params["stage.strategy"] == strategy
        assert run.data.params["stage.activation_checkpointing"] == str(strategy == "fsdp")  # as the files say
        # Every loss of the stage's tasks was paid (distillation, sigmoid, perceptual, render).
        metrics = run.data.metrics
        assert {"train/image/distillation", "train/image/lpips", "train/image/gram",
                "train/image/clip_perceptual"} <= set(metrics), stage
        if index > 0:
            assert "train/video/sigmoid" in metrics
        if index > 1:
            assert {"train/3d/sigmoid", "train/3d/render_l1", "train/3d/render_lpips"} <= set(metrics)
        # Each rank's shard (~9 MiB: its half of weights, EMA and AdamW moments) went up in 5 MiB parts:
        # S3 gives a multipart object an ETag with its part count.
        assert all("-" in s3.head_object(Bucket=bucket, Key=key)["ETag"] for key in shards), stage
    stage1 = next(k for k in keys if "/train_stage1/" in k and k.endswith("/model.safetensors"))
    weights = load(s3.get_object(Bucket=bucket, Key=stage1)["Body"].read())
    assert weights["decoder_in.weight"].shape[1] == 32
    # Stage 1's encoder is SigLIP2's, moved by two steps at the encoder's 0.1x learning rate.
    from atoken.train.model import Tokenizer

    siglip = Tokenizer.from_siglip2(str(tmp_path / "siglip2")).state_dict()
    random_init = Tokenizer.from_preset("tiny", latent_channels=32).state_dict()
    name = "encoder.layers.0.mlp.fc1.weight"
    assert 0 < (weights[name] - siglip[name]).abs().max() < 1e-3
    assert (random_init[name] - siglip[name]).abs().max() > 1e-2  # negative control: not SigLIP2 by chance
    assert by_name["evaluate"].data.metrics["eval_psnr"] > 0
    assert s3_credentials["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
