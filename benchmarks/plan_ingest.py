"""How the ingest driver's planning and a whole ingest grow with the number of items (issue 16).

1. planning: a list file of N synthetic items (parquet: url, caption) → the driver's listing, spill and part
   plan (preprocess/plan.py), every part's items read back in order as the job hands them to Ray. Each size runs
   in a fresh process, so its peak RSS is the driver's alone. Reference, in the same run: the same listing held
   as a Python list (what the driver did before: `list_items`), at the sizes where that fits.
   Goal: <= 1 GiB peak RSS at 10M items, time linear in items.
2. ingest: N small images (Fashion-MNIST, 28 px → 32 px PNG; keys distinct, pixels repeating every 10k) through
   the whole job on a local Ray (`run_ingest_job`): seconds and CPU seconds per item at each size, and the same
   output run again (every part skipped). Goal: cost per item grows <= 1.15x from the smallest size to the largest.

    .venv/bin/python benchmarks/plan_ingest.py --plan 1000000 10000000 --ingest 10000 100000 \\
        --out benchmarks/results/plan-ingest-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAN_CHILD = """
import json, resource, sys, time
from atoken.pipeline.config import IngestSection, SourceSection
from atoken.pipeline.storage import Storage
from atoken.preprocess.job import iter_items, list_items
from atoken.preprocess.plan import Planner
path, mode = sys.argv[1], sys.argv[2]
section = IngestSection(sources=[SourceSection(kind="list", path=path)], samples_per_shard=1000, val_every=100)
started = time.perf_counter()
if mode == "planner":
    planner = Planner(section.val_every, section.samples_per_shard)
    planner.add(iter_items(section, Storage()))
    listed = time.perf_counter() - started
    bits = planner.bits()
    parts = items = 0
    for part in planner.parts(bits):
        parts += 1
        items += len(part.items)
    planner.close()
else:  # the reference: the whole listing in the driver's memory
    items = len(list_items(section, Storage()))
    listed, parts = time.perf_counter() - started, 0
print(json.dumps({"items": items, "parts": parts, "listing_seconds": round(listed, 2),
                  "seconds": round(time.perf_counter() - started, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def write_list(path: Path, count: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("url", pa.string()), ("caption", pa.string())])) as writer:
        for start in range(0, count, 1_000_000):
            indices = range(start, min(count, start + 1_000_000))
            writer.write_table(pa.table({
                "url": [f"https://images.example.org/{i // 1000:05d}/{i:09d}.jpg" for i in indices],
                "caption": [f"a synthetic photo number {i}" for i in indices]}))


def plan(sizes: list[int], reference_up_to: int, folder: Path) -> list[dict]:
    rows = []
    for count in sizes:
        path = folder / f"list-{count}.parquet"
        write_list(path, count)
        for mode in ("planner", "list") if count <= reference_up_to else ("planner",):
            done = subprocess.run([sys.executable, "-c", PLAN_CHILD, str(path), mode], capture_output=True,
                                  text=True, check=True)
            row = {"mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])}
            row["microseconds_per_item"] = round(row["seconds"] / count * 1e6, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
        path.unlink()
    return rows


def ingest(sizes: list[int], folder: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from atoken.pipeline.config import IngestSection, SourceSection
    from atoken.pipeline.storage import Storage
    from atoken.preprocess.job import iter_items, run_ingest_job
    from atoken.preprocess.writer import ImageSettings

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rows = []
    for count in sizes:
        listing = folder / f"images-{count}.parquet"
        pq.write_table(pa.table({"path": [f"fashion-mnist:t10k:{i % 10_000}" for i in range(count)],
                                 "key": [f"fm_{i:08d}" for i in range(count)]}), listing)
        section = IngestSection(sources=[SourceSection(kind="list", path=str(listing))], resolution=32,
                                samples_per_shard=1000, val_every=100, parallelism=2)
        output = folder / f"out-{count}"
        row = {"items": count}
        for run in ("first", "rerun"):
            started, cpu = time.perf_counter(), _cpu()
            stats = run_ingest_job(iter_items(section, Storage()), ImageSettings(32, 89_478_485), Storage(),
                                   str(output), kind="images", items_per_part=1000, val_every=100, parallelism=2,
                                   progress=False, description="bench", unit="img",
                                   settings_record={"resolution": 32})
            seconds, cpu_seconds = time.perf_counter() - started, _cpu() - cpu
            row[run] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                        "microseconds_per_item": round(seconds / count * 1e6, 1),
                        "cpu_microseconds_per_item": round(cpu_seconds / count * 1e6, 1),
                        "parts": stats["parts"], "parts_skipped": stats["parts_skipped"],
                        "samples": stats["samples"], "items_made": stats["items_made"]}
        row["driver_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    ray.shutdown()
    return rows


def _cpu() -> float:
    """CPU seconds of this process and its children (Ray's workers among them), user + system."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--reference-up-to", type=int, default=1_000_000,
                        help="run the whole-listing reference up to this size (it needs ~400 B per item)")
    parser.add_argument("--ingest", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atoken-plan-bench-") as folder:
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "load_average_before": os.getloadavg()[0],
            "plan": plan(args.plan, args.reference_up_to, Path(folder)),
            "ingest": ingest(args.ingest, Path(folder)),
            "load_average_after": os.getloadavg()[0],
        }
    planned = [r for r in result["plan"] if r["mode"] == "planner"]
    if len(planned) > 1:
        result["plan_time_per_item_growth"] = round(planned[-1]["microseconds_per_item"]
                                                    / planned[0]["microseconds_per_item"], 3)
    if len(result["ingest"]) > 1:
        first, last = result["ingest"][0]["first"], result["ingest"][-1]["first"]
        result["ingest_cost_per_item_growth"] = round(last["microseconds_per_item"] / first["microseconds_per_item"],
                                                      3)
        result["ingest_cpu_per_item_growth"] = round(last["cpu_microseconds_per_item"]
                                                     / first["cpu_microseconds_per_item"], 3)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
