"""The training loader (train/loader.py) on native-resolution JPEG shards under the resolution schedule:

1. samples/s per loader core with the schedule's long side drawn in [64, 256] and in [64, 512] (packed images,
   as the training thread receives them), on 1 and 2 loader processes and in-process; beside it Ray Data's
   streaming iterator doing the same preparation on the same 2 cores (what train/loader.py was picked against);
2. the data-wait share of step time when the consumer is the tiny tokenizer training on CPU (1 torch thread, 1
   loader process: the machine's 2 cores), and the same consumer with the samples prepared in the training
   thread (loader_workers 0) beside it;
3. the data-wait share when the consumer stands in for `base` on an H100: it sleeps base's projected step time for
   each micro-batch (the batch's model FLOPs, benchmarks/gpu/bench_model.py's count, at the MFU goal of 40% of
   the H100's dense bf16 peak). This machine has 2 cores, not 8, so the stand-in GPU is scaled down: it sleeps
   (8 / loader processes) x base's time, i.e. it consumes what a GPU fed by 8 loader cores consumes per core.
   That holds while loader throughput scales linearly in processes, which part 1 measures (1 → 2).
   Waits are timed after 10 warm-up steps (a run's first steps wait for the loader processes to start).
4. the loader processes' work on one sample (decode, draw, resize), now and as it was before 2026-12-03 (a
   Generator per draw, a copy more), in one run, on the same images at the same sizes.

    .venv/bin/python benchmarks/loader.py --out benchmarks/results/loader-cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
from bench_model import import_atoken, tokenizer_training_flops, write_results  # noqa: E402

import_atoken()
from atoken.pipeline.config import LossSection, TrainStageSection  # noqa: E402
from atoken.pipeline.storage import Storage  # noqa: E402
from atoken.preprocess.sources import COLOUR_PHOTOS, colour_photo_path  # noqa: E402
from atoken.train.data import ShardInfo, read_shard  # noqa: E402
from atoken.train.loader import LoaderSettings, ResolutionSchedule  # noqa: E402
from atoken.train.streams import task_batches  # noqa: E402
from atoken.train.tasks import ImageTask  # noqa: E402

H100_BF16_DENSE_FLOPS = 989.4e12  # as benchmarks/bench_preprocess.py
MFU_GOAL = 0.40
LOADER_CORES_PER_GPU = 8  # the budget
WARM_UP_STEPS = 10  # consumer steps before the wait is timed


def write_shards(folder: Path, shards: int, per_shard: int, max_side: int, quality: int = 95) -> list[ShardInfo]:
    """Crops of the colour photos at random aspect ratios (1:2 to 2:1), long side `max_side`, JPEG at `quality`:
    what a native-resolution ingest (ingest.max_resolution, encoding jpg) writes."""
    rng = np.random.default_rng(0)
    photos = [Image.open(colour_photo_path(name)).convert("RGB") for name in COLOUR_PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for shard in range(shards):
        path = folder / f"train-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in range(per_shard):
                photo = photos[int(rng.integers(len(photos)))]
                aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
                width = min(photo.width, int(photo.height * aspect))
                height = int(width / aspect)
                left = int(rng.integers(0, photo.width - width + 1))
                top = int(rng.integers(0, photo.height - height + 1))
                crop = photo.crop((left, top, left + width, top + height))
                scale = max_side / max(crop.size)
                crop = crop.resize((max(16, round(crop.width * scale)), max(16, round(crop.height * scale))),
                                   Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                crop.save(buffer, format="JPEG", quality=quality)
                sink.write({"__key__": f"s{shard:03d}_{index:04d}", "jpg": buffer.getvalue(),
                            "json": json.dumps({"caption": "a photo"}).encode()})
        infos.append(ShardInfo(str(path), per_shard))
    return infos


def image_task(resolution: list[int], max_tokens: int) -> ImageTask:
    return ImageTask(TrainStageSection(max_tokens=max_tokens, image_resolution=resolution), LossSection())


def previous_prepare(sample: dict, schedule: ResolutionSchedule, draw_key: tuple[int, int, int]) -> torch.Tensor:
    """The preparation before 2026-12-03, transcribed as the reference: a numpy Generator seeded per sample for
    the draw, and a copy more (convert of an RGB image). Its Generator's draw is made and dropped: the sizes are
    today's, so that both prepare the same images at the same sizes."""
    image = Image.open(io.BytesIO(sample["jpg"]))
    np.random.default_rng([*draw_key, 2]).integers(schedule.low, schedule.high + 1)
    width, height = schedule.size(*image.size, draw_key)
    if (width, height) != image.size:
        image.draft("RGB", (width, height))
        image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def prepare_cost(shards, resolution: list[int], rounds: int = 3) -> dict:
    """ms per sample of one loader process's work on a sample (ImageTask.prepare), now and before, in one run:
    the best of `rounds` passes over one shard."""
    samples = read_shard(Storage(), shards[0].uri)
    task, schedule = image_task(resolution, 8192), ResolutionSchedule.of(resolution)

    def best(prepare) -> float:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for index, sample in enumerate(samples):
                prepare(sample, index)
            times.append((time.perf_counter() - started) / len(samples) * 1e3)
        return min(times)

    now = best(lambda sample, index: task.prepare(sample, (0, 0, index)))
    before = best(lambda sample, index: previous_prepare(sample, schedule, (0, 0, index)))
    return {"samples": len(samples), "ms_per_sample_now": now, "ms_per_sample_before": before,
            "ratio_now_over_before": now / before}


