"""Manifest rows + transform -> torch Dataset and DataLoader."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tlkit.images import load_rgb


class ImageDataset(Dataset):
    """Decodes image files (or takes decoded HxWx3 arrays) and applies a transform; items are (image tensor, label, index)."""

    def __init__(self, paths: Sequence[Path | np.ndarray], labels: Sequence[int] | None, transform: Callable[[np.ndarray], torch.Tensor]):
        self.paths = [p if isinstance(p, np.ndarray) else str(p) for p in paths]
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        item = self.paths[index]
        return self.transform(item if isinstance(item, np.ndarray) else load_rgb(item)), self.labels[index], index

    def reseed(self, seed: int) -> None:
        """Seed the transform's own random state, where it has one (augmentations do)."""
        if hasattr(self.transform, "reseed"):
            self.transform.reseed(seed)


def _seed_worker(worker_id: int) -> None:
    """A worker's augmentations follow its torch seed: distinct per worker, reproducible from the loader's
    generator. (A copy of one seeded transform in every worker would repeat the same random draws.)"""
    dataset = torch.utils.data.get_worker_info().dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(torch.initial_seed() % 2**32)


def default_workers() -> int:
    """DataLoader worker processes for this machine.

    With a GPU, decoding in workers keeps the GPU fed. On a CPU the model's own threads already use
    every core, and worker processes preempt them: on 2 cores, decoding in the main process was
    measured faster (bench/extract.py: 0.76 of the bare forward pass, vs 0.69 with one worker and
    0.65 with two), so small CPU-only machines use none and larger ones a few.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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
    workers = min(workers, max(1, len(dataset) // max(1, batch_size)))  # no idle workers for tiny sets
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
