"""The evaluation suite: every metric the run asks for, on held-out images, clips and 3D assets, through one
tokenizer adapter, each number with its protocol.

    image shards ─► reconstruct ─► PSNR, SSIM, LPIPS (or the declared stand-in) per image; rFID over the set
    clip shards  ─► reconstruct ─► PSNR, SSIM per frame; rFVD over the clips
    captions     ─► frozen text encoder ─► zero-shot accuracy (class names), text↔image/video R@1/5/10
    3D samples   ─► Gaussians ─► rendered at held-out views ─► PSNR, SSIM, LPIPS

A plain function (`run_suite`); the pipeline's evaluate stage and `atoken eval` run it as a Ray task.
"""

from __future__ import annotations

import functools
import heapq
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from atoken.evaluate.adapter import TokenizerAdapter
from atoken.evaluate.protocols import implementation_version, protocol
from atoken.evaluate.reconstruction import to_uint8

IMAGE_METRICS = ("psnr", "ssim", "lpips", "rfid")
VIDEO_METRICS = ("rfvd",)  # video PSNR/SSIM follow psnr/ssim whenever clips are given
UNDERSTANDING_METRICS = ("zero_shot", "retrieval")
OBJECT_METRICS = ("render_3d",)
KNOWN_METRICS = IMAGE_METRICS + VIDEO_METRICS + UNDERSTANDING_METRICS + OBJECT_METRICS
# Built-in sets whose captions are class labels, and their full class lists (zero-shot ranks all classes).
CLASS_SETS = {"fashion-mnist": "FASHION_MNIST_CLASSES"}


@dataclass
class SuiteSettings:
    metrics: list[str]
    max_samples: int | None = None  # images scored for PSNR/SSIM/LPIPS
    fid_samples: int | None = None  # images (first N) whose Inception features feed rFID
    fvd_clips: int | None = None  # clips (first N) whose I3D features feed rFVD
    grid_samples: int = 8
    worst_k: int = 8
    lpips_backbone: str | None = None  # VGG16 safetensors; None: the declared stand-in
    text_encoder: str | None = None  # a Hugging Face text model folder; None: the packaged MiniLM stand-in
    held_out_views: list[int] = field(default_factory=lambda: [3, 7, 11, 15])
    batch_size: int = 32


@dataclass
class SuiteReport:
    summary: dict[str, float]  # eval_<metric>: the numbers, as MLflow metrics
    protocols: dict[str, dict[str, Any]]  # metric → its protocol
    metric_protocols: dict[str, str]  # summary key → the metric whose protocol it was measured under
    rows: list[dict[str, Any]]  # one per image / clip / 3D view: key, modality, resolution, per-sample metrics
    grid: list[list[np.ndarray]]  # [originals, reconstructions], (H, W, 3) uint8 each
    worst: list[dict[str, Any]]  # the worst-k images by PSNR: key, psnr, original, reconstruction
    video_grid: list[list[np.ndarray]] = field(default_factory=list)  # per clip: original / reconstructed frames
    skipped: dict[str, str] = field(default_factory=dict)  # metric → why it did not run


@functools.lru_cache(maxsize=8)
def shared_network(kind: str, path: str | None = None):
    """One copy per process of each frozen feature network: a baseline scored after the tokenizer reuses it."""
    from atoken.evaluate.metrics import fid, i3d, lpips

    if kind == "inception":
        return fid.InceptionFeatures()
    if kind == "i3d":
        return i3d.load_i3d(i3d.default_i3d_path())
    return lpips.LPIPS(path) if kind == "lpips" else lpips.PerceptualStandIn()


# Reference-side features depend on the data alone, so every tokenizer scored on the same items in this process
# shares them: (metric, item keys) → features.
REFERENCE_FEATURES: dict[tuple, Any] = {}


def reference_features(metric: str, keys: list[str], compute) -> Any:
    cache_key = (metric, tuple(keys))
    if cache_key not in REFERENCE_FEATURES:
        REFERENCE_FEATURES[cache_key] = compute()
    return REFERENCE_FEATURES[cache_key]


