"""What one training shard stream holds in memory, before (the shard read whole, then permuted: `read_shard`) and
after (streamed a shuffle window at a time: `ShardStream`, train/data.py), on shards the size of base.yaml's.

    .venv/bin/python benchmarks/shard_memory.py --out benchmarks/results/shard-memory-cpu.json

Shards: `samples_per_shard` 1000 samples of base's ~250 KB 1024-px JPEGs, and 100 clips of 4 MB (random bytes:
the stream does not decode). Memory: the peak of Python allocations (tracemalloc; the samples are bytes objects)
while the whole shard is taken from the stream and each sample dropped; time: the same read without tracemalloc,
best of `--rounds`. A data stream holds `shard_interleave` (8 in base.yaml) of these per task and loader process
set.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import webdataset as wds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
from bench_model import import_atoken, write_results  # noqa: E402  (maps the repository as `atoken`)

import_atoken()
from atoken.pipeline.storage import Storage  # noqa: E402
from atoken.train import data  # noqa: E402
from atoken.train.data import ShardInfo, ShardStream, read_shard  # noqa: E402

SHARDS = {"images_1000x256KB": (1000, 256 * 2**10, "jpg"), "clips_100x4MB": (100, 4 * 2**20, "mp4")}


def write_shard(path: Path, samples: int, size: int, member: str) -> ShardInfo:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for index in range(samples):
            sink.write({"__key__": f"s{index:05d}", member: rng.bytes(size), "json": b'{"caption": "a"}'})
    return ShardInfo(str(path), samples)


def whole_read(shard: ShardInfo) -> int:
    """The old stream's reading of one shard: every sample read into a list, then taken in a permuted order."""
    samples = read_shard(Storage(), shard.uri)
    order = np.random.default_rng([0, 0, 0]).permutation(len(samples))
    taken = 0
    for index in order:
        taken += len(samples[index]["__key__"])
    return taken


def streamed_read(shard: ShardInfo) -> int:
    taken = 0
    for _ in ShardStream([shard], Storage(), seed=0).samples():
        taken += 1
        if taken == shard.samples:
            break
    return taken


def measure(read, shard: ShardInfo, rounds: int) -> dict:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        read(shard)
        seconds.append(time.perf_counter() - started)
    gc.collect()
    tracemalloc.start()
    read(shard)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"peak_mib": peak / 2**20, "seconds": min(seconds), "samples_per_second": shard.samples / min(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "shuffle_window": {"samples": data.SHUFFLE_WINDOW_SAMPLES,
                                        "mib": data.SHUFFLE_WINDOW_BYTES / 2**20}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (samples, size, member) in SHARDS.items():
            shard = write_shard(Path(tmp) / f"{name}.tar", samples, size, member)
            row = {"shard_mib": Path(shard.uri).stat().st_size / 2**20,
                   "before_whole_shard": measure(whole_read, shard, args.rounds),
                   "after_shuffle_window": measure(streamed_read, shard, args.rounds)}
            row["peak_ratio_after_over_before"] = (row["after_shuffle_window"]["peak_mib"]
                                                   / row["before_whole_shard"]["peak_mib"])
            results[name] = row
            print(name, {k: round(v["peak_mib"], 1) for k, v in row.items() if isinstance(v, dict)}, flush=True)
            Path(shard.uri).unlink()
    write_results(results, args.out, "benchmarks/shard_memory.py")


if __name__ == "__main__":
    main()
