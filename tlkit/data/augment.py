"""Backbone data config + preset name -> albumentations train/eval transforms (YAML round-trip).

The only module that imports albumentations (2.0.x: MIT, no longer developed upstream), so a swap
touches this file alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_NO_UPDATE_CHECK = "NO_ALBUMENTATIONS_UPDATE"
_given = os.environ.get(_NO_UPDATE_CHECK)
os.environ[_NO_UPDATE_CHECK] = "1"  # albumentations checks PyPI for a newer version when imported: not here
try:
    import albumentations as A
finally:  # the user's environment as it was
    if _given is None:
        del os.environ[_NO_UPDATE_CHECK]
    else:
        os.environ[_NO_UPDATE_CHECK] = _given
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tlkit.data import recipe  # noqa: E402
from tlkit.errors import TlkitError  # noqa: E402

PRESETS = ("none", "light", "medium", "heavy")
_INTERPOLATION = {name: getattr(cv2, flag) for name, flag in recipe.CV2_INTERPOLATION.items()}


def _size(data_config: dict) -> tuple[int, int]:
    _, height, width = data_config["input_size"]
    return int(height), int(width)


def _interpolation(data_config: dict) -> int:
    return _INTERPOLATION.get(data_config.get("interpolation", "bilinear"), cv2.INTER_LINEAR)


def _normalize(data_config: dict) -> list:
    return [A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0), A.ToTensorV2()]


def _eval_geometry(data_config: dict) -> list:
    height, width = _size(data_config)
    scale = recipe.eval_side(data_config)
    return [
        A.SmallestMaxSize(max_size=scale, interpolation=_interpolation(data_config)),
        A.CenterCrop(height=height, width=width),
    ]


def eval_side(data_config: dict) -> int:
    """The shorter side the evaluation transform resizes to (size / crop_pct): images are decoded at that."""
    return recipe.eval_side(data_config)


def decode_side(transform: A.Compose) -> int | None:
    """The shorter side an image needs for `transform` to read it at full detail, or None (decode it whole).

    Known first steps only: SmallestMaxSize reads its own size; RandomResizedCrop's smallest crop
    (area fraction scale[0], most elongated ratio) must still cover its output size, so the image
    needs a shorter side of size / sqrt(scale[0] * ratio). Anything else first (a custom YAML with
    other steps) keeps the whole image.
    """
    first = transform.transforms[0] if transform.transforms else None
    if isinstance(first, A.SmallestMaxSize) and first.max_size is not None:
        sizes = first.max_size if isinstance(first.max_size, (list, tuple)) else [first.max_size]
        return int(max(sizes))
    if isinstance(first, A.RandomResizedCrop):
        height, width = first.size
        ratio = min(first.ratio[0], 1 / first.ratio[1])
        return int(math.ceil(max(height, width) / math.sqrt(first.scale[0] * ratio)))
    return None


def eval_transform(data_config: dict) -> A.Compose:
    """timm's evaluation preprocessing: resize the short side to size / crop_pct, centre crop."""
    return A.Compose([*_eval_geometry(data_config), *_normalize(data_config)])


def eval_pixels(data_config: dict, image: np.ndarray) -> np.ndarray:
    """The evaluation resize and crop alone: HxWx3 uint8 in, model-sized HxWx3 uint8 out (not normalised)."""
    return A.Compose(_eval_geometry(data_config))(image=image)["image"]


def train_transform(data_config: dict, preset: str = "light", *, hflip: bool = True) -> A.Compose:
    """A training transform from a preset, at the backbone's input size and normalisation.

    Args:
        data_config: the backbone's data config (input_size, mean, std, interpolation, crop_pct).
        preset: none (same as eval), light (random resized crop + flip), medium (+ colour and
            small affine changes), heavy (+ stronger crops, rotation, cutout).
        hflip: allow horizontal flips; turn off where left and right differ (digits, text).
    """
    if preset not in PRESETS:
        raise TlkitError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)} or a YAML file")
    if preset == "none":
        return eval_transform(data_config)
    height, width = _size(data_config)
    interp = _interpolation(data_config)
    scale = {"light": (0.6, 1.0), "medium": (0.4, 1.0), "heavy": (0.25, 1.0)}[preset]
    steps: list = [A.RandomResizedCrop(size=(height, width), scale=scale, interpolation=interp)]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if preset in ("medium", "heavy"):
        strength = 0.2 if preset == "medium" else 0.4
        steps.append(A.ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=0.02, p=0.8))
        steps.append(
            A.Affine(rotate=(-10, 10) if preset == "medium" else (-20, 20), translate_percent=(-0.05, 0.05), p=0.5)
        )
    if preset == "heavy":
        steps.append(
            A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2), p=0.5)
        )
    return A.Compose(steps + _normalize(data_config))


def load_transform(path: str | os.PathLike) -> A.Compose:
    """A transform saved in albumentations' own YAML serialisation format."""
    try:
        return A.load(str(path), data_format="yaml")
    except FileNotFoundError:
        raise TlkitError(f"augmentation file {path} does not exist") from None
    except Exception as err:  # albumentations raises several types for a malformed file
        raise TlkitError(
            f"cannot read augmentation file {path}: {err}; write it with albumentations' A.save(..., "
            "data_format='yaml')"
        ) from None


def resolve_train_transform(data_config: dict, augment: str, *, hflip: bool = True) -> A.Compose:
    """`augment` is a preset name or a path to an albumentations YAML file.

    A file that only augments (no Normalize) gets the backbone's resize and normalisation appended,
    so one file serves every backbone; a file with its own Normalize is used as it is.
    """
    if augment in PRESETS:
        return train_transform(data_config, augment, hflip=hflip)
    if augment.endswith((".yaml", ".yml")):
        loaded = load_transform(augment)
        if any(isinstance(t, A.Normalize) for t in loaded.transforms):
            return loaded
        height, width = _size(data_config)
        resize = A.Resize(height=height, width=width, interpolation=_interpolation(data_config))
        return A.Compose([*loaded.transforms, resize, *_normalize(data_config)])
    raise TlkitError(f"unknown augmentation {augment!r}; choose one of {', '.join(PRESETS)} or a .yaml file")


def to_yaml(transform: A.Compose, path: Path) -> Path:
    """Save `transform` as YAML that :func:`load_transform` (and albumentations) reads back."""
    A.save(transform, str(path), data_format="yaml")
    return Path(path)


def to_dict(transform: A.Compose) -> dict:
    """A JSON-able description of the transform: part of the feature-cache key."""
    return A.to_dict(transform)


def apply(transform: A.Compose, image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> normalised 3xHxW float tensor."""
    return transform(image=image)["image"]


class ToTensor:
    """A transform as a picklable callable (DataLoader workers and spawned processes need that)."""

    def __init__(self, transform: A.Compose):
        self.transform = transform
        self.decode_side = decode_side(transform)  # images are decoded at this shorter side (images.load_rgb)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return apply(self.transform, image)

    def reseed(self, seed: int) -> None:
        """albumentations keeps its own random state and ignores global seeds: set it here."""
        self.transform.set_random_seed(seed)
