"""preprocess/images.py: one image in, one RGB sample out (square crop or native aspect; PNG, JPEG or WebP) — on real
photos shipped with scikit-image."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio
from skimage.transform import resize

from atoken.preprocess.images import ItemError, process_image

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"
BIG = 89_478_485  # the config's default cap


def decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "resolution"), [
    ("astronaut.png", 32), ("coffee.png", 64), ("rocket.jpg", 48), ("chelsea.png", 32), ("camera.png", 40),
])
def test_real_photos_become_square_rgb_pngs(name, resolution):
    data = (SKIMAGE_DATA / name).read_bytes()
    source = Image.open(io.BytesIO(data))

    sample = process_image(data, f"skimage_{Path(name).stem}", resolution, BIG)

    out = decoded(sample.data)
    assert out.mode == "RGB" and out.size == (resolution, resolution)
    assert sample.key == f"skimage_{Path(name).stem}"
    assert sample.meta == {
        "key": sample.key, "original_width": source.width, "original_height": source.height,
        "width": resolution, "height": resolution, "sha256": hashlib.sha256(sample.data).hexdigest(),
    }


@pytest.mark.parametrize("name", ["coffee.png", "rocket.jpg", "astronaut.png"])
def test_short_side_is_resized_and_the_centre_kept(name):
    """Reference: scikit-image crops the centre square and resizes it; the two must agree closely."""
    data = (SKIMAGE_DATA / name).read_bytes()
    source = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    height, width = source.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    reference = resize(source[top:top + side, left:left + side], (32, 32), order=3, anti_aliasing=True,
                       preserve_range=True).round().clip(0, 255).astype(np.uint8)

    out = np.asarray(decoded(process_image(data, "k", 32, BIG).data))

    assert peak_signal_noise_ratio(reference, out, data_range=255) > 24
    # A crop from the wrong place (e.g. the left edge) scores far lower against the same reference.
    shifted = resize(source[:side, :side], (32, 32), order=3, anti_aliasing=True,
                     preserve_range=True).round().clip(0, 255).astype(np.uint8)
    if left or top:
        assert peak_signal_noise_ratio(reference, out, data_range=255) > \
            peak_signal_noise_ratio(shifted, out, data_range=255)


def test_grayscale_becomes_three_equal_channels():
    out = np.asarray(decoded(process_image((SKIMAGE_DATA / "camera.png").read_bytes(), "cam", 32, BIG).data))
    assert out.shape == (32, 32, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_processing_is_deterministic():
    data = (SKIMAGE_DATA / "astronaut.png").read_bytes()
    assert process_image(data, "a", 32, BIG).data == process_image(data, "a", 32, BIG).data


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    # Stored 96 wide x 64 high: left half red, right half blue. Orientation 6 = "rotate 90° clockwise to
    # display", so the upright picture is 64 wide x 96 high with red on top and blue below.
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:, :48] = (255, 0, 0)
    stored[:, 48:] = (0, 0, 255)
    data = exif_jpeg(stored, orientation=6)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6

    sample = process_image(data, "rotated", 32, BIG)

    out = np.asarray(decoded(sample.data)).astype(int)
    top, bottom = out[:8].reshape(-1, 3).mean(0), out[-8:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, f"top should be red, got {top}"
    assert bottom[2] > 200 and bottom[0] < 60, f"bottom should be blue, got {bottom}"
    assert out.shape == (32, 32, 3)
    # The manifest describes the picture as a viewer sees it (upright), like the sample it ships.
    assert (sample.meta["original_width"], sample.meta["original_height"]) == (64, 96)


def test_without_exif_the_same_pixels_stay_as_stored():
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:, :48] = (255, 0, 0)
    stored[:, 48:] = (0, 0, 255)
    sample = process_image(exif_jpeg(stored, orientation=1), "upright", 32, BIG)
    out = np.asarray(decoded(sample.data)).astype(int)
    left, right = out[:, :8].reshape(-1, 3).mean(0), out[:, -8:].reshape(-1, 3).mean(0)
    assert left[0] > 200 and right[2] > 200
    assert (sample.meta["original_width"], sample.meta["original_height"]) == (96, 64)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (0, 0, 0, 0)  # fully transparent black: must become white, not black
    rgba[:, 20:] = (255, 0, 0, 128)  # half-transparent red over white: pink
    out = np.asarray(decoded(process_image(png_bytes(Image.fromarray(rgba, "RGBA")), "rgba", 40, BIG).data))

    assert out.shape == (40, 40, 3)
    assert (out[:, :18] == 255).all()
    assert np.abs(out[:, 22:].astype(int) - (255, 127, 127)).max() <= 2


def test_la_and_palette_transparency_become_white():
    la = Image.fromarray(np.zeros((16, 16, 2), np.uint8), "LA")
    out = np.asarray(decoded(process_image(png_bytes(la), "la", 16, BIG).data))
    assert (out == 255).all()

    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    out = np.asarray(decoded(process_image(png_bytes(palette), "p", 16, BIG).data))
    assert (out == 255).all()


def test_real_rgba_logo_has_no_alpha_left():
    sample = process_image((SKIMAGE_DATA / "logo.png").read_bytes(), "logo", 32, BIG)
    out = decoded(sample.data)
    assert out.mode == "RGB" and out.size == (32, 32)
    # The logo's transparent corners composite to white.
    assert (np.asarray(out)[0, 0] == 255).all()


def test_empty_bytes():
    with pytest.raises(ItemError, match="empty file"):
        process_image(b"", "empty", 32, BIG)


def test_random_bytes():
    with pytest.raises(ItemError, match="cannot decode image"):
        process_image(np.random.default_rng(0).bytes(4096), "noise", 32, BIG)


def test_text_is_not_an_image():
    with pytest.raises(ItemError, match="cannot decode image"):
        process_image(b"this is a text file with a .jpg suffix\n" * 10, "text", 32, BIG)


def test_truncated_jpeg():
    data = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
    with pytest.raises(ItemError, match="cannot decode image"):
        process_image(data[: len(data) // 2], "truncated", 32, BIG)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height but holds no pixels: a decompression bomb in 45 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_above_max_pixels_is_refused_before_decoding():
    # 10000 x 10000 = 1e8 pixels: above the default cap, below PIL's own error threshold (2x its cap).
    with pytest.raises(ItemError, match="10000x10000 exceeds the 89478485-pixel cap"):
        process_image(header_only_png(10000, 10000), "bomb", 32, BIG)
    # Far above: still an ItemError (PIL's own bomb error), never a crash of the job.
    with pytest.raises(ItemError):
        process_image(header_only_png(60000, 60000), "bigger-bomb", 32, BIG)


def test_max_pixels_cap_on_a_real_photo():
    data = (SKIMAGE_DATA / "astronaut.png").read_bytes()
    with pytest.raises(ItemError, match="512x512 exceeds the 262143-pixel cap"):
        process_image(data, "astronaut", 32, 512 * 512 - 1)
    assert process_image(data, "astronaut", 32, 512 * 512).meta["width"] == 32



def saved_as(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    if format == "MPO":  # a camera's multi-picture JPEG: two pictures, or PIL reads it back as a plain JPEG
        image.save(buffer, format=format, save_all=True, append_images=[image.rotate(90)])
    else:
        image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize("format", ["JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_the_formats_the_sources_list_are_decoded(format):
    photo = Image.open(SKIMAGE_DATA / "astronaut.png").convert("RGB")
    data = saved_as(photo, format)
    assert Image.open(io.BytesIO(data)).format == format
    assert process_image(data, "astronaut", 32, BIG).meta["original_width"] == 512


@pytest.mark.parametrize("format", ["JPEG2000", "PPM"])
def test_other_formats_are_refused_whatever_their_suffix(format):
    """PIL opens ~40 formats by their bytes; JPEG 2000 decodes ~10x slower a pixel than the listed ones, which
    would stretch the pixel cap's time bound from seconds to most of a minute (benchmarks/bench_decode_limits.py)."""
    photo = Image.open(SKIMAGE_DATA / "astronaut.png").convert("RGB")
    data = saved_as(photo, format)
    assert Image.open(io.BytesIO(data)).size == (512, 512), "a good image PIL itself decodes"
    with pytest.raises(ItemError, match="cannot decode image"):
        process_image(data, "astronaut", 32, BIG)


