"""Helpers the tests share: the CLI as a user runs it, the small quickstart overrides."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ATOKEN = [sys.executable, "-m", "atoken.pipeline.cli"]

# A small quickstart: the same config, fewer items and steps, so the suite stays fast on 2 cores.
SMALL = [
    "--set", "ingest.sources.0.limit=200", "--set", "ingest.sources.2.limit=100",
    "--set", "ingest.samples_per_shard=40",
    "--set", "train.stages.0.steps=150", "--set", "train.stages.0.checkpoint_every=50",
    "--set", "train.stages.0.warmup_steps=5",
    "--set", "train.stages.1.steps=20", "--set", "train.stages.1.checkpoint_every=10",
    "--set", "train.stages.1.warmup_steps=2",
    "--set", "evaluate.baseline_steps=20", "--set", "evaluate.fid_samples=16",
    "--set", "objects.limit=4",
    "--set", "train.stages.2.steps=3", "--set", "train.stages.2.checkpoint_every=3",
    "--set", "train.stages.2.warmup_steps=1",
    "--set", "train.stages.3.steps=3", "--set", "train.stages.3.checkpoint_every=3",
    "--set", "train.stages.3.warmup_steps=1",
]


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*ATOKEN, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- small training data and a tiny SigLIP2, built by the tests (nothing is downloaded) ----------------------

CAPTIONS = ("a photo of a cat", "a photo of a dog", "a red shoe")


def _tar(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def write_training_shards(folder: Path, shards: int = 4, images: int = 4, clips: int = 2, objects: int = 2,
                          size: int = 32, frames: int = 8) -> dict:
    """Image, clip and 3D shards as the ingest stages write them (png / npy / npz with input and evaluation
    views), captions from CAPTIONS; returns {"image"|"video"|"objects": [ShardInfo]}."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from atoken.preprocess.render import RenderSettings, camera_poses, eval_camera_poses, intrinsics
    from atoken.train.data import ShardInfo

    rng = np.random.default_rng(0)
    out: dict[str, list] = {"image": [], "video": [], "objects": []}
    for shard in range(shards):
        samples = []
        for item in range(images):
            buffer = io.BytesIO()
            # smooth images (a gradient plus noise): something a tiny model can learn in a few steps
            base = np.linspace(0, 255, size)[None, :, None] * rng.random(3)[None, None, :]
            pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(buffer, format="PNG")
            caption = CAPTIONS[(shard + item) % len(CAPTIONS)]
            samples.append({"__key__": f"i{shard}_{item}", "png": buffer.getvalue(),
                            "json": json.dumps({"caption": caption}).encode()})
        _tar(folder / "image" / f"train-{shard:06d}.tar", samples)
        out["image"].append(ShardInfo(str(folder / "image" / f"train-{shard:06d}.tar"), images))
        samples = []
        for item in range(clips):
            clip = np.clip(np.cumsum(rng.integers(-8, 9, (frames, size, size, 3)), axis=0) + 128, 0, 255)
            buffer = io.BytesIO()
            np.save(buffer, clip.astype(np.uint8))
            samples.append({"__key__": f"c{shard}_{item}", "npy": buffer.getvalue(),
                            "json": json.dumps({"caption": CAPTIONS[item % len(CAPTIONS)]}).encode()})
        _tar(folder / "video" / f"train-{shard:06d}.tar", samples)
        out["video"].append(ShardInfo(str(folder / "video" / f"train-{shard:06d}.tar"), clips))
        samples = []
        settings = RenderSettings(views=4, eval_views=2, resolution=16)
        for item in range(objects):
            arrays = {"voxels": rng.integers(4, 12, (12, 3)), "features": rng.random((12, 768)).astype(np.float16),
                      "views": rng.integers(0, 256, (4, 16, 16, 4), dtype=np.uint8),
                      "c2w": camera_poses(settings, (0.1, 0.2)).astype(np.float32),
                      "intrinsics": intrinsics(settings).astype(np.float32),
                      "eval_views": rng.integers(0, 256, (2, 16, 16, 4), dtype=np.uint8),
                      "eval_c2w": eval_camera_poses(settings, (0.1, 0.2)).astype(np.float32)}
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            samples.append({"__key__": f"o{shard}_{item}", "npz": buffer.getvalue(),
                            "json": json.dumps({"caption": CAPTIONS[item % len(CAPTIONS)]}).encode()})
        _tar(folder / "objects" / f"train-{shard:06d}.tar", samples)
        out["objects"].append(ShardInfo(str(folder / "objects" / f"train-{shard:06d}.tar"), objects))
    return out


