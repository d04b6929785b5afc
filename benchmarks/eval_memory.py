"""How the evaluation suite's time and peak memory grow with the number of samples (issue 17: 50k samples).

Each size runs in a fresh process, so its peak RSS is the suite's alone. N synthetic 64 px images (PNG shard
samples, distinct keys and captions, pixels from a pool of 1000) go through `run_suite` with PSNR, SSIM, rFID
and text↔image retrieval (every caption distinct: N texts × N images, the hardest case). What is not the
suite's own work is replaced so that 50k samples run on a laptop CPU, and said so:
- the tokenizer: its input plus fixed noise (the suite's cost, not a model's);
- Inception: a fixed random projection of 8×8-pooled pixels to 2048-d (the real network's cost is a constant
  per image, in benchmarks/results/metrics-cpu.json; what grows with N is the suite's bookkeeping);
- the text encoder: a hash of the caption to 64-d.
Reference, in the same run: the code before issue 17 (git commit BEFORE, extracted to a temporary folder and
imported in its place), which the stage fed a list of every sample and whose retrieval built the whole
similarity matrix, at the sizes where that fits in this machine's memory.

    .venv/bin/python benchmarks/eval_memory.py --sizes 5000 50000 --before-sizes 5000 20000 \\
        --out benchmarks/results/eval-memory-cpu.json
    python benchmarks/eval_memory.py --inception cuda --sizes 5000 50000 --before-sizes   (benchmarks/gpu/run_all.sh)
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

REPO = Path(__file__).resolve().parents[1]
BEFORE = "4cbea9c"  # main before issue 17's streaming suite

CHILD = r"""
import hashlib, io, json, resource, sys, time
import numpy as np, torch
from PIL import Image
count, mode, device = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(2)
import atoken.evaluate.suite as suite
import atoken.train.model.text_encoder as text_encoder
from atoken.evaluate.adapter import TokenizerAdapter

rng = np.random.default_rng(0)
pool = []
for index in range(1000):
    base = np.linspace(0, 255, 64)[None, :, None] * rng.random(3)[None, None, :]
    pixels = np.clip(base + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    pool.append(buffer.getvalue())

def samples():
    for index in range(count):
        meta = {"caption": f"synthetic item {index}", "source": "synthetic"}
        yield {"__key__": f"item_{index:07d}", "png": pool[index % len(pool)], "json": json.dumps(meta).encode()}

noise = torch.from_numpy(np.random.default_rng(1).normal(0, 0.05, (3, 64, 64)).astype(np.float32))
projection = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (3 * 64, 64)).astype(np.float32))

def encode(media):
    return media

def decode(latent):
    return [(m + noise).clamp(-1, 1) for m in latent]

def embed(media):
    pooled = torch.stack([m.mean(dim=0).reshape(3, 8, 8, 8, 8).mean(dim=(2, 4)).reshape(-1)[:192] for m in media])
    return pooled @ projection  # (B, 64)

class Text:
    name, file_sha256, is_stand_in = "hash-64", "none", True
    def __call__(self, texts):
        rows = [np.frombuffer(hashlib.shake_128(t.encode()).digest(256), dtype=np.float32) for t in texts]
        return torch.from_numpy(np.nan_to_num(np.stack(rows)[:, :64]).clip(-1e3, 1e3))

features_projection = np.random.default_rng(3).normal(0, 1, (192, 2048))

class Features:
    protocol = {"network": "random projection stand-in", "network_sha256": "none", "distance": "frechet"}
    def features(self, images):
        pooled = np.stack([np.asarray(i, dtype=np.float64).reshape(8, 8, 8, 8, 3).mean(axis=(1, 3)).reshape(-1)
                           for i in images])  # (B, 192)
        return pooled @ features_projection  # (B, 2048)

text_encoder.cached_text_encoder = lambda path=None: Text()
if device == "stand-in":
    suite.shared_network = lambda kind, path=None: Features()
else:  # the real Inception network on `device` (benchmarks/gpu/run_all.sh: cuda)
    from atoken.evaluate.metrics.fid import InceptionFeatures
    inception = InceptionFeatures(device=device)
    suite.shared_network = lambda kind, path=None: inception
adapter = TokenizerAdapter(name="synthetic", encode=encode, decode=decode, embed=embed)
settings = suite.SuiteSettings(metrics=["psnr", "ssim", "rfid", "retrieval"], batch_size=64)
data = list(samples()) if mode == "before" else samples()  # the old stage read every shard into one list
started = time.perf_counter()
with torch.no_grad():
    report = suite.run_suite(adapter, settings, data)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
keys = ("eval_psnr", "eval_ssim", "eval_rfid", "eval_text_to_image_r1", "eval_image_to_text_r1")
print(json.dumps({"samples": count, "mode": mode, "inception": device, "seconds": round(seconds, 1),
                  "peak_rss_mib": round(peak),
                  "summary": {k: round(report.summary[k], 6) for k in keys if k in report.summary},
                  "skipped": report.skipped}))
"""


def run(count: int, mode: str, before_tree: Path | None, inception: str = "stand-in") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if mode == "before":
        env["PYTHONPATH"] = str(before_tree)  # ahead of the editable install: the old package is imported
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, str(count), mode, inception], env=env, capture_output=True,
                            text=True, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        return {"samples": count, "mode": mode, "error": result.stderr.strip().splitlines()[-1][:300],
                "wall_seconds": round(time.perf_counter() - started, 1)}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--before-sizes", type=int, nargs="*", default=[5000, 20000])
    parser.add_argument("--inception", default="stand-in",
                        help="stand-in (a random projection), or a device for the real network (cuda, cpu)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        if args.before_sizes:  # the old code from git (a device machine's copy of the tree may have no .git)
            tree = Path(folder) / "atoken"
            tree.mkdir()
            archive = subprocess.run(["git", "archive", BEFORE], cwd=REPO, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        for count in args.before_sizes:
            results.append(run(count, "before", Path(folder), args.inception))
            print(json.dumps(results[-1]), flush=True)
        for count in args.sizes:
            results.append(run(count, "streaming", None, args.inception))
            print(json.dumps(results[-1]), flush=True)
    streaming = [r for r in results if r["mode"] == "streaming" and "error" not in r]
    growth = {}
    if len(streaming) >= 2:
        small, large = streaming[0], streaming[-1]
        scale = large["samples"] / small["samples"]
        growth = {"samples_ratio": scale, "rss_ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 2),
                  "seconds_per_sample_ratio": round(large["seconds"] / small["seconds"] / scale, 2)}
    record = {
        "command": "python benchmarks/eval_memory.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "stand_ins": "tokenizer: input + fixed noise; text encoder: caption hash to 64-d; Inception: "
                     + ("random projection of 8x8-pooled pixels to 2048-d (the suite's own time and memory, not the "
                        "networks')" if args.inception == "stand-in" else f"the real network on {args.inception}"),
        "before": f"git {BEFORE}: every sample in one list, dense retrieval matrix",
        "results": results,
        "streaming_growth": growth,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(growth))


if __name__ == "__main__":
    main()
