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
