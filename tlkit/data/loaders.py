"""Manifest rows + transform -> torch Dataset and DataLoader."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tlkit.core.runtime import cpu_share
from tlkit.data.images import load_rgb


class ImageDataset(Dataset):
    """Decodes image files (or takes decoded HxWx3 arrays) and applies a transform; items are (image tensor, label,
    index).

    Files are decoded at the shorter side the transform reads (`transform.decode_side`, see
    augment.decode_side), or read from `decoded`, which holds exactly those arrays.
    """

    def __init__(
        self,
        paths: Sequence[Path | np.ndarray],
        labels: Sequence[int] | np.ndarray | None,
        transform: Callable[[np.ndarray], torch.Tensor],
        decoded: DecodedImages | None = None,
    ):
        self.paths = [p if isinstance(p, np.ndarray) else str(p) for p in paths]
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.side = getattr(transform, "decode_side", None)
        if decoded is not None and (len(decoded) != len(self.paths) or decoded.side != self.side):
            raise ValueError(
                f"decoded images ({len(decoded)} at side {decoded.side}) do not match the dataset ({len(self.paths)} "
                f"at side {self.side})"
            )
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        item = self.paths[index]
        if isinstance(item, np.ndarray):
            return item
        return self.decoded[index] if self.decoded is not None else load_rgb(item, self.side)

    def __getitem__(self, index: int):
        return self.transform(self.image(index)), self.labels[index], index

    def reseed(self, seed: int) -> None:
        """Seed the transform's own random state, where it has one (augmentations do)."""
        if hasattr(self.transform, "reseed"):
            self.transform.reseed(seed)


class DecodedImages:
    """Image files decoded once, at the side their transform reads, for every epoch after the first.

    Decoded up front by a thread pool (Pillow decodes without the GIL). Kept in memory while the
    estimate (from each image's size in the manifest) fits `memory_mb`; otherwise written as .npy
    files under the cache folder, named by the file's sha256 and the side, so later runs and other
    processes read them back instead of decoding. Item i is exactly `images.load_rgb(paths[i], side)`.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        digests: Sequence[str],
        sizes: Sequence[tuple[int, int]],
        side: int | None,
        *,
        memory_mb: float,
        cache: str | os.PathLike | None = None,
        workers: int | None = None,
    ):
        from concurrent.futures import ThreadPoolExecutor

        from tlkit.core.cache import cache_dir

        self.side = side
        self.paths = [str(p) for p in paths]
        self.nbytes = sum(decoded_bytes(w, h, side) for w, h in sizes)
        self.in_memory = self.nbytes <= memory_mb * 2**20
        self.files: list[Path] = []  # where decoded images go when they do not fit in memory
        if not self.in_memory:
            folder = cache_dir(cache) / "images" / f"side-{side or 'full'}"
            self.files = [folder / d[:2] / f"{d}.npy" for d in digests]
        self.arrays: list[np.ndarray] | None = None
        workers = workers or min(8, cpu_share() + 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            if self.in_memory:
                self.arrays = list(pool.map(lambda path: load_rgb(path, side), self.paths))
            else:
                list(pool.map(self._write, range(len(self.paths))))

    def _write(self, index: int) -> None:
        target = self.files[index]
        if target.exists():
            return
        from tlkit.core.files import replacing

        with replacing(target) as partial, open(partial, "wb") as handle:
            np.save(handle, load_rgb(self.paths[index], self.side))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        if self.arrays is not None:
            return self.arrays[index]
        try:
            return np.load(self.files[index])
        except (OSError, ValueError):  # removed or damaged meanwhile: decode again
            return load_rgb(self.paths[index], self.side)


def decoded_bytes(width: int, height: int, side: int | None) -> int:
    """Bytes of an RGB uint8 image of width x height once decoded at shorter side `side` (never enlarged)."""
    if side is not None and min(width, height) > side:
        scale = side / min(width, height)
        width, height = max(side, round(width * scale)), max(side, round(height * scale))
    return width * height * 3


def default_image_cache_mb() -> int:
    """A quarter of this machine's memory, at most 8 GiB: room left for the model, its activations and the OS."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2048
    return int(min(8 * 1024, total / 4 / 2**20))


def _seed_worker(worker_id: int) -> None:
    """A worker's augmentations follow its torch seed: distinct per worker, reproducible from the loader's
    generator. (A copy of one seeded transform in every worker would repeat the same random draws.)"""
    info = torch.utils.data.get_worker_info()
    assert info is not None  # called as a DataLoader's worker_init_fn
    dataset: Any = info.dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(torch.initial_seed() % 2**32)


def default_workers() -> int:
    """DataLoader worker processes for this machine.

    With a GPU, decoding in workers keeps the GPU fed. On a CPU the model's own threads already use
    every core, and worker processes preempt them: on 2 cores, decoding in the main process was
    measured faster (bench/extract.py: 0.76 of the bare forward pass, vs 0.69 with one worker and
    0.65 with two), so small CPU-only machines use none and larger ones a few.
    """
    cpus = cpu_share()
    if torch.cuda.is_available():
        return min(8, max(0, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 8)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """A DataLoader with tlkit's defaults: seeded shuffling and augmentation, persistent workers, pinned
    memory on GPU. The same seed gives the same batches and the same augmentations."""
    workers = default_workers() if num_workers is None else num_workers
    workers = min(workers, max(1, len(dataset) // max(1, batch_size)))  # type: ignore[arg-type]  # no idle workers for tiny sets
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)  # in this process (no workers); workers reseed from their own seeds
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker if workers > 0 else None,
        drop_last=drop_last,
    )
