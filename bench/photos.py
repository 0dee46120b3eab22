"""Photo-sized JPEGs for the benches: 0.2-5 MP, mixed sizes and orientations, photo-like content.

Smooth colour fields with fine noise, upscaled from a small random field: they compress and decode
like camera pictures (1-3 bits per pixel), unlike pure noise (which is the slowest case for JPEG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(640, 480), (1024, 768), (1600, 1200), (2048, 1536), (2592, 1944)]  # 0.3, 0.8, 1.9, 3.1, 5.0 MP


def write_photos(root: Path, n: int, *, classes: int = 4, seed: int = 0, sizes=SIZES) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        if rng.random() < 0.3:
            width, height = height, width  # portrait
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        picture = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        picture = np.clip(picture + rng.normal(0, 6, (height, width, 1)), 0, 255).astype(np.uint8)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(picture).save(path, quality=90)
        paths.append(path)
    return paths
