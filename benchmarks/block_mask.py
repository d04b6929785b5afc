"""FlexAttention block-mask cost per so400m forward: before (create_block_mask in each of the 54 layers) and after
(one structured build per packed batch, shared by the encoder's 27 and the decoder's 27 layers).

    .venv/bin/python benchmarks/block_mask.py --out benchmarks/results/block-mask-cpu.json
    python benchmarks/block_mask.py --device cuda --out benchmarks/results/block-mask-h100.json

Layouts packed to N tokens: 256-token images (16x16 patches), and videos of up to 4 tiles, a tile being 4 latent
frames x 256 tokens (16 frames at 256 px), with all earlier tiles visible or a window of one. Time: the median of
`--rounds` builds (one at 16k tokens and above on CPU); "before" per forward is 54 measured builds up to
`--forward-max-tokens`, beyond that 54 x one build, labelled extrapolated. Memory on CPU: the growth of the
process's peak RSS during one build (VmHWM, reset through /proc/self/clear_refs: what the OS must supply, kernel
temporaries included) and the peak of bytes held by the tensors the build creates (a TorchDispatchMode tracker:
allocator-independent, but blind to temporaries inside a kernel); on CUDA, torch.cuda.max_memory_allocated.
A "before" build that would need over 3/4 of the free memory is not run; its row is extrapolated (x N²).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks" / "gpu")]
from bench_model import import_atoken  # noqa: E402  (maps the repository as `atoken` on the lent GPU)

from helpers import LiveBytes  # noqa: E402  (the peak of bytes live tensors hold)

LAYERS = 2 * 27  # so400m: 27 encoder + 27 decoder layers, each built its own mask before
SIZES = (1024, 4096, 16384, 32768)
FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def layout(kind: str, tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) sample ids and tiles of `tokens` packed tokens."""
    if kind == "images":
        samples = torch.arange(tokens // 256).repeat_interleave(256)
        return samples.to(device), torch.zeros(tokens, dtype=torch.long, device=device)
    tiles_total = tokens // 1024
    per_video = [min(4, tiles_total - start) for start in range(0, tiles_total, 4)]
    samples = torch.cat([torch.full((n * 1024,), index) for index, n in enumerate(per_video)])
    tiles = torch.cat([torch.arange(n).repeat_interleave(1024) for n in per_video])
    return samples.to(device), tiles.to(device)


def before(samples, tiles, window):
    """The mask as every layer built it before: create_block_mask over the whole Q x KV grid."""
    from torch.nn.attention.flex_attention import create_block_mask

    from atoken.train.model.attention import mask_mod

    n = samples.shape[0]
    return create_block_mask(mask_mod(samples, samples, tiles, tiles, window), B=None, H=None, Q_LEN=n, KV_LEN=n,
                             device=samples.device)


def after(samples, tiles, window):
    from atoken.train.model.attention import build_block_mask

    return build_block_mask(samples, samples, tiles, tiles, window)


def status_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def timed(build, args, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    mask = build(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, mask


def measure(build, args, device: str, rounds: int) -> dict:
    """Seconds (median) and peak memory of one build."""
    out: dict = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds, mask = timed(build, args, device)
        out["peak_cuda_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = status_mib("VmRSS")
        seconds, mask = timed(build, args, device)
        out["peak_rss_growth_mib"] = round(max(status_mib("VmHWM") - base, 0), 2)  # 0: freed heap reused
        del mask
        with LiveBytes() as tracker:
            mask = build(*args)
        out["peak_tensor_mib"] = round(tracker.peak / 2**20, 3)
    times = [seconds] + [timed(build, args, device)[0] for _ in range(rounds - 1)]
    out["seconds"] = round(statistics.median(times), 5)
    out["block_mask_kib"] = round(sum(getattr(mask, name).nbytes for name in FIELDS) * 2 / 1024, 1)  # kv + q sides
    return out, mask


def memory_keys(device: str) -> tuple[str, ...]:
    return ("peak_cuda_mib",) if device == "cuda" else ("peak_rss_growth_mib", "peak_tensor_mib")


def free_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**20
    return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024


def before_row(samples, tiles, window, device: str, rounds: int, forward_max: int, largest):
    """The "before" measurement at N tokens, or, where it would not fit in memory, its extrapolation (x N²) from
    `largest`, the (tokens, row) of the largest size measured."""
    tokens = samples.shape[0]
    keys = memory_keys(device)
    scale = 0.0 if largest is None else (tokens / largest[0]) ** 2
    need, free = (0.0 if largest is None else largest[1][keys[0]] * scale), free_mib(device)
    if need > 0.75 * free:
        row = {key: round(largest[1][key] * scale, 3) for key in ("seconds", *keys)}
        row["per_forward_seconds"] = round(row["seconds"] * LAYERS, 3)
        row["per_forward"] = (f"extrapolated, not run (would need ~{need:.0f} MiB of {free:.0f} MiB free): "
                              f"x (N / {largest[0]})² from {largest[0]} tokens, x {LAYERS} builds")
        return row, None
    row, mask = measure(before, (samples, tiles, window), device, rounds)
    if tokens <= forward_max:
        row["per_forward_seconds"] = round(sum(timed(before, (samples, tiles, window), device)[0]
                                               for _ in range(LAYERS)), 4)
        row["per_forward"] = f"measured: {LAYERS} builds"
    else:
        row["per_forward_seconds"] = round(row["seconds"] * LAYERS, 3)
        row["per_forward"] = f"extrapolated: {LAYERS} x one measured build"
    return row, mask


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU threads"
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s+(.+)", lscpu)
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{platform.machine()}, {model.group(1).strip() if model else 'unknown CPU'}, nproc {nproc}, shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the issue measured on one)")
    parser.add_argument("--forward-max-tokens", type=int, default=None,
                        help="measure 54 'before' builds up to here (default: 4096 on CPU, all on CUDA)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import_atoken()
    load_at_start = list(os.getloadavg())
    torch.set_num_threads(args.threads)
    forward_max = args.forward_max_tokens or (4096 if args.device == "cpu" else max(args.sizes))
    warm = layout("videos", 2048, args.device)
    before(*warm, None), after(*warm, None)  # lazy initialisation (CUDA context, kernels) out of the timings
    results: dict = {}
    rows = []
    for kind, window in (("images", None), ("videos", None), ("videos", 1)):
        name = kind if window is None else f"{kind}, window {window}"
        results[name] = {}
        largest = None  # (tokens, before row) of the largest size measured, to extrapolate from
        for tokens in args.sizes:
            samples, tiles = layout(kind, tokens, args.device)
            rounds = args.rounds if args.device == "cuda" or tokens < 16384 else 1
            new, new_mask = measure(after, (samples, tiles, window), args.device, max(rounds, 3))
            row: dict = {"samples": int(samples.max()) + 1, "after": new}
            old, old_mask = before_row(samples, tiles, window, args.device, rounds, forward_max, largest)
            if old_mask is not None:
                row["same_block_mask"] = all(torch.equal(getattr(old_mask, f), getattr(new_mask, f)) for f in FIELDS)
                largest = (tokens, old)
                del old_mask
            row["before"] = old
            row["speedup_per_forward"] = round(old["per_forward_seconds"] / new["seconds"], 1)
            results[name][str(tokens)] = row
            memory = memory_keys(args.device)
            cells = [name, tokens, old["seconds"], old["per_forward_seconds"], *(old.get(m, "-") for m in memory),
                     new["seconds"], *(new[m] for m in memory), row.get("same_block_mask", "not run")]
            rows.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
            print(rows[-1], flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(args.device),
        "torch": torch.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        # 1/5/15-minute load averages: above 2 on a 2-core machine, other jobs shared the cores.
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "layers_per_forward": LAYERS,
        "unit": "seconds per build; before per forward = 54 builds; after per forward = its one build; MiB",
        "memory": ("torch.cuda.max_memory_allocated growth over one build" if args.device == "cuda" else
                   "peak_rss_growth_mib: VmHWM growth over one build (reset via /proc/self/clear_refs), kernel "
                   "temporaries included; peak_tensor_mib: peak bytes of live tensors the build creates "
                   "(TorchDispatchMode), temporaries inside a kernel not seen"),
        "notes": [
            "before and after give the same BlockMask (kv and full-kv blocks, in the same order) at every size: "
            "'same blocks'",
            "after per forward is its one build: encoder and decoder share it (Tokenizer.forward_packed)",
            "before's peak is per build; its 54 builds run one after another, so a forward's peak is the same",
            "CPU peak RSS growth reads 0 for builds small enough to reuse freed heap: read peak tensor MiB there",
            "16k and 32k run one build each on CPU: at those sizes a build is bound by page faults on freshly "
            "mapped memory (system time), so its time moves with the machine's load",
        ],
        "results": results,
    }
    memory = ["peak MiB"] if args.device == "cuda" else ["peak RSS growth MiB", "peak tensor MiB"]
    header = ["layout", "tokens", "before s/build", "before s/forward", *(f"before {m}" for m in memory),
              "after s/forward", *(f"after {m}" for m in memory), "same blocks"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]
    report["table"] = table
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
