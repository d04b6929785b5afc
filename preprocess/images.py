"""One image in, one training sample out: decode, orient, convert, resize, crop, encode.

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


@dataclass(frozen=True)
class ImageSample:
    key: str
    png: bytes  # lossless, so reconstruction metrics see exactly what ingest saw
    meta: dict[str, Any]


def process_image(data: bytes, key: str, resolution: int, max_pixels: int) -> ImageSample:
    """Decode with EXIF orientation, RGB, resize the short side to `resolution`, centre-crop square."""
    if not data:
        raise ItemError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises at 2x; our cap is explicit and per config.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ItemError(f"{width}x{height} exceeds the {max_pixels}-pixel cap (decompression bomb?)")
            image.load()
    except (ItemError, MemoryError):
        raise  # a worker out of memory is not a bad image: transient (preprocess/writer.py failure_kind)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for bad bytes; all mean "not an image"
        raise ItemError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    image = ImageOps.exif_transpose(image)
    width, height = image.size  # upright, as a viewer (and the sample) sees it, not as stored
    if image.mode in ("RGBA", "LA", "P"):
        # Transparent pixels composite onto white, not onto whatever colour the alpha hid.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    image = resize_center_crop(image, resolution)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    meta = {
        "key": key,
        "original_width": width,
        "original_height": height,
        "width": image.width,
        "height": image.height,
        "sha256": hashlib.sha256(png).hexdigest(),
    }
    return ImageSample(key=key, png=png, meta=meta)


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))