# -- native resolution (ingest.max_resolution) ------------------------------------------------------------------

def native(data: bytes, cap: int, **options):
    return process_image(data, "k", None, BIG, max_resolution=cap, **options)


def striped(width: int, height: int) -> bytes:
    """A width x height test card: red and green gradients on full blue, a yellow bar at a third of the width."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    pixels = np.stack([x * 255, y * 255, np.full_like(x, 255)], axis=-1)
    pixels[:, width // 3:width // 3 + max(1, width // 30)] = (255, 255, 0)
    return png_bytes(Image.fromarray(pixels.round().astype(np.uint8)))


def test_native_mode_keeps_the_aspect_and_caps_the_long_side():
    sample = native(striped(300, 120), 100)
    out = decoded(sample.data)
    assert out.size == (100, 40) and sample.extension == "png", "300x120 capped at 100: the ratio 2.5 kept"
    assert (sample.meta["width"], sample.meta["height"]) == (100, 40)
    assert (sample.meta["original_width"], sample.meta["original_height"]) == (300, 120)
    # The bar lands where it was (a third of the width): resized, not cropped.
    bar = np.asarray(out)[:, :, 2].mean(axis=0) < 128  # yellow: no blue
    assert abs(np.flatnonzero(bar).mean() / 100 - (100 + 5) / 300) < 0.02
    portrait = decoded(native(striped(120, 300), 100).data)
    assert portrait.size == (40, 100)
    odd = decoded(native(striped(301, 97), 64).data)
    assert odd.size == (64, 21) and abs(64 / 21 - 301 / 97) < 64 / 21 / 21, "within one pixel's rounding"
    # resize: short caps the short side instead.
    assert decoded(native(striped(300, 120), 60, resize="short").data).size == (150, 60)


def test_native_mode_never_upscales_and_keeps_small_images_bit_exact():
    data = (SKIMAGE_DATA / "chelsea.png").read_bytes()  # 451 x 300
    source = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    sample = native(data, 1024)
    out = decoded(sample.data)
    assert out.size == (451, 300), "smaller than the cap: not upscaled"
    assert np.array_equal(np.asarray(out), source), "PNG: bit-exact"
    assert decoded(native(data, 451).data).size == (451, 300), "exactly at the cap: unchanged"


@pytest.mark.parametrize(("encoding", "fmt", "bound"), [("jpg", "JPEG", 35.0), ("webp", "WEBP", 35.0)])
def test_lossy_encodings_decode_close_to_the_png(encoding, fmt, bound):
    """JPEG and WebP at quality 95 of a real photo decode within a PSNR bound of the PNG of the same pixels;
    lower quality costs PSNR and saves bytes (measured at 256 px: jpg 37.0 dB, webp 37.4 dB at 95; ~30 dB at 50)."""
    data = (SKIMAGE_DATA / "astronaut.png").read_bytes()
    png = native(data, 256)
    lossy = native(data, 256, encoding=encoding, quality=95)
    image = Image.open(io.BytesIO(lossy.data))
    assert image.format == fmt and lossy.extension == encoding and image.size == (256, 256)
    reference, out = np.asarray(decoded(png.data)), np.asarray(image.convert("RGB"))
    psnr = peak_signal_noise_ratio(reference, out, data_range=255)
    assert psnr > bound
    assert lossy.meta["quality"] == 95 and "quality" not in png.meta
    assert lossy.meta["sha256"] == hashlib.sha256(lossy.data).hexdigest()
    worse = native(data, 256, encoding=encoding, quality=50)
    worse_psnr = peak_signal_noise_ratio(reference, np.asarray(Image.open(io.BytesIO(worse.data)).convert("RGB")),
                                         data_range=255)
    assert worse_psnr < psnr and len(worse.data) < len(lossy.data) < len(png.data)
    assert native(data, 256, encoding=encoding, quality=95).data == lossy.data, "deterministic"
