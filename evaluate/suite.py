"""The evaluation suite: every metric the run asks for, on held-out images, clips and 3D assets, through one
tokenizer adapter, each number with its protocol.

    image shards ─► reconstruct ─► PSNR, SSIM, LPIPS (or the declared stand-in) per image; rFID over the set
    clip shards  ─► reconstruct ─► PSNR, SSIM per frame; rFVD over the clips
    captions     ─► frozen text encoder ─► zero-shot accuracy (class names), text↔image/video R@1/5/10
    3D samples   ─► Gaussians ─► rendered at held-out views ─► PSNR, SSIM, LPIPS

A plain function (`run_suite`); the pipeline's evaluate stage and `atoken eval` run it as a Ray task.

Memory stays bounded at the spec's 50k samples: samples stream through in batches (the stage reads a shard at
a time), Fréchet statistics are float64 running sums updated per batch, per-sample rows are kept as
compressed parquet chunks (RowLog), only the grid and the worst k images are held, and retrieval ranks a block
of queries at a time. What grows with the sample count is one pooled embedding per sample (for zero-shot and
retrieval) and ~32 bytes of data identity. A metric that fails is recorded with its reason and the others go on.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import io
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from atoken.evaluate.adapter import TokenizerAdapter
from atoken.evaluate.protocols import DataIdentity, implementation_version, protocol
from atoken.evaluate.reconstruction import resize_short_side_crop, short_side_resize_description, to_uint8

log = logging.getLogger(__name__)

IMAGE_METRICS = ("psnr", "ssim", "lpips", "rfid")
VIDEO_METRICS = ("rfvd",)  # video PSNR/SSIM/LPIPS follow psnr/ssim/lpips whenever clips are given
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
    held_out_views: list[int] | None = None  # which of each 3D sample's evaluation views (None: all of them)
    fvd_preset: str = "tokenbench"  # evaluate/metrics/fvd.py PRESETS: "tokenbench" or "stylegan-v"
    i3d_torchscript: str | None = None  # StyleGAN-V's i3d_torchscript.pt, the published tables' detector
    batch_size: int = 32
    # Every image metric's input (and the pooled embedding's): short side → image_size, centre crop, before the
    # tokenizer (the published ImageNet protocol at 256). None: the validation shards' own size.
    image_size: int | None = None


class RowLog:
    """Per-sample rows (key, modality, source, resolution, per-sample metrics), kept as zstd parquet chunks of
    CHUNK_ROWS rows: 50k samples' rows are a few MB that travel with the report from a Ray task to the driver,
    where as Python dicts they were ~1 KB each. Running sums per (modality, resolution, source) give every mean
    without reading the rows back."""

    CHUNK_ROWS = 4096

    def __init__(self, rows: Iterable[dict] = ()):
        self.chunks: list[bytes] = []
        self.pending: list[dict] = []
        self.count = 0
        # (modality, resolution, source) → {"count": rows, metric: [sum, rows with it]}
        self.groups: dict[tuple[str, str, str], dict[str, Any]] = {}
        for row in rows:
            self.append(row)

    def append(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        self.count += 1
        group = self.groups.setdefault((row["modality"], str(row.get("resolution", "-")), row.get("source", "")),
                                       {"count": 0})
        group["count"] += 1
        for name, value in row.items():
            if isinstance(value, float):
                total = group.setdefault(name, [0.0, 0])
                total[0] += value
                total[1] += 1
        if len(self.pending) >= self.CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(self._table(self.pending), buffer, compression="zstd")
        self.chunks.append(buffer.getvalue())
        self.pending = []

    def tables(self) -> Iterator:
        """The rows as pyarrow tables, a chunk at a time (columns may differ between chunks)."""
        import pyarrow.parquet as pq

        for chunk in self.chunks:
            yield pq.read_table(io.BytesIO(chunk))
        if self.pending:
            yield self._table(self.pending)

    @staticmethod
    def _table(rows: list[dict]):
        """Rows → a table over every column any of them has (from_pylist would take the first row's alone)."""
        import pyarrow as pa

        names = list(dict.fromkeys(name for row in rows for name in row))
        return pa.table({name: [row.get(name) for row in rows] for name in names})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for table in self.tables():
            for row in table.to_pylist():
                yield {k: v for k, v in row.items() if v is not None}

    def __len__(self) -> int:
        return self.count

    def mean(self, modality: str, metric: str) -> float:
        """The mean of `metric` over the rows of `modality` that have it."""
        total, count = 0.0, 0
        for group, totals in self.groups.items():
            if group[0] == modality and metric in totals:
                total += totals[metric][0]
                count += totals[metric][1]
        return total / count if count else float("nan")


@dataclass
class SuiteReport:
    summary: dict[str, float]  # eval_<metric>: the numbers, as MLflow metrics
    protocols: dict[str, dict[str, Any]]  # metric → its protocol
    metric_protocols: dict[str, str]  # summary key → the metric whose protocol it was measured under
    rows: RowLog | list  # one per image / clip / 3D view: key, modality, resolution, per-sample metrics
    grid: list[list[np.ndarray]]  # [originals, reconstructions], (H, W, 3) uint8 each
    worst: list[dict[str, Any]]  # the worst-k images by PSNR: key, psnr, original, reconstruction
    video_grid: list[list[np.ndarray]] = field(default_factory=list)  # per clip: original / reconstructed frames
    skipped: dict[str, str] = field(default_factory=dict)  # metric → why it did not run (or some samples not)

    def __post_init__(self):
        if not isinstance(self.rows, RowLog):
            self.rows = RowLog(self.rows)


@functools.lru_cache(maxsize=8)
def shared_network(kind: str, path: str | None = None):
    """One copy per process of each frozen feature network: a baseline scored after the tokenizer reuses it."""
    from atoken.evaluate.metrics import fid, i3d, lpips

    device = "cuda" if torch.cuda.is_available() else "cpu"  # at 50k samples the networks are most of the time
    if kind == "inception":
        return fid.InceptionFeatures(device=device)
    if kind == "i3d":
        return i3d.load_i3d(i3d.default_i3d_path()).to(device)
    if kind == "i3d_torchscript":
        return i3d.TorchscriptI3D(path).to(device)
    return (lpips.LPIPS(path) if kind == "lpips" else lpips.PerceptualStandIn()).to(device)


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
        device = next(network.parameters(), torch.empty(0)).device
        x, y = x.to(device), y.to(device)
        for index, value in zip(indices, network(x, y).tolist(), strict=True):
            out[index] = float(value)
    return out


def crop_to_multiple(media: torch.Tensor, multiple: int) -> torch.Tensor:
    """(T, 3, H, W) → its centre (T, 3, H', W') with H', W' the largest multiples of `multiple` (the same centre
    as train/model/tokens.py patchify_video keeps); unchanged when already multiples."""
    height, width = media.shape[-2:]
    crop_h, crop_w = height // multiple * multiple, width // multiple * multiple
    if crop_h == 0 or crop_w == 0:
        raise ValueError(f"a {height}x{width} image is smaller than the tokenizer's {multiple}-px patch")
    if (crop_h, crop_w) == (height, width):
        return media
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return media[..., top:top + crop_h, left:left + crop_w]  # (T, 3, H', W')


def sample_meta(sample: dict) -> dict[str, Any]:
    return json.loads(sample["json"]) if "json" in sample else {}


def chain(*parts) -> str:
    """implementation_version of a metric's chain: module files, or functions by their defining module."""
    import inspect

    return implementation_version(*[part if isinstance(part, str) else inspect.getfile(part) for part in parts])


def reiterable(samples: Iterable) -> bool:
    """A list or a ShardSamples can be read twice; a generator cannot."""
    return iter(samples) is not samples


# The last reference-side Fréchet statistics of each metric, by the identity of the data they came from. A
# second tokenizer scored in the same process (the baseline) on the same samples skips the reference network's
# pass: it assumes the same data, checks the identity at the end, and reads the samples again only if it differs.
REFERENCE_STATS: dict[str, tuple[str, Any]] = {}


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
        self.rows = RowLog()
        self.skipped: dict[str, str] = {}
        self.failed: set[str] = set()
        self.sample_failures: dict[str, list] = {}  # modality → [count, the first sample's key and reason]
        # per modality: what each sample was, its pooled embedding (understanding) and (source, caption)
        self.identity = {"image": DataIdentity(), "video": DataIdentity(), "3d": DataIdentity()}
        self.embeddings: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
        self.meta: dict[str, list[tuple[str, str]]] = {"image": [], "video": []}
        # per modality: whether some sample was cropped to the tokenizer's multiple / was stored non-square (native
        # shards; judged before evaluate.image_size's resize)
        self.cropped = {"image": False, "video": False}
        self.non_square = {"image": False, "video": False}

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def on(self, name: str, wanted: str | None = None) -> bool:
        """Whether `name` (e.g. "video_psnr") is asked for (as `wanted`, default the name) and has not failed."""
        return (wanted or name) in self.wants and name not in self.failed

    @contextlib.contextmanager
    def guard(self, *names: str):
        """A failure inside is recorded against `names` with its reason (one line) and the suite goes on: one
        failing metric never loses the others' numbers."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - any metric's failure is recorded, never fatal to the others
            reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            log.warning("evaluation: %s %s", "/".join(names), reason)
            for name in names:
                self.failed.add(name)
                self.skipped[name] = reason

    def fit(self, media: torch.Tensor, modality: str) -> torch.Tensor:
        """(T, 3, H, W) → the centre crop the tokenizer codes (sides multiples of adapter.multiple), noted for the
        protocols: native-aspect shards' sides need not be patch multiples, and the AToken patchify would crop
        (and decode) a smaller image than the reference otherwise."""
        cropped = crop_to_multiple(media, self.adapter.multiple)
        self.cropped[modality] |= cropped.shape != media.shape
        self.non_square[modality] |= media.shape[-1] != media.shape[-2]
        return cropped

    def prepare_image(self, sample: dict) -> torch.Tensor:
        """A validation image sample → the (1, 3, H, W) every image metric scores and the tokenizer codes: decoded,
        resized on its short side and centre-cropped to evaluate.image_size (when set), on the patch grid."""
        from atoken.train.data import decode_image

        image = decode_image(sample)[None]  # (1, 3, H, W) as stored
        if self.settings.image_size is None:
            return self.fit(image, "image")
        self.non_square["image"] |= image.shape[-1] != image.shape[-2]
        return self.fit(resize_short_side_crop(image, self.settings.image_size), "image")  # (1, 3, s', s')

    def preprocess_field(self) -> str:
        """The image protocols' `preprocess`: what every image went through before the tokenizer and the metrics."""
        if self.settings.image_size is None:
            return "none: the validation shards' own size"
        return short_side_resize_description(self.settings.image_size)

    def crop_field(self, modality: str) -> str:
        """The protocols' `crop`: what ingest did to the samples' sizes and what the suite cut off."""
        if self.cropped[modality]:
            return (f"centre crop of each side down to a multiple of {self.adapter.multiple} px (the tokenizer's "
                    "patch grid); ingest: native aspect, long side capped")
        if self.non_square[modality]:
            return "none (ingest: native aspect, long side capped)"
        return "none (ingest: short side → resolution, centre crop)"

    def sample_failed(self, modality: str, sample: dict, exc: Exception) -> None:
        """A sample no metric could score: counted under `<modality> samples` with the first key and reason."""
        entry = self.sample_failures.setdefault(modality, [0, f"{sample.get('__key__')}: {type(exc).__name__}: "
                                                              f"{(str(exc).splitlines() or [''])[0]}"[:300]])
        entry[0] += 1
        self.skipped[f"{modality} samples"] = f"{entry[0]} not scored (first: {entry[1]})"
        log.warning("evaluation: %s sample %s not scored: %s", modality, sample.get("__key__"), exc)

    def record(self, metric: str, values: dict[str, float], fields: dict[str, Any]) -> None:
        self.protocols[metric] = fields
        for key, value in values.items():
            self.summary[key] = float(value)
            self.metric_protocols[key] = metric

    def record_pixel_metrics(self, prefix: str, modality: str, common: dict[str, Any], resolution: str,
                             definitions: dict[str, str], chains: dict[str, str]) -> None:
        """PSNR and SSIM (those wanted and not failed): the mean of the rows' values, under `prefix` ("video_")."""
        for name in ("psnr", "ssim"):
            if self.on(f"{prefix}{name}", name):
                self.record(
                    f"{prefix}{name}",
                    {f"eval_{prefix}{name}": self.rows.mean(modality, name)},
                    protocol(
                        **common,
                        feature_network="none",
                        feature_network_sha256="none",
                        implementation=chains[name],
                        stand_in=False,
                        definition=definitions[name],
                        resolution=resolution,
                        split="val",
                    ),
                )

    def to_device(self, media: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m.to(self.adapter.device) for m in media]

    def embed(self, modality: str, media: list[torch.Tensor], samples: list[dict]) -> None:
        """Pooled embeddings (kept for zero-shot and retrieval) and each sample's (source, caption)."""
        wanted = [m for m in UNDERSTANDING_METRICS if self.on(m)]
        if not wanted or self.adapter.embed is None:
            return
        with self.guard(*wanted):
            self.embeddings[modality].append(self.adapter.embed(self.to_device(media)).float().cpu())  # (b, D)
            self.meta[modality] += [(sample_meta(s).get("source", ""), sample_meta(s).get("caption", ""))
                                    for s in samples]

    # -- images --------------------------------------------------------------------------------------------

    def images(self, samples: Iterable[dict]) -> tuple[list[list[np.ndarray]], list[dict[str, Any]]]:
        from atoken.evaluate.metrics import fid

        self.perceptual = None
        if "lpips" in self.wants:
            with self.guard("lpips"):
                self.perceptual = self._perceptual()
        self.fid_limit = self.settings.fid_samples if self.settings.fid_samples is not None else float("inf")
        self.fid_seen = 0
        self.fid_speculate = False
        if self.on("rfid"):
            with self.guard("rfid"):
                self.inception = shared_network("inception")
                self.fid_reference = fid.FrechetStats(fid.FEATURE_DIM)
                self.fid_reconstructed = fid.FrechetStats(fid.FEATURE_DIM)
                self.fid_speculate = reiterable(samples) and "rfid" in REFERENCE_STATS
        self.grid: list[list[np.ndarray]] = [[], []]
        self.worst: list[tuple[float, int, dict]] = []  # a max-heap on -psnr keeps the k lowest PSNRs
        batch: list[dict] = []
        stream = itertools.islice(samples, self.settings.max_samples)
        for sample in tqdm(stream, desc="evaluate: images", unit="image", disable=not self.progress, leave=False):
            batch.append(sample)
            if len(batch) == self.settings.batch_size:
                self._image_batch(batch)
                batch = []
        if batch:
            self._image_batch(batch)
        count = len(self.identity["image"])
        if not count:
            raise ValueError("evaluation: the validation shards hold no images")
        resolution = ", ".join(sorted({group[1] for group in self.rows.groups if group[0] == "image"}))
        common = dict(
            resize="none: the tokenizer's output at its input size",
            preprocess=self.preprocess_field(),
            crop=self.crop_field("image"),
            colour_range="uint8 [0, 255] RGB",
            samples=count,
            frames=1,
            latent=self.adapter.latent,
            data=self.identity["image"].digest(),
        )
        self._record_image_metrics(common, resolution)
        if self.on("rfid"):
            with self.guard("rfid"):
                self._rfid(samples, common, resolution)
        return self.grid, [entry[2] for entry in sorted(self.worst, key=lambda e: -e[0])]

    def _image_batch(self, chunk: list[dict]) -> None:
        from atoken.evaluate.metrics import psnr, ssim

        media = [self.prepare_image(s) for s in chunk]  # each (1, 3, H, W)
        decoded = [m.cpu() for m in self.adapter.reconstruct(self.to_device(media))]
        pairs = [(to_uint8(original[0]), to_uint8(output[0])) for original, output in zip(media, decoded, strict=True)]
        distances = None
        if self.perceptual is not None and self.on("lpips"):
            with self.guard("lpips"):
                distances = perceptual_distances(self.perceptual[1], pairs)
        fid_pairs = []
        for index, (sample, (reference, reconstruction)) in enumerate(zip(chunk, pairs, strict=True)):
            self.identity["image"].add(sample)
            row = {"key": sample["__key__"], "modality": "image", "source": sample_meta(sample).get("source", ""),
                   "resolution": f"{reference.shape[0]}x{reference.shape[1]}"}
            for name, module, score in (("psnr", psnr, "psnr_uint8"), ("ssim", ssim, "ssim_uint8")):
                if self.on(name):
                    with self.guard(name):
                        row[name] = getattr(module, score)(reference, reconstruction)
            if distances is not None:
                row[self.perceptual[0]] = distances[index]
            self.rows.append(row)
            if self.fid_seen < self.fid_limit:
                fid_pairs.append((reference, reconstruction))
                self.fid_seen += 1
            if len(self.grid[0]) < self.settings.grid_samples:
                self.grid[0].append(reference)
                self.grid[1].append(reconstruction)
            if "psnr" in row:
                kept = {"key": row["key"], "psnr": row["psnr"], "original": reference, "reconstruction": reconstruction}
                entry = (-row["psnr"], len(self.rows), kept)
                heapq.heappush(self.worst, entry)
                if len(self.worst) > self.settings.worst_k:
                    heapq.heappop(self.worst)  # drops the highest PSNR kept so far
        if fid_pairs and self.on("rfid"):
            with self.guard("rfid"):
                if not self.fid_speculate:
                    self.fid_reference.update(self.inception.features([p[0] for p in fid_pairs]))
                self.fid_reconstructed.update(self.inception.features([p[1] for p in fid_pairs]))
        self.embed("image", media, chunk)

    def _record_image_metrics(self, common: dict[str, Any], resolution: str) -> None:
        from atoken.evaluate.metrics import lpips, psnr, ssim
        from atoken.train.data import decode_image

        chains = {"psnr": chain(psnr.__file__, to_uint8, decode_image),
                  "ssim": chain(ssim.__file__, to_uint8, decode_image)}
        self.record_pixel_metrics("", "image", common, resolution, {"psnr": psnr.PROTOCOL, "ssim": ssim.PROTOCOL},
                                  chains)
        if self.perceptual is not None and self.on("lpips"):
            name, network = self.perceptual
            fields = self._perceptual_fields(network) | {
                "implementation": chain(lpips.__file__, to_uint8, decode_image, perceptual_distances)}
            self.record(name, {f"eval_{name}": self.rows.mean("image", name)},
                        protocol(**common, **fields, resolution=resolution, split="val"))

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
            implementation=chain(lpips.__file__),
            stand_in="EfficientNet-Lite0 features, NOT LPIPS" if stand_in else False,
            # file paths differ between machines and environments; their sha256 fields identify the files
            definition={k: v for k, v in fields.items() if k not in ("weights", "backbone_file", "heads")},
        )

    def _rfid(self, samples: Iterable[dict], common: dict, resolution: str) -> None:
        from atoken.evaluate.metrics import fid, frechet
        from atoken.train.data import decode_image

        count = self.fid_reconstructed.count
        if count < 2:
            self.skipped["rfid"] = f"needs at least 2 images, got {count}"
            return
        data = self.identity["image"].digest(count)
        # The reference side is the images as resized and cropped for this tokenizer: another evaluate.image_size
        # or patch grid, other statistics.
        cache_key = f"{data} | {self.preprocess_field()} | {self.crop_field('image')}"
        reference = self.fid_reference
        if self.fid_speculate:
            cached_key, cached = REFERENCE_STATS["rfid"]
            if cached_key == cache_key:
                reference = cached
            else:  # other samples than the cached statistics': read them again for the reference side
                reference = fid.FrechetStats(fid.FEATURE_DIM)
                stream = itertools.islice(samples, count)
                while batch := [to_uint8(self.prepare_image(s)[0])
                                for s in itertools.islice(stream, self.settings.batch_size)]:
                    reference.update(self.inception.features(batch))
        REFERENCE_STATS["rfid"] = (cache_key, reference)
        fields = self.inception.protocol
        self.record(
            "rfid",
            {"eval_rfid": frechet.frechet_from_stats(reference, self.fid_reconstructed)},
            protocol(
                **common | {"samples": count, "data": data},
                feature_network=fields["network"],
                feature_network_sha256=fields["network_sha256"],
                implementation=chain(fid.__file__, frechet.__file__, to_uint8, decode_image),
                stand_in=False,
                network_input=f"centre square (a non-square image cropped to its short side, never squashed), "
                              f"TF1 bilinear resize to {fid.SIZE}, (x - 128) / 128",
                resolution=resolution,
                feature_dim=fid.FEATURE_DIM,
                distance="Fréchet distance from float64 running sums (unbiased covariance); Tr((Σ1Σ2)^½) from two "
                         "symmetric eigendecompositions, not scipy's sqrtm",
                note="few samples make rFID noisy and biased upwards: compare only at equal counts",
            ),
        )

    # -- clips ---------------------------------------------------------------------------------------------

    def clips(self, samples: Iterable[dict]) -> list[list[np.ndarray]]:
        from atoken.evaluate.metrics import fvd, psnr, ssim, video
        from atoken.preprocess.videos import decode_clip
        from atoken.train.data import decode_media

        fvd_limit = self.settings.fvd_clips if self.settings.fvd_clips is not None else float("inf")
        fvd_used, too_short, frame_counts, fvd_identity, fvd_frames = 0, {}, set(), DataIdentity(), set()
        perceptual = None
        if self.on("video_lpips", "lpips"):
            with self.guard("video_lpips"):
                perceptual = self._perceptual()
        if self.on("rfvd"):
            with self.guard("rfvd"):
                network = (shared_network("i3d_torchscript", self.settings.i3d_torchscript)
                           if self.settings.i3d_torchscript else shared_network("i3d"))
                accumulator = fvd.FVDAccumulator(model=network, preset=self.settings.fvd_preset)
        grid: list[list[np.ndarray]] = []
        pending: list[tuple[torch.Tensor, dict]] = []
        for sample in tqdm(samples, desc="evaluate: clips", unit="clip", disable=not self.progress, leave=False):
            try:  # one clip that cannot be decoded or coded is counted with its reason; the others go on
                clip = self.fit(decode_media(sample), "video")  # (T, 3, H, W)
                (decoded,) = self.adapter.reconstruct(self.to_device([clip]))
                reference = np.stack([to_uint8(frame) for frame in clip])  # (T, H, W, 3)
                reconstruction = np.stack([to_uint8(frame.cpu()) for frame in decoded])  # (T, H, W, 3)
            except Exception as exc:  # noqa: BLE001 - recorded, never silent
                self.sample_failed("video", sample, exc)
                continue
            self.identity["video"].add(sample)
            frame_counts.add(len(reference))
            row = {"key": sample["__key__"], "modality": "video", "source": sample_meta(sample).get("source", ""),
                   "resolution": f"{reference.shape[1]}x{reference.shape[2]}", "frames": len(reference)}
            if self.on("video_psnr", "psnr"):
                with self.guard("video_psnr"):
                    row["psnr"] = video.video_psnr(reference, reconstruction)  # one MSE per clip, as TokenBench
            if self.on("video_ssim", "ssim"):
                with self.guard("video_ssim"):
                    row["ssim"] = video.video_ssim(reference, reconstruction)
            if perceptual is not None and self.on("video_lpips", "lpips"):
                with self.guard("video_lpips"):
                    row[perceptual[0]] = video.video_lpips(reference, reconstruction, perceptual[1])
            self.rows.append(row)
            if self.on("rfvd") and fvd_used < fvd_limit:
                reason = fvd.too_short(len(reference), self.settings.fvd_preset)
                if reason:
                    too_short[reason] = too_short.get(reason, 0) + 1
                else:
                    with self.guard("rfvd"):
                        accumulator.update([reference], [reconstruction])
                        fvd_used += 1
                        fvd_identity.add(sample)
                        fvd_frames.add(len(reference))
            if len(grid) < 2:
                grid += [list(reference[::4]), list(reconstruction[::4])]
            pending.append((clip, sample))
            if len(pending) == 4:
                self.embed("video", [c for c, _ in pending], [s for _, s in pending])
                pending = []
        if pending:
            self.embed("video", [c for c, _ in pending], [s for _, s in pending])
        count = len(self.identity["video"])
        if not count:
            return grid
        frames = sorted(frame_counts)
        resolution = ", ".join(sorted({group[1] for group in self.rows.groups if group[0] == "video"}))
        common = dict(
            resize="none: the tokenizer's output at its input size",
            crop=self.crop_field("video"),
            colour_range="uint8 [0, 255] RGB, decoded from the stored clip",
            samples=count,
            frames=frames[0] if len(frames) == 1 else json.dumps(frames),
            latent=self.adapter.latent,
            data=self.identity["video"].digest(),
        )
        chains = {name: chain(video.__file__, module.__file__, to_uint8, decode_media, decode_clip)
                  for name, module in (("psnr", psnr), ("ssim", ssim))}
        definitions = {"psnr": video.PSNR_PROTOCOL, "ssim": video.SSIM_PROTOCOL}
        self.record_pixel_metrics("video_", "video", common, resolution, definitions, chains)
        if perceptual is not None and self.on("video_lpips", "lpips"):
            from atoken.evaluate.metrics import lpips

            name, network = perceptual
            fields = self._perceptual_fields(network) | {
                "implementation": chain(video.__file__, lpips.__file__, to_uint8, decode_media, decode_clip),
                "definition": video.LPIPS_PROTOCOL}
            self.record(f"video_{name}", {f"eval_video_{name}": self.rows.mean("video", name)},
                        protocol(**common, **fields, resolution=resolution, split="val"))
        if too_short:
            self.skipped["rfvd (some clips)"] = "; ".join(f"{n} clips: {why}" for why, n in sorted(too_short.items()))
        if self.on("rfvd"):
            if fvd_used < 2:
                self.skipped["rfvd"] = f"needs at least 2 clips long enough for I3D, got {fvd_used}"
                return grid
            from atoken.evaluate.metrics import frechet, i3d

            with self.guard("rfvd"):
                fields = accumulator.protocol()
                self.record(
                    "rfvd",
                    {"eval_rfvd": accumulator.compute()},
                    protocol(
                        **common | {"samples": fvd_used, "data": fvd_identity.digest(), "frames": (
                            min(fvd_frames) if len(fvd_frames) == 1 else json.dumps(sorted(fvd_frames)))},
                        feature_network=fields["network"],
                        feature_network_sha256=fields["weights_sha256"],
                        implementation=chain(fvd.__file__, i3d.__file__, frechet.__file__, to_uint8, decode_media,
                                             decode_clip),
                        stand_in=False,
                        network_input=fields["resize"] + "; " + fields["range"],
                        frames_rule=fields["frames"],
                        **{k: fields[k] for k in ("preset", "reference", "detector_call", "covariance", "distance",
                                                  "clips_required")},
                        **{k: fields[k] for k in ("unverified", "meets_clips_required") if k in fields},
                        resolution=resolution,
                        note="few clips make rFVD noisy: compare only at equal counts",
                    ),
                )
        return grid

    # -- understanding -------------------------------------------------------------------------------------

    def understanding(self) -> None:
        wanted = [m for m in UNDERSTANDING_METRICS if self.on(m)]
        if not wanted:
            return
        if self.adapter.embed is None:
            for metric in wanted:
                self.skipped[metric] = f"tokenizer {self.adapter.name!r} has no pooled embedding head"
            return
        from atoken.train.model.text_encoder import cached_text_encoder

        with self.guard(*wanted):
            text = cached_text_encoder(self.settings.text_encoder)
            image_embeddings = torch.cat(self.embeddings["image"])  # (N, D)
            from atoken.evaluate.metrics.zero_shot import check_dims

            try:
                check_dims(image_embeddings, text(["a"]))
            except ValueError as exc:
                for metric in wanted:
                    self.skipped[metric] = str(exc)
                return
        if not all(self.on(m) for m in wanted):
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
        if self.on("zero_shot"):
            with self.guard("zero_shot"):
                self._zero_shot(image_embeddings, text, common)
        if self.on("retrieval"):
            with self.guard("image_retrieval"):
                self._retrieval("image", image_embeddings, text, common)
            if self.embeddings["video"]:
                with self.guard("video_retrieval"):
                    self._retrieval("video", torch.cat(self.embeddings["video"]), text, common)

    def _zero_shot(self, embeddings: torch.Tensor, text, common: dict) -> None:
        from atoken.evaluate.metrics import zero_shot
        from atoken.preprocess import sources

        meta = self.meta["image"]
        for source, classes_name in CLASS_SETS.items():
            classes = list(getattr(sources, classes_name))
            chosen = [i for i, (s, _) in enumerate(meta) if s == source]
            if not chosen:
                continue
            labels = [classes.index(meta[i][1]) for i in chosen]
            accuracy = zero_shot.zero_shot_accuracy(embeddings[chosen], labels, text(zero_shot.class_prompts(classes)))
            self.record(
                "zero_shot",
                {f"eval_zero_shot_{k}": v for k, v in accuracy.items()},
                protocol(
                    **common,
                    preprocess=self.preprocess_field(),
                    samples=len(chosen),
                    data=self.identity["image"].subset(chosen).digest(),
                    implementation=chain(zero_shot.__file__),
                    dataset=f"{source} (val split)",
                    classes=len(classes),
                    prompt=zero_shot.PROMPT,
                    prompts_per_class=1,
                ),
            )
            return
        self.skipped["zero_shot"] = f"no validation images from a labelled set ({', '.join(CLASS_SETS)})"

    def _retrieval(self, modality: str, embeddings: torch.Tensor, text, common: dict) -> None:
        from atoken.evaluate.metrics import retrieval

        captions = [caption for _, caption in self.meta[modality]]
        chosen = [i for i, c in enumerate(captions) if c]
        try:
            recall, texts = retrieval.caption_retrieval(embeddings[chosen], [captions[i] for i in chosen], text)
        except ValueError as exc:
            self.skipped[f"{modality}_retrieval"] = str(exc)
            return
        values = {f"eval_{key.replace('item', modality).replace('R@', 'r')}": v for key, v in recall.items()}
        own = {"frames": "whole clip"} if modality == "video" else {"preprocess": self.preprocess_field()}
        self.record(
            f"{modality}_retrieval",
            values,
            protocol(
                **common | own,
                samples=len(chosen),
                data=self.identity[modality].subset(chosen).digest(),
                implementation=chain(retrieval.__file__),
                texts=texts,
                relevance="caption identity (distinct captions are the texts)",
                ks=list(retrieval.KS),
            ),
        )

    # -- 3D ------------------------------------------------------------------------------------------------

    def objects(self, samples: Iterable[dict]) -> None:
        if "render_3d" not in self.wants:
            return
        stream = iter(samples)
        first = next(stream, None)
        if first is None:
            self.skipped["render_3d"] = "no 3D validation samples (the run has no 3D ingest output)"
            return
        samples = itertools.chain([first], stream)
        if self.adapter.decode_gaussians is None:
            self.skipped["render_3d"] = f"tokenizer {self.adapter.name!r} has no Gaussian head"
            return
        from atoken.evaluate.metrics import render3d
        from atoken.preprocess.objects import load_object_sample

        # Samples ingested before issue 17 hold input views only: scoring them would score the features' own views.
        reason = render3d.unscorable(load_object_sample(first["npz"]))
        if reason is not None:
            self.skipped["render_3d"] = reason
            return
        with self.guard("render_3d"):
            self._objects(samples)

    def _objects(self, samples: Iterable[dict]) -> None:
        from atoken.evaluate.metrics import render3d
        from atoken.preprocess.objects import load_object_sample

        perceptual = None
        with self.guard("render_3d perceptual"):  # without it, PSNR and SSIM are still scored
            perceptual = self._perceptual()
        per_view: list[dict[str, float]] = []
        eval_views = 0
        for sample in tqdm(samples, desc="evaluate: 3D", disable=not self.progress, leave=False):
            try:  # one asset that cannot be scored (no evaluation views, a bad file) is counted with its reason
                arrays = load_object_sample(sample["npz"])
                reason = render3d.unscorable(arrays)
                if reason is not None:
                    raise ValueError(reason)
                views = render3d.render_metrics(self.adapter.decode_gaussians, arrays, self.settings.held_out_views,
                                                perceptual=perceptual[1] if perceptual else None)
            except Exception as exc:  # noqa: BLE001 - recorded, never silent
                self.sample_failed("3d", sample, exc)
                continue
            self.identity["3d"].add(sample)
            eval_views = len(arrays["eval_views"])
            size = "x".join(str(n) for n in arrays["eval_views"].shape[1:3])
            for view in views:
                row = {"key": f"{sample['__key__']}/eval_view{view['view']}", "modality": "3d", "resolution": size,
                       "psnr": view["psnr"], "ssim": view["ssim"]}
                if perceptual:
                    row[perceptual[0]] = view["perceptual"]
                self.rows.append(row)
            per_view += [{k: view[k] for k in ("view", "psnr", "ssim", "perceptual") if k in view} for view in views]
        if not per_view:
            self.skipped["render_3d"] = f"no 3D sample could be scored ({self.skipped.get('3d samples', '')})"
            return
        names = ("psnr", "ssim", "perceptual") if perceptual else ("psnr", "ssim")
        network = ({k: v for k, v in self._perceptual_fields(perceptual[1]).items() if k != "implementation"}
                   if perceptual else dict(feature_network="none", feature_network_sha256="none", stand_in=False))
        self.record(
            "render_3d",
            {f"eval_3d_{n if n != 'perceptual' else perceptual[0]}": np.mean([v[n] for v in per_view]) for n in names},
            protocol(
                resize="none: rendered at the stored views' size",
                crop="none",
                colour_range="uint8 [0, 255] RGB over a white background",
                samples=len(self.identity["3d"]),
                data=self.identity["3d"].digest(),
                frames=render3d.frames_protocol((v["view"] for v in per_view), eval_views),
                views=render3d.HELD_OUT,
                **network,
                implementation=chain(render3d.__file__, load_object_sample),
                renderer=render3d.RENDERER,
                latent=self.adapter.latent,
                average="mean over views, then assets",
            ),
        )


def run_suite(
    adapter: TokenizerAdapter,
    settings: SuiteSettings,
    images: Iterable[dict],
    clips: Iterable[dict] = (),
    objects: Iterable[dict] = (),
    progress: bool = False,
) -> SuiteReport:
    """Score one tokenizer on shard samples (as `train.data.read_shard` returns them), streamed: lists, or
    iterables such as ShardSamples that read a shard at a time (re-iterable where rFID may need a second look)."""
    suite = Suite(adapter, settings, progress)
    grid, worst = suite.images(images)
    video_grid = suite.clips(clips)
    if not len(suite.identity["video"]) and "rfvd" in suite.wants and "rfvd" not in suite.skipped:
        suite.skipped["rfvd"] = "no video clips (the run has no video ingest output)"
    suite.understanding()
    suite.objects(objects)
    return SuiteReport(
        suite.summary, suite.protocols, suite.metric_protocols, suite.rows, grid, worst, video_grid, suite.skipped
    )
