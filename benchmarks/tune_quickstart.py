"""How the quickstart's stage 1 was tuned: the tiny AToken transformer against the conv-VAE baseline at the same
budget (stage 1's steps), on the training split only.

The quickstart's held-out photos (the `held-out-photos` source) are never read here: the tuning set is every 10th
item of the training sources (crops of the 7 training photos and Fashion-MNIST images), as a positional split makes
it, and each variant trains on the rest. Each variant is stage 1 of configs/quickstart.yaml with a few fields
changed, run by the same `train_worker` the pipeline runs (one process, no Ray), scored by the evaluation's PSNR
(uint8) on the final weights and on their EMA.

    .venv/bin/python benchmarks/tune_quickstart.py --out benchmarks/results/quickstart-tuning.json
    .venv/bin/python benchmarks/tune_quickstart.py --only base,lr2e-3 --out /tmp/t.json   # some variants
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atoken.pipeline.config import load_config
from atoken.pipeline.storage import Storage
from atoken.train.data import ShardInfo, ShardStream
from atoken.train.loop import StageJob, single_process_runtime, train_worker
from atoken.train.model import build_model
from atoken.train.tasks import TaskShards

REPO = Path(__file__).resolve().parent.parent

# name → overrides of the quickstart config (the same dotted fields `atoken run --set` takes).
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "baseline": ["@baseline"],
    "lr2e-3": ["train.stages.0.lr=0.002"],
    "lr5e-4": ["train.stages.0.lr=0.0005"],
    # The baseline has no pooled embedding, so it never pays the semantic loss the transformer pays.
    "no_semantic": ["train.losses.semantic=0"],
    "no_perceptual": ["train.losses.lpips=0", "train.losses.gram=0", "train.losses.clip_perceptual=0"],
    "l1_only": ["train.losses.lpips=0", "train.losses.gram=0", "train.losses.clip_perceptual=0",
                "train.losses.semantic=0"],
    "lpips0.3_gram10": ["train.losses.lpips=0.3", "train.losses.gram=10"],
    "batch32": ["train.stages.0.batch_size=32"],
    "no_weight_decay": ["train.stages.0.weight_decay=0"],
    "small": ["train.model.preset=small"],
    "small_lr2e-3": ["train.model.preset=small", "train.stages.0.lr=0.002"],
    # Not the quickstart's budget: how the gap moves with twice the steps.
    "steps600": ["train.stages.0.steps=600"],
    "baseline_steps600": ["@baseline", "train.stages.0.steps=600"],
}


def write_tuning_shards(config, folder: Path) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """The quickstart's training sources (its held-out source dropped, every source split by hash) as train
    and tuning shards, through the ingest's own per-item code."""
    import webdataset as wds

    from atoken.preprocess.job import iter_items
    from atoken.preprocess.plan import Planner
    from atoken.preprocess.sources import read_item_bytes
    from atoken.preprocess.writer import ImageSettings

    section = config.ingest
    sources = [dataclasses.replace(s, split="auto") for s in section.sources if s.name != "held-out-photos"]
    planner = Planner(section.val_every, section.samples_per_shard)
    planner.add(iter_items(dataclasses.replace(section, sources=sources)))
    settings = ImageSettings(section.resolution, section.max_pixels)
    shards: dict[str, list[ShardInfo]] = {"train": [], "val": []}
    for plan in planner.parts(planner.bits()):
        path = folder / f"{plan.name}.tar"
        count = 0
        with wds.TarWriter(str(path)) as sink:
            for item in plan.items:
                for sample in settings.process(read_item_bytes(item.locator), item):
                    meta = {**sample.meta, "caption": item.caption, "source": item.source}
                    sink.write({"__key__": sample.key, **sample.files, "json": json.dumps(meta).encode()})
                    count += 1
        shards[plan.split].append(ShardInfo(str(path), count))
    return shards["train"], shards["val"]


def tuning_psnr(model_section, weights: dict[str, torch.Tensor], shards: list[ShardInfo]) -> float:
    """Mean PSNR (uint8, as evaluate/metrics/psnr.py) over the tuning images."""
    from atoken.evaluate.metrics.psnr import psnr_uint8

    model = build_model(model_section)
    model.load_state_dict(weights)
    model.eval()
    values = []
    stream = ShardStream(shards, Storage(), seed=0)
    total = sum(s.samples for s in shards)
    with torch.no_grad():
        for index, batch in enumerate(stream.batches(16)):
            if index * 16 >= total:
                break
            decoded = model(batch, sample=False)["reconstruction"].clamp(-1, 1)
            to_uint8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
            values += [psnr_uint8(a, b) for a, b in zip(to_uint8(batch), to_uint8(decoded), strict=True)]
    return float(np.mean(values))


def run_variant(name: str, overrides: list[str], train: list[ShardInfo], tune: list[ShardInfo]) -> dict:
    from safetensors.torch import load_file

    from atoken.pipeline.stages import baseline_config

    baseline = "@baseline" in overrides
    config = load_config(REPO / "configs" / "quickstart.yaml", [o for o in overrides if not o.startswith("@")])
    if baseline:
        config = baseline_config(config)
    stage = config.train.stages[0]
    model = config.train.stage_model(0)
    with tempfile.TemporaryDirectory(prefix=f"tune-{name}-") as folder:
        output = Path(folder)
        job = StageJob(stage, model, TaskShards(image=train), str(output), None, Storage(), None, name,
                       seed=config.run.seed, losses=config.train.losses, artifacts=False)
        started = time.perf_counter()
        metrics = train_worker(job, single_process_runtime("cpu"))
        seconds = time.perf_counter() - started
        result = {"variant": name, "overrides": overrides, "train_seconds": round(seconds, 1),
                  "final_loss": round(metrics["train/loss"], 4),
                  "psnr": round(tuning_psnr(model, load_file(output / "model.safetensors"), tune), 3),
                  "psnr_ema": round(tuning_psnr(model, load_file(output / "ema.safetensors"), tune), 3)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the quickstart's worker gets 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(VARIANTS)
    config = load_config(REPO / "configs" / "quickstart.yaml", [])
    with tempfile.TemporaryDirectory(prefix="tune-shards-") as folder:
        train, tune = write_tuning_shards(config, Path(folder))
        results = [run_variant(name, VARIANTS[name], train, tune) for name in names]
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
              "train_samples": sum(s.samples for s in train), "tuning_samples": sum(s.samples for s in tune),
              "tuning_set": "every 10th item of the quickstart's training sources (crops of the 7 training photos "
                            "and Fashion-MNIST); the held-out photos are never read", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