def save_tiny_siglip2(folder: Path, width: int = 96, depth: int = 2, heads: int = 4, mlp: int = 384) -> Path:
    """A randomly initialised Siglip2Model (vision + text towers) in a Hugging Face folder, with a word-level
    tokenizer over CAPTIONS' words: the teacher, text tower, CLIP-perceptual tower and `init_from` of a test."""
    import torch
    import transformers

    torch.manual_seed(0)
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for caption in CAPTIONS for w in caption.split()})
    vocab = ["[PAD]", "[UNK]", *words]
    config = transformers.Siglip2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=width, num_hidden_layers=1, num_attention_heads=heads,
                         intermediate_size=mlp, max_position_embeddings=64),
        vision_config=dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                           intermediate_size=mlp, patch_size=16, num_patches=256))
    folder.mkdir(parents=True, exist_ok=True)
    transformers.Siglip2Model(config).eval().save_pretrained(folder, safe_serialization=True)
    # A word-level tokenizer: every caption word is its own token (a BERT vocabulary file maps them all to
    # [UNK] under transformers 5, and identical token ids would give identical text embeddings).
    words_only = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    words_only.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words_only, pad_token="[PAD]",
                                         unk_token="[UNK]").save_pretrained(folder)
    return folder



class LiveBytes(TorchDispatchMode):
    """The peak of bytes held by tensors created inside the block (each storage counted once, until freed):
    what a test or a benchmark reads as the working memory of the code it wraps."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self.refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self.refs:
                    size = storage.nbytes()
                    self.current += size
                    self.refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.peak = max(self.peak, self.current)
        return out

    def _free(self, key: int, size: int) -> None:
        self.current -= size
        self.refs.pop(key, None)


def commit_part(plan, storage, output: str, settings):
    """One part written as the ingest job writes it (preprocess/writer.py write_part), with no other part's
    record to reuse samples from: what the per-kind tests (images, videos, 3D, sources) exercise."""
    from atoken.preprocess.writer import write_part

    return write_part(plan, storage, output, settings, [plan.name])


def shard_members(output: Path, extension: str) -> dict[str, bytes]:
    """key → the bytes of its `extension` member, over every tar under output/shards (a key twice fails)."""
    import tarfile

    found: dict[str, bytes] = {}
    for path in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, member_extension = member.name.split(".", 1)
                if member_extension == extension:
                    assert key not in found, f"{key} is in two shards"
                    found[key] = tar.extractfile(member).read()
    return found


def run_script_ranks(script: str, world: int, args: list[str], timeout: float = 120) -> None:
    """`script` run once per rank, torchrun-style, with `args` ("{rank}" replaced by the rank) and gloo on loopback:
    all killed, and the test failed, if they are not done within `timeout` seconds; the test fails if any rank
    does, with its error's tail."""
    import pytest

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    ranks = [subprocess.Popen([sys.executable, script, *[str(rank) if a == "{rank}" else a for a in args]], env=env,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    deadline = time.monotonic() + timeout
    try:
        errors = [process.communicate(timeout=max(1.0, deadline - time.monotonic()))[1] for process in ranks]
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
        tails = "\n".join(f"rank {rank}:\n{process.communicate()[1][-2000:]}" for rank, process in enumerate(ranks))
        pytest.fail(f"the ranks were not done within {timeout:.0f} s (one left waiting in a collective?)\n{tails}")
    failed = [(rank, error) for rank, (process, error) in enumerate(zip(ranks, errors, strict=True))
              if process.returncode != 0]
    assert not failed, "\n".join(f"rank {rank} failed:\n{error[-3000:]}" for rank, error in failed)

