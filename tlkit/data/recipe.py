"""A model's data config -> the exact recipe from an image file to the network's input, and the steps that follow it.

One implementation for every path that scores images: the torch model (`tlkit.models.network.LoadedModel`), the
exported ONNX model's runner (`tlkit.review.portable`) and, written out in the sidecar of every export, a
deployer's own runner. Each step names its library: Pillow decodes, reduces and converts; OpenCV enlarges an
image smaller than the model's side (as albumentations does in training's evaluation transform); NumPy crops and
normalises. Imports Pillow and NumPy (OpenCV when a resize needs it), nothing heavier.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tlkit.data.images import load_rgb, reduce_rgb, to_rgb
from tlkit.errors import TlkitError

# OpenCV's names of the interpolations timm's data configs use (as albumentations maps them in tlkit.data.augment)
CV2_INTERPOLATION = {
    "nearest": "INTER_NEAREST",
    "bilinear": "INTER_LINEAR",
    "bicubic": "INTER_CUBIC",
    "area": "INTER_AREA",
    "lanczos": "INTER_LANCZOS4",
}


def eval_side(data_config: dict) -> int:
    """The shorter side evaluation resizes to (size / crop_pct, timm's rule): images are decoded at that."""
    _, height, width = data_config["input_size"]
    return int(math.floor(min(int(height), int(width)) / float(data_config.get("crop_pct") or 1.0)))


def preprocessing(data_config: dict, *, pixel_size: int | None = None) -> dict[str, Any]:
    """The sidecar's exact recipe from an image file to the network's input, for a model of `data_config` (a
    pixels baseline: `pixel_size`)."""
    if pixel_size is not None:
        return {
            "decode": "Pillow: Image.open; ImageOps.exif_transpose; to RGB (alpha composited onto white, 16-bit "
            "scaled to 8)",
            "reduce_short_side": None,
            "resize": {"library": "Pillow", "size": [pixel_size, pixel_size], "interpolation": "BILINEAR"},
            "crop": None,
            "scale": 1 / 255,
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "layout": "float32 NCHW",
        }
    _, height, width = (int(v) for v in data_config["input_size"])
    side = eval_side(data_config)
    interpolation = str(data_config.get("interpolation", "bilinear"))
    return {
        "decode": "Pillow: Image.open; if the shorter side is above reduce_short_side, a JPEG is decoded at reduced "
        "size first (image.draft('RGB', (ceil(w * s), ceil(h * s))), s = reduce_short_side / min(w, h)); "
        "ImageOps.exif_transpose; to RGB (alpha composited onto white, 16-bit scaled to 8); if the shorter side "
        "is still above reduce_short_side, Image.resize to exactly that shorter side (the other: "
        "max(reduce_short_side, round(long * reduce_short_side / short))) with Image.BICUBIC",
        "reduce_short_side": side,
        "resize": {
            "library": "OpenCV",
            "short_side": side,
            "interpolation": CV2_INTERPOLATION.get(interpolation, "INTER_LINEAR"),
            "when": "the shorter side is not short_side (an image smaller than it): cv2.resize to (round(w * k), "
            "round(h * k)), k = short_side / min(h, w)",
        },
        "crop": {"size": [height, width], "top": "(h - height) // 2", "left": "(w - width) // 2"},
        "scale": 1 / 255,
        "mean": [float(v) for v in data_config["mean"]],
        "std": [float(v) for v in data_config["std"]],
        "layout": "float32 NCHW: (pixels * scale - mean) / std per channel",
    }


def prepare(image: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
    """A decoded HxWx3 uint8 RGB image -> the network's input size (HxWx3 uint8), per the recipe's resize and crop."""
    resize = recipe["resize"]
    if resize["library"] == "Pillow":  # a pixels baseline: its square, aspect not kept
        from PIL import Image

        side = resize["size"]
        return np.asarray(Image.fromarray(image).resize((side[1], side[0]), Image.Resampling.BILINEAR))
    import cv2

    height, width = image.shape[:2]
    k = resize["short_side"] / min(height, width)
    size = (max(1, round(height * k)), max(1, round(width * k)))
    if size != (height, width):
        image = cv2.resize(image, (size[1], size[0]), interpolation=getattr(cv2, resize["interpolation"]))
    crop_height, crop_width = recipe["crop"]["size"]
    top, left = (image.shape[0] - crop_height) // 2, (image.shape[1] - crop_width) // 2
    return image[top : top + crop_height, left : left + crop_width]


def normalise(prepared: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, as the network reads it."""
    x = prepared.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(recipe["mean"], np.float32)) / np.asarray(recipe["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def decoded(item: Any, recipe: dict[str, Any]) -> np.ndarray:
    """A path, an open file of image bytes, a PIL image or a decoded HxWx3 uint8 RGB array -> the decoded image, as
    tlkit decodes files (a PIL image or an array is reduced as a decoded file is; a JPEG's draft needs its file)."""
    side = recipe["reduce_short_side"]
    if isinstance(item, np.ndarray):
        return reduce_rgb(_rgb_array(item), side)
    if hasattr(item, "mode") and hasattr(item, "size") and not hasattr(item, "read"):  # a PIL image
        return reduce_rgb(np.asarray(to_rgb(item)), side)
    return load_rgb(item, side)


def _rgb_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise TlkitError(
            f"an image array must be HxWx3 uint8 RGB (or HxW grey); got shape {array.shape} of {array.dtype}; "
            "pass a file path or a PIL image for other kinds"
        )
    return array
