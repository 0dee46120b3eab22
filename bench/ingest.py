"""Ingest of a folder that has not changed: the first pass decodes and hashes every image, later
passes read the answers back from the cache (keyed by path, size, mtime and ctime).

    python bench/ingest.py                 # 10,000 JPEGs of 128-256 px in 10 classes
    python bench/ingest.py --n 2000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlkit.data.ingest import ingest


def write_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        side = int(rng.integers(128, 257))
        field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        picture = Image.fromarray(field).resize((side, side), Image.Resampling.BICUBIC)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tlkit-bench-ingest-"))
    try:
        write_images(tmp / "images", args.n)
        first, again, fingerprints = [], [], set()
        for i in range(args.repeats):  # interleaved: a fresh cache (every file checked), then the same cache again
            cache = tmp / f"cache{i}"
            start = time.perf_counter()
            fingerprints.add(ingest(tmp / "images", cache=cache).fingerprint)
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            fingerprints.add(ingest(tmp / "images", cache=cache).fingerprint)
            again.append(time.perf_counter() - start)
        assert len(fingerprints) == 1, "the cache must not change the fingerprint"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{args.n} images; first ingest (s): {' '.join(f'{t:.2f}' for t in first)}; unchanged folder again (s): "
        f"{' '.join(f'{t:.2f}' for t in again)}"
    )
    print(f"ratio again / first: {statistics.median(again) / statistics.median(first):.3f} (median)")


if __name__ == "__main__":
    main()
