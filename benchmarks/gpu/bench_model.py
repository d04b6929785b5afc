"""Model throughput, peak memory and model FLOP utilisation, next to the matmul peak measured in the same run.

Needs only torch, einops and this repository (no Ray, MLflow or data libraries), so it runs on the lent GPU
as carried. On a CPU it measures the same ratio (achieved model FLOP/s over measured matmul FLOP/s) for
the small models.

    python benchmarks/gpu/bench_model.py --device cuda --out benchmarks/results/model-throughput-h100.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def import_atoken():
    """Map the repository folder as the `atoken` package when it is not installed (the lent GPU)."""
    if importlib.util.find_spec("atoken") is None:
        spec = importlib.util.spec_from_file_location("atoken", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["atoken"] = module
        spec.loader.exec_module(module)


def write_results(results: dict, out, script: str) -> None:
    """The benchmark's record with the command that made it, to `out` (when given) and the console."""
    results["command"] = f"python {script} " + " ".join(sys.argv[1:])
    text = json.dumps(results, indent=1)
    if out:
        out.write_text(text + "\n")
    print(text)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def tokenizer_training_flops(config, sample_tokens: list[int]) -> float:
    """Model FLOPs of one forward+backward (3x forward), counted from the shapes (the usual MFU convention:
    matmuls and attention scores, not norms or activations)."""
    width, mlp, depth = config.width, config.mlp_width, config.depth
    tokens = sum(sample_tokens)
    per_token_layer = 2 * (4 * width * width + 2 * width * mlp)  # q, k, v, out and the MLP
    attention = sum(2 * 2 * n * n * width for n in sample_tokens)  # QK^T and AV, per layer
    heads = 2 * tokens * (config.patch_dim * width * 2 + 2 * width * config.latent_channels)  # patch in/out, KL
    forward = 2 * depth * (tokens * per_token_layer + attention) + heads  # encoder + decoder
    return 3.0 * forward


def mixed_image_batch(device: torch.device, sizes: list[tuple[int, int]]):
    from atoken.train.model.tokens import pack, patchify_image

    generator = torch.Generator().manual_seed(0)
    samples = [patchify_image(torch.rand(3, h, w, generator=generator) * 2 - 1) for h, w in sizes]
    return pack(samples).to(device), [s[0].shape[0] for s in samples]


def tokenizer_throughput(preset: str, device: torch.device, dtype: torch.dtype, sizes, steps: int) -> dict:
    from atoken.train.model import Tokenizer

    model = Tokenizer.from_preset(preset).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch, sample_tokens = mixed_image_batch(device, sizes)
    enabled = dtype != torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            out = model.forward_packed(batch)
            loss = (out["patches"].float() - batch.patches).abs().mean() + 1e-8 * out["mean"].float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up, including FlexAttention's compilation on CUDA
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    flops = tokenizer_training_flops(model.config, sample_tokens)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples_per_step": len(sizes),
        "tokens_per_step": sum(sample_tokens),
        "image_sizes": [f"{h}x{w}" for h, w in sizes],
        "seconds_per_step": seconds / steps,
        "tokens_per_second": sum(sample_tokens) * steps / seconds,
        "model_flops_per_step": flops,
        "model_flops_per_second": flops * steps / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--presets", default=None, help="comma-separated; default: base,so400m on GPU, tiny on CPU")
    args = parser.parse_args()
    import_atoken()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # bf16 autocast on CPU is ~8x slower (measured)
    peak = matmul_flops_per_second(device, dtype, 8192 if on_gpu else 2048, 50 if on_gpu else 5)
    presets = args.presets.split(",") if args.presets else (["base", "so400m"] if on_gpu else ["tiny"])
    # 256x256 images with mixed-size neighbours, packed into one sequence (no padding to the largest).
    sizes = [(256, 256)] * 24 + [(256, 192), (192, 256), (128, 128), (128, 256)] * 4 if on_gpu else \
        [(64, 64)] * 12 + [(64, 48), (32, 64), (32, 32), (48, 48)]
    results = {}
    for preset in presets:
        measured = tokenizer_throughput(preset, device, dtype, sizes, steps=20 if on_gpu else 5)
        measured["mfu_vs_measured_matmul"] = measured["model_flops_per_second"] / peak
        results[preset] = measured
        print(preset, json.dumps(measured), flush=True)
    cpu_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {
        "device": torch.cuda.get_device_name(device) if on_gpu else cpu_name,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "matmul_flops_per_second": peak,
        "tokenizer": results,
        "mfu_goal": "so400m >= 0.40 of the measured bf16 matmul peak (issue 4)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
