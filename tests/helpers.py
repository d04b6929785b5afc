"""Helpers the tests share: the CLI as a user runs it, the small quickstart overrides."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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
