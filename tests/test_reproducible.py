"""Issue 15: the same config on the same data and the same kind of machine gives the same shard bytes and the
same stage-1 weights, byte for byte, wherever `run.root` and `run.local_dir` live.

Two runs of a small quickstart (images, one short training stage) through the CLI, from two roots of different
depths; then, as the control that the comparison can fail, the first root again with another `run.seed`.
The video and 3D ingests have their own tests (tests/preprocess/test_videos.py, test_objects.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import QUICKSTART, run_cli

pytestmark = pytest.mark.slow

STAGE = ("[{name: stage1, tasks: [image], latent_channels: 32, steps: 6, batch_size: 8, lr: 0.001, warmup_steps: 2,"
         " checkpoint_every: 3, log_every: 3, encoder_lr_scale: 1.0, ema_decay: 0.99, weight_decay: 0.1}]")
SMALL_IMAGES = [
    "ingest.sources.0.limit=48", "ingest.sources.1.limit=8", "ingest.sources.2.limit=20",
    "ingest.samples_per_shard=16", "videos.sources=[]", "objects.sources=[]", f"train.stages={STAGE}",
    "evaluate.baseline=null", "evaluate.metrics=[psnr]", "evaluate.grid_samples=4",
]


def run(folder: Path, *overrides: str):
    args = ["run", str(QUICKSTART), "--no-progress", "--set", f"run.root={folder / 'run'}",
            "--set", f"run.local_dir={folder / 'local'}"]
    for override in [*SMALL_IMAGES, *overrides]:
        args += ["--set", override]
    result = run_cli(args, cwd=folder.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stage_output(root: Path, stage: str) -> Path:
    return Path(json.loads((root / "_state" / f"{stage}.json").read_text())["output"])


def ingest_files(root: Path) -> dict[str, bytes]:
    """Every shard and manifest of the ingest stage, by its path under the run root."""
    output = stage_output(root, "ingest")
    files = [*output.glob("shards/*.tar"), *output.glob("manifests/*.parquet"), output / "manifest.parquet"]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(files)}


def test_two_roots_give_the_same_shards_and_weights_and_another_seed_does_not(tmp_path):
    first, second = tmp_path / "a", tmp_path / "somewhere" / "deeper" / "b"
    second.parent.mkdir(parents=True)
    run(first)
    run(second)
    root_a, root_b = first / "run", second / "run"

    shards_a, shards_b = ingest_files(root_a), ingest_files(root_b)
    assert sum(name.endswith(".tar") for name in shards_a) >= 4
    assert list(shards_a) == list(shards_b)  # the same fingerprints, shard names and manifests
    for name in shards_a:
        assert shards_a[name] == shards_b[name], name
    manifest = pq.read_table(stage_output(root_a, "ingest") / "manifest.parquet")
    assert manifest.equals(pq.read_table(stage_output(root_b, "ingest") / "manifest.parquet"))

    stage_a, stage_b = stage_output(root_a, "train_stage1"), stage_output(root_b, "train_stage1")
    assert stage_a.relative_to(root_a) == stage_b.relative_to(root_b)
    for name in ("model.safetensors", "ema.safetensors"):
        assert (stage_a / name).read_bytes() == (stage_b / name).read_bytes(), name

    # The control: another seed reuses the ingest (the seed is no part of it) and trains other weights.
    reseeded = run(first, "run.seed=1")
    assert any(line.split()[:2] == ["ingest", "skipped"] for line in reseeded.stdout.splitlines())
    stage_c = stage_output(root_a, "train_stage1")
    assert stage_c != stage_a
    assert (stage_c / "model.safetensors").read_bytes() != (stage_a / "model.safetensors").read_bytes()
