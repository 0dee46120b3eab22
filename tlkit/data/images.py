"""Image files -> RGB arrays: every mode (grey, palette, RGBA, CMYK, 16-bit) and EXIF orientation."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Large but sane: a 20000 x 20000 scan is fine, a decompression bomb is not.
Image.MAX_IMAGE_PIXELS = 400_000_000


class BadImage(Exception):
    """A file that cannot be used as an image; `reason` is a short phrase for the ingest report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def load_rgb(
    path: str | os.PathLike | IO[bytes], min_side: int | None = None, *, formats: tuple[str, ...] | None = None
) -> np.ndarray:
    """Decode `path` (a file, or an open file of image bytes) to an HxWx3 uint8 array, upright per its EXIF orientation.

    With `min_side`, an image whose shorter side is longer is reduced to exactly that shorter side
    (aspect kept, Pillow's antialiased bicubic). A JPEG is then decoded at reduced size to begin with
    (`Image.draft`: the decoder's own 1/2, 1/4, 1/8 scaling, never below the size asked for), so a
    5 MP photo feeding a 224 px crop is not decoded whole. Smaller images are returned as they are.
    `formats` limits the decoders Pillow may use (e.g. ("JPEG", "PNG", "WEBP")).
    """
    with Image.open(path, formats=formats) as image:
        if min_side is not None and min(image.size) > min_side:
            scale = min_side / min(image.size)
            image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
        rgb = to_rgb(ImageOps.exif_transpose(image))
    return np.asarray(_reduced(rgb, min_side))


def _reduced(rgb: Image.Image, min_side: int | None) -> Image.Image:
    """`rgb` with its shorter side reduced to `min_side` (aspect kept, Pillow's antialiased bicubic); a smaller
    image as it is."""
    if min_side is None or min(rgb.size) <= min_side:
        return rgb
    width, height = rgb.size
    scale = min_side / min(width, height)
    size = (
        (min_side, max(min_side, round(height * scale)))
        if width <= height
        else (max(min_side, round(width * scale)), min_side)
    )
    return rgb.resize(size, Image.Resampling.BICUBIC)


def reduce_rgb(image: np.ndarray, min_side: int | None) -> np.ndarray:
    """A decoded HxWx3 uint8 image reduced as `load_rgb` reduces a file it decodes (without a JPEG's draft)."""
    if min_side is None or min(image.shape[:2]) <= min_side:
        return image
    return np.asarray(_reduced(Image.fromarray(image), min_side))


def frame_count(path: Path) -> int:
    """Frames in an animated GIF, WebP or PNG, or pages of a TIFF; 1 for a still image. tlkit reads the first."""
    with Image.open(path) as image:
        return int(getattr(image, "n_frames", 1))


def inspect_image(path: Path) -> tuple[int, int]:
    """Fully decode `path` and return its upright (width, height), or raise BadImage(reason)."""
    try:
        if path.stat().st_size == 0:
            raise BadImage("zero bytes")
        with Image.open(path) as image:
            image.load()  # a full decode is the only way to catch truncated files
            upright = ImageOps.exif_transpose(image)
            return upright.size
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except PermissionError:
        raise BadImage("unreadable (permission denied)") from None
    except (OSError, SyntaxError, ValueError) as err:
        text = str(err).lower()
        if "truncated" in text or "premature end" in text or "broken data stream" in text:
            raise BadImage("truncated") from None
        raise BadImage(f"unreadable ({err})") from None
    except Image.DecompressionBombError:
        raise BadImage("too many pixels (possible decompression bomb)") from None
