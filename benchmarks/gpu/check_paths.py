"""The training paths only a GPU runs, checked on one (issue 15): each check passes or fails, with its numbers.

    python benchmarks/gpu/check_paths.py --out benchmarks/results/gpu-paths-<device>.json      (run_all.sh)
    python benchmarks/gpu/check_paths.py --device cpu --out /tmp/paths.json                    (what a CPU can)

1. `fsdp_bf16`: FSDP2 as `distribute()` shards a stage on a GPU (NCCL, world size 1, `bf16_policy`), one packed
   batch of images and a video under the loop's bf16 autocast: the transformer computes in bf16, the sigmoid
   loss's temperature and bias in float32, every gradient finite.
2. `compile`: each block compiled as `compile: true` does (`Module.compile`), forward + backward against eager
   on the same batch: loss and gradient norm within bf16 tolerance; step times both ways. GPU only.
3. `deterministic`: `torch.use_deterministic_algorithms` as `deterministic: true` sets it: two 3-step AdamW runs
   from one seed give byte-identical weights; the same two runs without it, reported beside (the control).
4. `flex`: the FlexAttention path (compiled on CUDA) against the masked path on one packed batch. GPU only.
5. `host_syncs`: the real loop (train_worker, one process) for a few steps under
   `torch.cuda.set_sync_debug_mode("warn")`: syncs per step and the lines that make them. Needs webdataset and
   the shards of benchmarks/gpu/data (see run_all.sh). GPU only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import import_atoken, synchronize  # noqa: E402

import_atoken()
from atoken.train.model import Tokenizer  # noqa: E402
from atoken.train.model.tokens import pack, patchify_image, patchify_video  # noqa: E402
from atoken.train.parallel import bf16_policy, shard_with_policy  # noqa: E402


def packed_batch(device: torch.device, seed: int = 0):
    """Two images of other sizes and a 9-frame video, packed (what a packed micro-batch holds)."""
    generator = torch.Generator().manual_seed(seed)
    samples = [patchify_image(torch.rand(3, 64, 96, generator=generator) * 2 - 1),
               patchify_image(torch.rand(3, 128, 64, generator=generator) * 2 - 1),
               patchify_video(torch.rand(9, 3, 64, 64, generator=generator) * 2 - 1)]
    return pack(samples).to(device)


def loss_of(model, batch, autocast: bool) -> torch.Tensor:
    with torch.autocast(batch.patches.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(batch, embed=True, sample=False)  # the posterior mean: no draw, so two models compare
    reconstruction = (out["patches"].float() - batch.patches).abs().mean()
    logits = (out["logit_scale"] + out["logit_bias"]).sum()
    return reconstruction + 1e-3 * out["mean"].float().pow(2).mean() + 1e-3 * logits


def gradient_norm(model) -> float:
    return float(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None)))


def check_fsdp_bf16(device: torch.device, preset: str) -> dict:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    store = tempfile.mkdtemp(prefix="check-paths-")
    dist.init_process_group(backend, init_method=f"file://{store}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Tokenizer.from_preset(preset).to(device)
        shard_with_policy(model, [*model.encoder.layers, *model.decoder.layers], bf16_policy())
        seen = {}  # the dtype a block's weight has while it runs (under autocast, activations are bf16 anyway)
        model.encoder.layers[0].register_forward_pre_hook(  # a hook that returns None keeps the inputs
            lambda module, _: seen.setdefault("block_weight", str(next(module.parameters()).dtype)) and None)
        batch = packed_batch(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(batch, embed=True)
        loss = (out["patches"].float() - batch.patches).abs().mean() + (out["logit_scale"] + out["logit_bias"]).sum()
        loss.backward()
        finite = all(torch.isfinite(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).all()
                     for p in model.parameters() if p.grad is not None)
        result = {"backend": backend, "block_weight_dtype": seen["block_weight"],
                  "logit_scale_dtype": str(out["logit_scale"].dtype), "logit_scale": out["logit_scale"].item(),
                  "gradients_finite": bool(finite), "loss": loss.item()}
        result["passed"] = (result["block_weight_dtype"] == "torch.bfloat16" and result["logit_scale_dtype"] ==
                            "torch.float32" and abs(result["logit_scale"] - 2.302585) < 1e-6 and finite)
        return result
    finally:
        dist.destroy_process_group()


def timed_step(model, batch, autocast: bool, rounds: int = 5) -> tuple[float, float, float]:
    """(loss, gradient norm, median seconds) of forward + backward, after one warm-up."""
    times = []
    for index in range(rounds + 1):
        model.zero_grad(set_to_none=True)
        synchronize(batch.patches.device)
        started = time.perf_counter()
        loss = loss_of(model, batch, autocast)
        loss.backward()
        synchronize(batch.patches.device)
        if index:
            times.append(time.perf_counter() - started)
    return loss.item(), gradient_norm(model), sorted(times)[len(times) // 2]


def check_compile(device: torch.device, preset: str) -> dict:
    batch = packed_batch(device)
    torch.manual_seed(0)
    eager = Tokenizer.from_preset(preset).to(device)
    torch.manual_seed(0)
    compiled = Tokenizer.from_preset(preset).to(device)
    for block in [*compiled.encoder.layers, *compiled.decoder.layers]:
        block.compile()
    # Agreement in float32 (bf16 rounding differs between fused and unfused kernels); speed in bf16, as trained.
    loss_e, norm_e, _ = timed_step(eager, batch, autocast=False, rounds=1)
    loss_c, norm_c, _ = timed_step(compiled, batch, autocast=False, rounds=1)
    loss_gap, norm_gap = abs(loss_c - loss_e) / abs(loss_e), abs(norm_c - norm_e) / norm_e
    seconds_e, seconds_c = (timed_step(model, batch, autocast=True)[2] for model in (eager, compiled))
    return {"loss_relative_gap_fp32": loss_gap, "gradient_norm_relative_gap_fp32": norm_gap,
            "eager_seconds_bf16": seconds_e, "compiled_seconds_bf16": seconds_c, "speedup": seconds_e / seconds_c,
            "passed": loss_gap < 1e-3 and norm_gap < 1e-3}


def three_steps(device: torch.device, preset: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Tokenizer.from_preset(preset).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, packed_batch(device, seed=step), autocast=device.type == "cuda").backward()
        optimizer.step()
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def check_deterministic(device: torch.device, preset: str) -> dict:
    def differing(a, b) -> int:
        return sum(not torch.equal(a[name], b[name]) for name in a)

    free = differing(three_steps(device, preset), three_steps(device, preset))
    torch.use_deterministic_algorithms(True, warn_only=True)  # CUBLAS_WORKSPACE_CONFIG: set in main()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fixed = differing(three_steps(device, preset), three_steps(device, preset))
    finally:
        torch.use_deterministic_algorithms(False)
    without = sorted({str(w.message)[:160] for w in caught if "deterministic" in str(w.message)})
    return {"tensors_differing_deterministic": fixed, "tensors_differing_without_flag": free,
            "ops_without_a_deterministic_kernel": without, "passed": fixed == 0}


def check_flex(device: torch.device, preset: str) -> dict:
    batch = packed_batch(device)
    outputs = {}
    for backend in ("masked", "flex"):
        torch.manual_seed(0)
        model = Tokenizer.from_preset(preset, attention_backend=backend).to(device).eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            outputs[backend] = model(batch, sample=False)["patches"].float()
        synchronize(device)
    gap = (outputs["flex"] - outputs["masked"]).abs().max().item()
    scale = outputs["masked"].abs().max().item()
    return {"max_abs_gap": gap, "output_scale": scale, "passed": gap <= 2e-2 * max(scale, 1.0)}


def check_host_syncs(device: torch.device, preset: str, data: Path, steps: int) -> dict:
    """Syncs of `steps` training steps: a run of 2 x steps less a run of `steps`. Both start the same way (the
    model to the device, the loader) and end the same way (one log step, the last checkpoint, the model's
    save), so the difference is what the steps in between cost."""
    counts = [sync_count(device, preset, data, total) for total in (steps, 2 * steps)]
    per_line = collections.Counter(counts[1])
    per_line.subtract(counts[0])
    total = sum(counts[1].values()) - sum(counts[0].values())
    return {"steps": steps, "syncs_per_step": total / steps,
            "where": {line: count for line, count in per_line.most_common(20) if count > 0},
            "syncs_whole_runs": [sum(c.values()) for c in counts], "passed": total / steps <= 2}


def sync_count(device: torch.device, preset: str, data: Path, steps: int) -> collections.Counter:
    """Host syncs of a whole `steps`-step run of the real loop, by the line of atoken's code that made them."""
    from bench_train import tar_shards

    from atoken.pipeline.config import LossSection, ModelSection, TrainStageSection
    from atoken.pipeline.storage import Storage
    from atoken.train.loop import StageJob, single_process_runtime, train_worker
    from atoken.train.tasks import TaskShards

    images = tar_shards(data / "images")
    stage = TrainStageSection(name="syncs", tasks=["image"], steps=steps, batch_size=16, lr=3e-4,
                              warmup_steps=1, checkpoint_every=10 * steps, log_every=10 * steps)  # the last step only
    model = ModelSection(kind="atoken", preset=preset, patch_size=16, latent_channels=32)
    losses = LossSection(lpips=0.0, gram=0.0, clip_perceptual=0.0, semantic=0.0)
    job = StageJob(stage, model, TaskShards(image=images), tempfile.mkdtemp(prefix="syncs-"), None, Storage(),
                   None, "syncs", seed=0, losses=losses, artifacts=False)
    where: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if "/atoken/" in f.filename
                          or "/train/" in f.filename), None)
            where[f"{frame.filename}:{frame.lineno}" if frame else f"{filename}:{lineno}"] += 1

    previous = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            train_worker(job, single_process_runtime(str(device)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="base on a GPU, tiny on a CPU")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--sync-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # cuBLAS reads its workspace setting when it starts: before any check runs (as train/loop.py sets it).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("base" if cuda else "tiny")
    checks = {"fsdp_bf16": lambda: check_fsdp_bf16(device, preset),
              "deterministic": lambda: check_deterministic(device, preset)}
    if cuda:
        checks |= {"compile": lambda: check_compile(device, preset), "flex": lambda: check_flex(device, preset)}
        if (args.data / "images").is_dir():
            checks["host_syncs"] = lambda: check_host_syncs(device, preset, args.data, args.sync_steps)
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                     "preset": preset, "command": " ".join(sys.argv), "checks": {}}
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            results["checks"][name] = check()
        except Exception as exc:  # noqa: BLE001 - one failing check must not lose the others' results
            results["checks"][name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                       "traceback": traceback.format_exc()[-3000:]}
        results["checks"][name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, "passed" if results["checks"][name]["passed"] else "FAILED", flush=True)
    if not cuda:
        results["not_run"] = "compile, flex and host_syncs: GPU only"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
