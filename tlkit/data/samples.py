"""scikit-learn's bundled handwritten digits -> a class-per-folder PNG tree (real data, offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tlkit.errors import TlkitError


def parse_classes(spec: str | list[int] | None) -> list[int]:
    """'0-4' / '5,7,9' / [1, 2] / None (all) -> sorted digit list; errors name the valid range."""
    if spec is None or spec == "":
        return list(range(10))
    if isinstance(spec, (list, tuple)):
        values = [int(v) for v in spec]
    else:
        values = []
        for part in str(spec).replace(" ", "").split(","):
            try:
                if "-" in part:
                    lo, hi = (int(v) for v in part.split("-", 1))
                    values.extend(range(lo, hi + 1))
                else:
                    values.append(int(part))
            except ValueError:
                raise TlkitError(f"cannot read classes {spec!r}; write a range like 0-4 or a list like 1,3,5") from None
    bad = [v for v in values if not 0 <= v <= 9]
    if bad or not values:
        raise TlkitError(f"digit classes must lie in 0-9, got {spec!r}; for example --classes 0-4")
    return sorted(set(values))


def write_digits(
    out: Path,
    *,
    classes: str | list[int] | None = None,
    per_class: int | None = None,
    size: int = 32,
    seed: int = 0,
) -> dict[str, int]:
    """Write the 8x8 digits, upscaled to `size` px, as `out/<digit>/<index>.png`.

    Args:
        out: folder to write; existing files of the same name are replaced.
        classes: which digits (e.g. "0-4"); all ten by default.
        per_class: keep at most this many images per class, chosen with `seed`.
        size: side of the written square images in pixels.
        seed: random seed for the per-class subsample.

    Returns:
        Number of images written per class.
    """
    from sklearn.datasets import load_digits

    if size < 8:
        raise TlkitError(f"--size must be at least 8 (the digits are 8x8 px), got {size}")
    if per_class is not None and per_class < 1:
        raise TlkitError(f"--per-class must be at least 1, got {per_class}")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for digit in parse_classes(classes):
        index = np.flatnonzero(digits.target == digit)
        if per_class is not None and per_class < len(index):
            index = np.sort(rng.choice(index, size=per_class, replace=False))
        folder = Path(out) / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for i in index:
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
            image = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{i:04d}.png")
        counts[str(digit)] = len(index)
    return counts


# ----------------------------------------------------------------------------------------------
# Real photographs: crops of the sample photos that scikit-image, scikit-learn and matplotlib ship.

# class -> file in scikit-image's data folder. Each is one real photograph of a surface or
# material; a crop shows texture, not the whole scene.
PHOTO_SOURCES = {
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "moon": "moon.png",
    "stars": "hubble_deep_field.jpg",
    "tissue": "ihc.png",
    "print": "page.png",
    "fur": "chelsea.png",
}
# Each photo is cut into vertical bands, one per split, so no crop of one split overlaps a crop of
# another: test crops show parts of the photo that training never saw.
PHOTO_BANDS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}


def _photo_path(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise TlkitError("the sample photos need scikit-image: pip install 'tlkit[photos]'")
    path = Path(list(spec.submodule_search_locations or [])[0]) / "data" / name
    if not path.exists():
        raise TlkitError(f"{path} is missing from the installed scikit-image; reinstall it")
    return path


def crop_boxes(
    width: int, height: int, *, crop: int, counts: tuple[int, ...], rng: np.random.Generator
) -> dict[str, list[tuple[int, int, int, int]]]:
    """Random (left, top, right, bottom) crops per split, each inside its split's vertical band of the photo."""
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    for (split, (lo, hi)), n in zip(PHOTO_BANDS.items(), counts):
        left, right = int(lo * width), int(hi * width)
        if right - left < crop or height < crop:
            raise TlkitError(
                f"--crop {crop} does not fit the {split} band ({right - left} x {height} px) of a {width} x {height} "
                "photo; use a smaller --crop"
            )
        xs = rng.integers(left, right - crop + 1, size=n)
        ys = rng.integers(0, height - crop + 1, size=n)
        boxes[split] = [(int(x), int(y), int(x) + crop, int(y) + crop) for x, y in zip(xs, ys)]
    return boxes


def write_photos(
    out: Path,
    *,
    crop: int = 64,
    counts: tuple[int, int, int] = (12, 8, 20),
    grey: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, int]]:
    """Write random crops of real photos as a pre-split tree `out/<split>/<class>/<n>.png`.

    Args:
        out: folder to write; files of the same name are replaced.
        crop: side of each square crop in the photo's own pixels.
        counts: crops per class for train, val and test.
        grey: convert to greyscale, so that colour alone does not name the photo (several are grey).
        seed: seed of the crop positions.

    Returns:
        Images written per split and class.
    """
    if crop < 8:
        raise TlkitError(f"--crop must be at least 8 pixels, got {crop}")
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, int]] = {split: {} for split in PHOTO_BANDS}
    for label, name in PHOTO_SOURCES.items():
        with Image.open(_photo_path(name)) as photo:
            image = photo.convert("L" if grey else "RGB")
        for split, boxes in crop_boxes(*image.size, crop=crop, counts=counts, rng=rng).items():
            folder = Path(out) / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i, box in enumerate(boxes):
                image.crop(box).save(folder / f"{i:03d}.png")
            written[split][label] = len(boxes)
    return written