def perceptual_distances(network: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """LPIPS (or the stand-in) of uint8 (reference, reconstruction) pairs, batched by image size: on the uint8
    images, as the other metrics, so that every metric sees the same colour range. Batched: one image
    per call took 186 of the suite's 260 s on 103 images of 64 px (measured on 2 busy cores)."""
    out = [0.0] * len(pairs)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, (reference, _) in enumerate(pairs):
        by_size.setdefault(reference.shape, []).append(index)
    for indices in by_size.values():
        x, y = (
            torch.from_numpy(np.stack([pairs[i][side] for i in indices])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            for side in (0, 1)
        )  # (B, 3, H, W) each
        for index, value in zip(indices, network(x, y).tolist(), strict=True):
            out[index] = float(value)
    return out


def sample_meta(sample: dict) -> dict[str, Any]:
    return json.loads(sample["json"]) if "json" in sample else {}


class Suite:
    """Accumulates one run of the suite; `run_suite` is the entry point."""

    def __init__(self, adapter: TokenizerAdapter, settings: SuiteSettings, progress: bool):
        unknown = sorted(set(settings.metrics) - set(KNOWN_METRICS))
        if unknown:
            raise ValueError(f"evaluate.metrics: unknown metric {unknown[0]!r} (known: {', '.join(KNOWN_METRICS)})")
        self.adapter, self.settings, self.progress = adapter, settings, progress
        self.wants = set(settings.metrics)
        self.summary: dict[str, float] = {}
        self.protocols: dict[str, dict[str, Any]] = {}
        self.metric_protocols: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}

    def record_pixel_metrics(self, prefix: str, rows: list[dict], common: dict[str, Any], resolution: str,
                             definition: str) -> None:
        """PSNR and SSIM (those wanted): the mean of `rows`' values, under `prefix` (e.g. "video_")."""
        from atoken.evaluate.metrics import psnr, ssim

        for name, module in (("psnr", psnr), ("ssim", ssim)):
            if name in self.wants:
                self.record(
                    f"{prefix}{name}",
                    {f"eval_{prefix}{name}": np.mean([r[name] for r in rows])},
                    protocol(
                        **common,
                        feature_network="none",
                        feature_network_sha256="none",
                        implementation=implementation_version(module.__file__),
                        stand_in=False,
                        definition=definition + module.PROTOCOL,
                        resolution=resolution,
                        split="val",
                    ),
                )

    def record(self, metric: str, values: dict[str, float], fields: dict[str, Any]) -> None:
        self.protocols[metric] = fields
        for key, value in values.items():
            self.summary[key] = float(value)
            self.metric_protocols[key] = metric

    # -- images --------------------------------------------------------------------------------------------

    def images(self, samples: list[dict]) -> tuple[list[list[np.ndarray]], list[dict[str, Any]]]:
        from atoken.evaluate.metrics import psnr, ssim
        from atoken.train.data import decode_image

        samples = samples[: self.settings.max_samples]
        if not samples:
            raise ValueError("evaluation: the validation shards hold no images")
        perceptual = self._perceptual() if "lpips" in self.wants else None
        fid_count = len(samples) if self.settings.fid_samples is None else min(self.settings.fid_samples, len(samples))
        references, outputs = [], []
        grid: list[list[np.ndarray]] = [[], []]
        worst: list[tuple[float, int, dict]] = []  # a max-heap on -psnr keeps the k lowest PSNRs
        batches = range(0, len(samples), self.settings.batch_size)
        for start in tqdm(batches, desc="evaluate: images", disable=not self.progress, leave=False):
            chunk = samples[start : start + self.settings.batch_size]
            media = [decode_image(s)[None] for s in chunk]  # each (1, 3, H, W)
            decoded = self.adapter.reconstruct(media)
            pairs = [
                (to_uint8(original[0]), to_uint8(output[0])) for original, output in zip(media, decoded, strict=True)
            ]
            distances = perceptual_distances(perceptual[1], pairs) if perceptual is not None else None
            for index, (sample, (reference, reconstruction)) in enumerate(zip(chunk, pairs, strict=True)):
                meta = sample_meta(sample)
                row = {
                    "key": sample["__key__"],
                    "modality": "image",
                    "source": meta.get("source", ""),
                    "resolution": f"{reference.shape[0]}x{reference.shape[1]}",
                }
                if "psnr" in self.wants:
                    row["psnr"] = psnr.psnr_uint8(reference, reconstruction)
                if "ssim" in self.wants:
                    row["ssim"] = ssim.ssim_uint8(reference, reconstruction)
                if distances is not None:
                    row[perceptual[0]] = distances[index]
                self.rows.append(row)
                if len(references) < fid_count:
                    references.append(reference)
                    outputs.append(reconstruction)
                if len(grid[0]) < self.settings.grid_samples:
                    grid[0].append(reference)
                    grid[1].append(reconstruction)
                if "psnr" in row:
                    entry = (
                        -row["psnr"],
                        len(self.rows),
                        {
                            "key": row["key"],
                            "psnr": row["psnr"],
                            "original": reference,
                            "reconstruction": reconstruction,
                        },
                    )
                    heapq.heappush(worst, entry)
                    if len(worst) > self.settings.worst_k:
                        heapq.heappop(worst)  # drops the highest PSNR kept so far
        images = [r for r in self.rows if r["modality"] == "image"]
        resolution = ", ".join(sorted({r["resolution"] for r in images}))
        common = dict(
            resize="none: the tokenizer's output at its input size",
            crop="none (ingest: short side → resolution, centre crop)",
            colour_range="uint8 [0, 255] RGB",
            samples=len(images),
            frames=1,
            latent=self.adapter.latent,
        )
        self.record_pixel_metrics("", images, common, resolution, "")
        if perceptual is not None:
            name, network = perceptual
            self.record(
                name,
                {f"eval_{name}": np.mean([r[name] for r in images])},
                protocol(**common, **self._perceptual_fields(network), resolution=resolution, split="val"),
            )
        if "rfid" in self.wants:
            self._rfid(references, outputs, common | {"samples": len(references)}, resolution)
        ordered = sorted(worst, key=lambda e: -e[0])
        return grid, [e[2] for e in ordered]

    def _perceptual(self):
        if self.settings.lpips_backbone:
            return "lpips", shared_network("lpips", self.settings.lpips_backbone)
        return "perceptual_stand_in", shared_network("stand_in")

    def _perceptual_fields(self, network) -> dict[str, Any]:
        from atoken.evaluate.metrics import lpips

        stand_in = isinstance(network, lpips.PerceptualStandIn)
        fields = network.protocol
        return dict(
            feature_network=fields["network"],
            feature_network_sha256=fields["weights_sha256" if stand_in else "backbone_sha256"],
            implementation=implementation_version(lpips.__file__),
            stand_in="EfficientNet-Lite0 features, NOT LPIPS" if stand_in else False,
            definition={k: v for k, v in fields.items() if k not in ("weights", "backbone_file")},
        )

    def _rfid(self, references: list[np.ndarray], outputs: list[np.ndarray], common: dict, resolution: str) -> None:
        from atoken.evaluate.metrics import fid
        from atoken.evaluate.metrics.frechet import frechet_from_stats

        if len(references) < 2:
            self.skipped["rfid"] = f"needs at least 2 images, got {len(references)}"
            return
        network = shared_network("inception")
        keys = [r["key"] for r in self.rows if r["modality"] == "image"][: len(references)]
        reference = reference_features(
            "rfid", keys, lambda: fid.inception_stats(references, network=network, progress=self.progress)
        )
        reconstructed = fid.inception_stats(outputs, network=network, progress=self.progress)
        fields = network.protocol
        self.record(
            "rfid",
            {"eval_rfid": frechet_from_stats(reference, reconstructed)},
            protocol(
                **common,
                feature_network=fields["network"],
                feature_network_sha256=fields["network_sha256"],
                implementation=implementation_version(fid.__file__),
                stand_in=False,
                network_input=f"TF1 bilinear resize to {fid.SIZE}, (x - 128) / 128",
                resolution=resolution,
                feature_dim=fid.FEATURE_DIM,
                distance=fields["distance"],
                note="few samples make rFID noisy and biased upwards: compare only at equal counts",
            ),
        )

    # -- clips ---------------------------------------------------------------------------------------------

    def clips(self, samples: list[dict]) -> list[list[np.ndarray]]:
        from atoken.evaluate.metrics import fvd, psnr, ssim
        from atoken.train.data import decode_media

        fvd_count = len(samples) if self.settings.fvd_clips is None else min(self.settings.fvd_clips, len(samples))
        references, outputs, grid = [], [], []
        for sample in tqdm(samples, desc="evaluate: clips", disable=not self.progress, leave=False):
            clip = decode_media(sample)  # (T, 3, H, W)
            (decoded,) = self.adapter.reconstruct([clip])
            reference = np.stack([to_uint8(frame) for frame in clip])  # (T, H, W, 3)
            reconstruction = np.stack([to_uint8(frame) for frame in decoded])  # (T, H, W, 3)
            meta = sample_meta(sample)
            row = {
                "key": sample["__key__"],
                "modality": "video",
                "source": meta.get("source", ""),
                "resolution": f"{reference.shape[1]}x{reference.shape[2]}",
                "frames": len(reference),
            }
            pairs = list(zip(reference, reconstruction, strict=True))  # T frames, (H, W, 3) uint8 each
            if "psnr" in self.wants:
                row["psnr"] = float(np.mean([psnr.psnr_uint8(a, b) for a, b in pairs]))
            if "ssim" in self.wants:
                row["ssim"] = float(np.mean([ssim.ssim_uint8(a, b) for a, b in pairs]))
            self.rows.append(row)
            if len(references) < fvd_count:
                references.append(reference)
                outputs.append(reconstruction)
            if len(grid) < 2:
                grid += [list(reference[::4]), list(reconstruction[::4])]
        clips = [r for r in self.rows if r["modality"] == "video"]
        if not clips:
            return grid
        frames = sorted({r["frames"] for r in clips})
        common = dict(
            resize="none: the tokenizer's output at its input size",
            crop="none (ingest: short side → resolution, centre crop)",
            colour_range="uint8 [0, 255] RGB, decoded from the stored clip",
            samples=len(clips),
            frames=frames[0] if len(frames) == 1 else json.dumps(frames),
            latent=self.adapter.latent,
        )
        resolution = ", ".join(sorted({r["resolution"] for r in clips}))
        self.record_pixel_metrics("video_", clips, common, resolution, "per frame, mean over frames then clips; ")
        if "rfvd" in self.wants:
            if len(references) < 2:
                self.skipped["rfvd"] = f"needs at least 2 clips, got {len(references)}"
            else:
                accumulator = fvd.FVDAccumulator(model=shared_network("i3d"))
                keys = [r["key"] for r in clips][: len(references)]
                accumulator.update_features(
                    reference_features("rfvd", keys, lambda: fvd.video_features(accumulator.model, references)),
                    fvd.video_features(accumulator.model, outputs),
                )
                fields = accumulator.protocol()
                self.record(
                    "rfvd",
                    {"eval_rfvd": accumulator.compute()},
                    protocol(
                        **common | {"samples": len(references)},
                        feature_network=fields["network"],
                        feature_network_sha256=fields["weights_sha256"],
                        implementation=implementation_version(fvd.__file__),
                        stand_in=False,
                        network_input=fields["resize"] + "; " + fields["range"],
                        frames_rule=fields["frames"],
                        resolution=resolution,
                        note="few clips make rFVD noisy: compare only at equal counts",
                    ),
                )
        return grid

    # -- understanding -------------------------------------------------------------------------------------

    def understanding(self, images: list[dict], clips: list[dict]) -> None:
        wanted = [m for m in UNDERSTANDING_METRICS if m in self.wants]
        if not wanted:
            return
        if self.adapter.embed is None:
            for metric in wanted:
                self.skipped[metric] = f"tokenizer {self.adapter.name!r} has no pooled embedding head"
            return
        from atoken.train.model.text_encoder import cached_text_encoder

        text = cached_text_encoder(self.settings.text_encoder)
        image_embeddings = self._embed(images, "image")
        try:
            from atoken.evaluate.metrics.zero_shot import check_dims

            check_dims(image_embeddings, text(["a"]))
        except ValueError as exc:
            for metric in wanted:
                self.skipped[metric] = str(exc)
            return
        common = dict(
            resize="none",
            crop="none",
            colour_range="[-1, 1] float from uint8",
            frames=1,
            feature_network=f"text: {text.name}",
            feature_network_sha256=text.file_sha256,
            stand_in="text encoder is the MiniLM stand-in, not SigLIP2" if text.is_stand_in else False,
            split="val",
            embedding="the tokenizer's attention-pooled embedding (posterior of the encoder)",
        )
        if "zero_shot" in self.wants:
            self._zero_shot(images, image_embeddings, text, common)
        if "retrieval" in self.wants:
            self._retrieval("image", images, image_embeddings, text, common)
            if clips:
                self._retrieval("video", clips, self._embed(clips, "video"), text, common)

    def _embed(self, samples: list[dict], modality: str) -> torch.Tensor:
        from atoken.train.data import decode_media

        out = []
        size = self.settings.batch_size if modality == "image" else 4
        for start in range(0, len(samples), size):
            out.append(self.adapter.embed([decode_media(s) for s in samples[start : start + size]]))
        return torch.cat(out)  # (N, D)

    def _zero_shot(self, images: list[dict], embeddings: torch.Tensor, text, common: dict) -> None:
        from atoken.evaluate.metrics import zero_shot
        from atoken.preprocess import sources

        for source, classes_name in CLASS_SETS.items():
            classes = list(getattr(sources, classes_name))
            chosen = [i for i, s in enumerate(images) if sample_meta(s).get("source") == source]
            if not chosen:
                continue
            labels = [classes.index(sample_meta(images[i])["caption"]) for i in chosen]
            accuracy = zero_shot.zero_shot_accuracy(embeddings[chosen], labels, text(zero_shot.class_prompts(classes)))
            self.record(
                "zero_shot",
                {f"eval_zero_shot_{k}": v for k, v in accuracy.items()},
                protocol(
                    **common,
                    samples=len(chosen),
                    implementation=implementation_version(zero_shot.__file__),
                    dataset=f"{source} (val split)",
                    classes=len(classes),
                    prompt=zero_shot.PROMPT,
                    prompts_per_class=1,
                ),
            )
            return
        self.skipped["zero_shot"] = f"no validation images from a labelled set ({', '.join(CLASS_SETS)})"

    def _retrieval(self, modality: str, samples: list[dict], embeddings: torch.Tensor, text, common: dict) -> None:
        from atoken.evaluate.metrics import retrieval

        captions = [sample_meta(s).get("caption", "") for s in samples]
        chosen = [i for i, c in enumerate(captions) if c]
        try:
            recall, texts = retrieval.caption_retrieval(embeddings[chosen], [captions[i] for i in chosen], text)
        except ValueError as exc:
            self.skipped[f"{modality}_retrieval"] = str(exc)
            return
        values = {f"eval_{key.replace('item', modality).replace('R@', 'r')}": v for key, v in recall.items()}
        self.record(
            f"{modality}_retrieval",
            values,
            protocol(
                **common | ({"frames": "whole clip"} if modality == "video" else {}),
                samples=len(chosen),
                implementation=implementation_version(retrieval.__file__),
                texts=texts,
                relevance="caption identity (distinct captions are the texts)",
                ks=list(retrieval.KS),
            ),
        )

    # -- 3D ------------------------------------------------------------------------------------------------

    def objects(self, samples: list[dict]) -> None:
        if "render_3d" not in self.wants:
            return
        if not samples:
            self.skipped["render_3d"] = "no 3D validation samples (the run has no 3D ingest output)"
            return
        if self.adapter.decode_gaussians is None:
            self.skipped["render_3d"] = f"tokenizer {self.adapter.name!r} has no Gaussian head"
            return
        from atoken.evaluate.metrics import render3d
        from atoken.preprocess.objects import load_object_sample

        perceptual = self._perceptual()
        per_view: list[dict[str, float]] = []
        for sample in tqdm(samples, desc="evaluate: 3D", disable=not self.progress, leave=False):
            arrays = load_object_sample(sample["npz"])
            views = render3d.render_metrics(
                self.adapter.decode_gaussians, arrays, self.settings.held_out_views, perceptual=perceptual[1]
            )
            size = "x".join(str(n) for n in arrays["views"].shape[1:3])
            for view in views:
                row = {"key": f"{sample['__key__']}/view{view['view']}", "modality": "3d", "resolution": size}
                row |= {"psnr": view["psnr"], "ssim": view["ssim"], perceptual[0]: view["perceptual"]}
                self.rows.append(row)
            per_view += views
        names = ("psnr", "ssim", "perceptual")
        self.record(
            "render_3d",
            {f"eval_3d_{n if n != 'perceptual' else perceptual[0]}": np.mean([v[n] for v in per_view]) for n in names},
            protocol(
                resize="none: rendered at the stored views' size",
                crop="none",
                colour_range="uint8 [0, 255] RGB over a white background",
                samples=len(samples),
                frames=f"views {sorted({v['view'] for v in per_view})} of {self.settings.held_out_views}",
                **{k: v for k, v in self._perceptual_fields(perceptual[1]).items() if k != "implementation"},
                implementation=implementation_version(render3d.__file__),
                renderer=render3d.RENDERER,
                latent=self.adapter.latent,
                average="mean over views, then assets",
            ),
        )


def run_suite(
    adapter: TokenizerAdapter,
    settings: SuiteSettings,
    images: list[dict],
    clips: list[dict] = (),
    objects: list[dict] = (),
    progress: bool = False,
) -> SuiteReport:
    """Score one tokenizer on shard samples (as `train.data.read_shard` returns them)."""
    suite = Suite(adapter, settings, progress)
    grid, worst = suite.images(list(images))
    video_grid = suite.clips(list(clips)) if clips else []
    if not clips and "rfvd" in suite.wants:
        suite.skipped["rfvd"] = "no video clips (the run has no video ingest output)"
    suite.understanding(list(images), list(clips))
    suite.objects(list(objects))
    return SuiteReport(
        suite.summary, suite.protocols, suite.metric_protocols, suite.rows, grid, worst, video_grid, suite.skipped
    )