def loader_rate(shards, resolution: list[int], workers: int, samples: int, max_tokens: int) -> dict:
    """Samples/s of packed batches arriving at the training thread (nothing else runs)."""
    loader = LoaderSettings(interleave=max(2, workers), workers=workers, prefetch=2)
    batches = task_batches(image_task(resolution, max_tokens), shards, Storage(), seed=0, loader=loader)
    next(batches)  # loader processes started and warm
    started, count, tokens = time.perf_counter(), 0, 0
    cpu = time.process_time()
    while count < samples:
        batch, _ = next(batches)
        count += batch.num_samples
        tokens += batch.token_count
    seconds = time.perf_counter() - started
    return {"loader_processes": workers, "samples": count, "seconds": seconds, "samples_per_second": count / seconds,
            "samples_per_second_per_loader_core": count / seconds / max(1, workers),
            "tokens_per_sample": tokens / count,
            "training_thread_cpu_seconds_per_sample": (time.process_time() - cpu) / count}


def ray_data_rate(shards, resolution: list[int], samples: int) -> dict:
    """The alternative the loader was picked against: Ray Data's streaming iterator over the same shards, the
    same preparation (ImageTask.prepare) as a map on 2 CPUs, rows taken by the training thread."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        task = image_task(resolution, 4096)

        def prepare(row: dict) -> dict:
            item = task.prepare({"__key__": row["__key__"], "jpg": row["jpg"]}, (0, 0, 0))
            return {"frames": item.frames.numpy(), "caption": item.caption}

        rows = iter(ray.data.read_webdataset([s.uri for s in shards], decoder=None).map(prepare).iter_rows())
        next(rows)  # started
        started, cpu, count = time.perf_counter(), time.process_time(), 0
        for _ in range(samples):
            next(rows)
            count += 1
        seconds = time.perf_counter() - started
        return {"samples": count, "seconds": seconds, "samples_per_second": count / seconds,
                "training_thread_cpu_seconds_per_sample": (time.process_time() - cpu) / count,
                "resumes_mid_epoch": False}
    finally:
        ray.shutdown()


def wait_share(shards, resolution: list[int], workers: int, steps: int, max_tokens: int, consume) -> dict:
    """Time the training thread waits for its next micro-batch, as a share of the step time."""
    loader = LoaderSettings(interleave=max(2, workers), workers=workers, prefetch=2)
    batches = task_batches(image_task(resolution, max_tokens), shards, Storage(), seed=1, loader=loader)
    for _ in range(WARM_UP_STEPS):  # loader processes started and their prefetch filled, as in a long run
        consume(next(batches)[0])
    waited = consumed = 0.0
    samples = 0
    for _ in range(steps):
        started = time.perf_counter()
        batch, _ = next(batches)
        ready = time.perf_counter()
        consume(batch)
        waited += ready - started
        consumed += time.perf_counter() - ready
        samples += batch.num_samples
    return {"loader_processes": workers, "steps": steps, "samples": samples,
            "step_seconds": (waited + consumed) / steps, "data_wait_seconds": waited / steps,
            "data_wait_share": waited / (waited + consumed)}


def tiny_consumer():
    from atoken.train.model import Tokenizer

    torch.manual_seed(0)
    model = Tokenizer.from_preset("tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def consume(frames) -> None:
        batch = frames.to("cpu")  # uint8 frames patchified where the model runs: here, in the step
        out = model.forward_packed(batch)
        loss = (out["patches"] - batch.patches).abs().mean() + 1e-8 * out["mean"].pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return consume


def base_stand_in(workers: int):
    """Sleeps base's projected H100 step time for the batch, scaled to `workers` loader cores standing for 8."""
    from atoken.train.model import PRESETS, TokenizerConfig
    from atoken.train.model.tokens import tokens_per_sample

    config = TokenizerConfig(**PRESETS["base"])
    scale = LOADER_CORES_PER_GPU / workers
    spent = []

    def consume(batch) -> None:
        seconds = tokenizer_training_flops(config, tokens_per_sample(batch)) / (H100_BF16_DENSE_FLOPS * MFU_GOAL)
        spent.append(seconds)
        time.sleep(seconds * scale)

    return consume, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=600, help="samples timed per loader-rate run")
    parser.add_argument("--steps", type=int, default=80, help="consumer steps timed per wait-share run")
    parser.add_argument("--stand-in-processes", type=int, default=2,
                        help="loader processes feeding the base stand-in (8 on a GPU node: no scaling)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the training thread's core; the loader processes take the others
    load_before = os.getloadavg()
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                                f"(this VM: shared, no GPU)", "torch_threads_training_thread": 1}
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp) / "shards", shards=8, per_shard=100, max_side=512)
        results["shards"] = "8 x 100 JPEG (quality 95) crops of the colour photos, aspect 1:2 to 2:1, long side 512"
        results["prepare_cost"] = {f"schedule_{low}_{high}": prepare_cost(shards, [low, high])
                                   for low, high in ((64, 256), (64, 512))}
        print("prepare", {k: round(v["ratio_now_over_before"], 3) for k, v in results["prepare_cost"].items()},
              flush=True)
        results["loader_rate"] = {}
        for low, high in ((64, 256), (64, 512)):
            name = f"schedule_{low}_{high}"
            results["loader_rate"][name] = [loader_rate(shards, [low, high], workers, args.samples, 4096)
                                            for workers in (0, 1, 2)]
            print(name, [round(r["samples_per_second"], 1) for r in results["loader_rate"][name]], flush=True)
        tiny = tiny_consumer()
        results["tiny_on_cpu"] = {
            "consumer": "the tiny tokenizer's fwd + bwd + AdamW on each packed micro-batch (max_tokens 1024), "
                        "schedule [64, 256], 1 torch thread",
            "loader_workers_1": wait_share(shards, [64, 256], 1, args.steps, 1024, tiny),
            "loader_workers_0_reference": wait_share(shards, [64, 256], 0, args.steps, 1024, tiny)}
        print("tiny", {k: round(v["data_wait_share"], 4) for k, v in results["tiny_on_cpu"].items()
                       if isinstance(v, dict)}, flush=True)
        results["base_on_h100_stand_in"] = {}
        for low, high, max_tokens in ((64, 256, 4096), (64, 512, 8192)):
            processes = args.stand_in_processes
            consume, spent = base_stand_in(processes)
            measured = wait_share(shards, [low, high], processes, args.steps, max_tokens, consume)
            measured["projected_base_step_seconds_on_h100"] = float(np.mean(spent))
            measured["stand_in_sleep_scale"] = LOADER_CORES_PER_GPU / processes
            results["base_on_h100_stand_in"][f"schedule_{low}_{high}_max_tokens_{max_tokens}"] = measured
            print("base", low, high, round(measured["data_wait_share"], 4), flush=True)
        results["base_on_h100_stand_in"]["assumes"] = (
            f"base's model FLOPs per micro-batch (bench_model.tokenizer_training_flops) at {MFU_GOAL:.0%} of "
            f"{H100_BF16_DENSE_FLOPS:.4g} FLOP/s; {args.stand_in_processes} loader processes here stand for "
            f"{LOADER_CORES_PER_GPU} per GPU (sleep x {LOADER_CORES_PER_GPU / args.stand_in_processes:g})")
        # Last: Ray's processes outlive its shutdown for a while and would load the measurements above.
        results["ray_data_schedule_64_512"] = ray_data_rate(shards, [64, 512], args.samples)
        print("ray data", round(results["ray_data_schedule_64_512"]["samples_per_second"], 1), flush=True)
    results["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    write_results(results, args.out, "benchmarks/loader.py")


if __name__ == "__main__":
    main()
