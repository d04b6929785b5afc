"""Model throughput, peak memory and model FLOP utilisation, next to the matmul peak measured in the same run.

Needs only torch and this repository (no Ray, MLflow or data libraries), so it runs on the lent GPU as
carried. On a CPU it measures the same ratio: achieved model FLOP/s over measured matmul FLOP/s.

    python benchmarks/gpu/bench_model.py --device cuda --out benchmarks/results/gpu-model.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def load_model_module():
    """Import train/model without installing the package: map the repo folder as `atoken`."""
    import importlib.util

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("atoken", repo / "__init__.py",
                                                  submodule_search_locations=[str(repo)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["atoken"] = module
    spec.loader.exec_module(module)
    from atoken.pipeline.config import ModelSection
    from atoken.train.model import build_model

    return ModelSection, build_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def model_step_throughput(device, dtype, batch, resolution, steps, section_kwargs):
    ModelSection, build_model = load_model_module()
    model = build_model(ModelSection(**section_kwargs)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(batch, 3, resolution, resolution, device=device)  # (B, 3, H, W)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            out = model(pixels)
            loss = (out["reconstruction"].float() - pixels).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_step": flops_per_step,
        "steps_per_second": steps / seconds,
        "samples_per_second": steps * batch / seconds,
        "model_flops_per_second": flops_per_step * steps / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # bf16 autocast on CPU is ~8x slower (measured)
    size = 8192 if on_gpu else (1024 if args.quick else 2048)
    peak = matmul_flops_per_second(device, dtype, size, 20 if on_gpu else 5)
    models = {
        # The first slice's model, at the quickstart's shape and at a GPU-sized shape.
        "patch_autoencoder_quickstart": dict(batch=32, resolution=32, section=dict(
            kind="patch_autoencoder", patch_size=4, hidden_channels=64, latent_channels=8)),
        "patch_autoencoder_256px": dict(batch=64 if on_gpu else 8, resolution=256, section=dict(
            kind="patch_autoencoder", patch_size=4, hidden_channels=256, latent_channels=16)),
    }
    results = {}
    for name, spec in models.items():
        measured = model_step_throughput(device, dtype, spec["batch"], spec["resolution"],
                                         50 if on_gpu else (3 if args.quick else 10), spec["section"])
        measured["mfu_vs_measured_matmul"] = measured["model_flops_per_second"] / peak
        measured |= {"batch": spec["batch"], "resolution": spec["resolution"]}
        results[name] = measured
    cpu_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {
        "device": torch.cuda.get_device_name(device) if on_gpu else cpu_name,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "matmul_size": size,
        "matmul_flops_per_second": peak,
        "models": results,
        "not_measured_yet": ["AToken base/so400m MFU (model issue)", "gsplat vs CPU renderer (3D issue)"],
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
