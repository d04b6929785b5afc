"""One image in, one training sample out: decode, orient, convert, resize (square crop or native aspect), encode.

Two modes (ingest.resolution / ingest.max_resolution, pipeline/config.py IngestSection):
- square: the short side resized to `resolution`, centre-cropped square (the quickstart; batches of one size);
- native: aspect kept, no crop, the long (or short) side capped at `max_resolution`, never upscaled; sides need
  not be multiples of the patch, since the trainer resizes each sample per its resolution schedule (spec, Table 2:
  64→512 px, then up to 2048) and the evaluation crops to its tokenizer's patch grid.
Encoded as PNG (lossless), or JPEG/WebP at a stated quality for training shards (ingest.encoding, ingest.quality);
preprocess/writer.py keeps the validation split in PNG whatever the training encoding.

A plain function (no Ray): the job in preprocess/job.py decides how it is distributed.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps


class ItemError(ValueError):
    """This item cannot become a sample; the job records it and goes on."""


ENCODINGS = ("png", "jpg", "webp")  # the members train/data.py decode_image reads
# The formats decoded: those of the suffixes the image sources list (preprocess/sources.py IMAGE_SUFFIXES; a
# camera's multi-picture JPEG, PIL's MPO, opens as JPEG). PIL would open any of its ~40 formats by their bytes,
# whatever the suffix, and some are slow enough to undo the pixel cap as a time bound: JPEG 2000 decodes at ~0.4 us
# a pixel (34 s at the default max_pixels, where these take at most 5.4 s: benchmarks/bench_decode_limits.py), and
# EPS runs Ghostscript, a subprocess with no time limit.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
RESIZE_SIDES = ("long", "short")


@dataclass(frozen=True)
class ImageSample:
    key: str
    data: bytes  # the encoded image
    extension: str  # png (lossless, so reconstruction metrics see exactly what ingest saw), jpg or webp
    meta: dict[str, Any]


def process_image(data: bytes, key: str, resolution: int | None, max_pixels: int, *,
                  max_resolution: int | None = None, resize: str = "long", encoding: str = "png",
                  quality: int = 95) -> ImageSample:
    """Decode with EXIF orientation, RGB; then `resolution` set: short side to it, centre-crop square; else
    native: the `resize` side capped at `max_resolution`, aspect kept, never upscaled. Encode as `encoding`."""
    image, (width, height) = decode_upright(data, max_pixels)
    if resolution is not None:
        image = resize_center_crop(image, resolution)
    elif max_resolution is not None:
        image = resize_capped(image, max_resolution, resize)
    else:
        raise ValueError("process_image needs a resolution (square) or a max_resolution (native aspect)")
    encoded = encode_image(image, encoding, quality)
    meta = {
        "key": key,
        "original_width": width,
        "original_height": height,
        "width": image.width,
        "height": image.height,
        "sha256": hashlib.sha256(encoded).hexdigest(),
    }
    if encoding != "png":
        meta["quality"] = quality  # what a lossy sample was encoded at, beside it
    return ImageSample(key=key, data=encoded, extension=encoding, meta=meta)


def decode_upright(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes → an RGB image upright as a viewer sees it (EXIF orientation applied, transparency on white), and
    its (width, height)."""
    if not data:
        raise ItemError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises at 2x; our cap is explicit and per config.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ItemError(f"{width}x{height} exceeds the {max_pixels}-pixel cap (decompression bomb?)")
            image.load()
    except (ItemError, MemoryError):
        raise  # a worker out of memory is not a bad image: transient (preprocess/writer.py failure_kind)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for bad bytes; all mean "not an image"
        raise ItemError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    image = ImageOps.exif_transpose(image)
    size = image.size  # upright, as a viewer (and the sample) sees it, not as stored
    if image.mode in ("RGBA", "LA", "P"):
        # Transparent pixels composite onto white, not onto whatever colour the alpha hid.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB"), size


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def capped_size(width: int, height: int, cap: int, side: str = "long", multiple: int = 1) -> tuple[int, int]:
    """(width, height) with the `side` ("long" or "short") side at most `cap`, aspect kept (each side rounded to a
    multiple of `multiple`, at least one), never upscaled: an image already within the cap keeps its size (then
    rounded down to the multiple)."""
    measured = max(width, height) if side == "long" else min(width, height)
    scale = min(1.0, cap / measured)
    if scale == 1.0:
        return (max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def resize_capped(image: Image.Image, cap: int, side: str = "long") -> Image.Image:
    """Native aspect: the `side` side capped at `cap`, never upscaled, no crop."""
    size = capped_size(image.width, image.height, cap, side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_image(image: Image.Image, encoding: str = "png", quality: int = 95) -> bytes:
    """An RGB image → PNG (lossless), JPEG (baseline, Pillow's 4:2:0 chroma) or lossy WebP at `quality`; the same
    pixels give the same bytes (no timestamps, no optimisation passes)."""
    buffer = io.BytesIO()
    if encoding == "png":
        image.save(buffer, format="PNG")
    elif encoding == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    elif encoding == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    return buffer.getvalue()
