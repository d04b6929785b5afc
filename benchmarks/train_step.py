"""CPU step time of one training stage, before and after a change, in one run (issue 15, item 7).

The same job (one worker, tasks image + video, every loss on with the offline stand-ins, the `small` preset)
runs under two versions of the code: `--before REV` (a git worktree of that commit, imported as `atoken` ahead
of the installed one) and the working tree. Each runs in its own process on the same shards; the figure is
the mean step time of the last `--steps`/2 steps (the first half warms up). Beside it, the EMA update alone
for the `base` preset: the Python loop it was against `torch._foreach_lerp_`.

    .venv/bin/python benchmarks/train_step.py --before HEAD --out benchmarks/results/train-step-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(int(sys.argv[4]))
from helpers import write_training_shards
from atoken.pipeline.config import LossSection, ModelSection, TrainStageSection
from atoken.pipeline.storage import Storage
from atoken.train.loop import StageJob, single_process_runtime, train_worker
from atoken.train.tasks import TaskShards

root, steps, preset, tasks, batch = sys.argv[1], int(sys.argv[2]), sys.argv[5], sys.argv[6].split(","), int(sys.argv[7])
shards = write_training_shards(__import__("pathlib").Path(root) / "shards", shards=2, images=32, clips=8, size=64,
                               frames=8)
stage = TrainStageSection(name="bench", steps=steps, batch_size=batch, lr=1e-3, warmup_steps=1,
                          checkpoint_every=10 * steps, log_every=steps // 2, tasks=tasks, video_max_tokens=256)
model = ModelSection(kind="atoken", preset=preset, patch_size=16, latent_channels=32, text_dim=384,
                     gaussians_per_voxel=2, voxel_grid=16)
job = StageJob(stage, model, TaskShards(image=shards["image"], video=shards["video"]), root + "/out", None,
               Storage(), None, "bench", seed=0, losses=LossSection(perceptual_resolution=64), artifacts=False)
metrics = train_worker(job, single_process_runtime())
print("RESULT " + json.dumps({"step_seconds": metrics["train/step_seconds"],
                              "data_wait_seconds": metrics["train/data_wait_seconds"]}))
"""


def run_version(package_parent: Path | None, steps: int, threads: int, job: tuple[str, str, int]) -> dict:
    env = dict(os.environ)
    if package_parent is not None:
        env["PYTHONPATH"] = str(package_parent)  # ahead of the editable install's finder
    with tempfile.TemporaryDirectory() as root:
        done = subprocess.run([sys.executable, "-c", WORKER, root, str(steps), str(REPO / "tests"), str(threads),
                               job[0], job[1], str(job[2])],
                              env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"benchmark run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def ema_seconds(repeats: int = 5) -> dict:
    import torch

    from atoken.train.model import Tokenizer

    model = Tokenizer.from_preset("base", latent_channels=32)
    current = model.state_dict()
    averages = {name: tensor.detach().float().clone() for name, tensor in current.items()}
    floating = [name for name, tensor in current.items() if tensor.is_floating_point()]

    def loop():  # the loop EMA.update was before this change
        for name in floating:
            averages[name].lerp_(current[name].float(), 1e-4)

    def fused():  # EMA.update now
        torch._foreach_lerp_([averages[n] for n in floating], [current[n].float() for n in floating], 1e-4)

    figures = {}
    for label, update in (("python_loop", loop), ("foreach_lerp", fused)):
        update()
        started = time.perf_counter()
        for _ in range(repeats):
            update()
        figures[label] = (time.perf_counter() - started) / repeats
    figures["tensors"] = len(floating)
    figures["parameters"] = sum(current[n].numel() for n in floating)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a git revision: the code before the change")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tasks", default="image,video")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    job = (args.preset, args.tasks, args.batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        try:
            (Path(scratch) / "pkg").mkdir()
            (Path(scratch) / "pkg" / "atoken").symlink_to(tree)
            before = run_version(Path(scratch) / "pkg", args.steps, args.threads, job)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    after = run_version(None, args.steps, args.threads, job)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before], capture_output=True,
                            text=True).stdout.strip()
    result = {
        "command": " ".join(["benchmarks/train_step.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                   f"{args.threads}",
        "job": f"1 worker, {args.preset} preset, tasks [{args.tasks}], batch {args.batch_size} images of 64 px "
               "(+ 256-token video packs), every loss on (LPIPS/CLIP stand-ins, MiniLM text tower), fp32",
        "before": {"revision": commit, **before},
        "after": {"revision": "working tree", **after},
        "after_over_before": after["step_seconds"] / before["step_seconds"],
        "ema_update_base_preset_seconds": ema_seconds(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
