"""Loaders: the training seed fixes the batches and the augmentations, in this process and in workers."""

import numpy as np
import torch

from tlkit import augment
from tlkit.data import ImageDataset, make_loader
from test_augment import CONFIG


def augmented_dataset(n=16):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(n)]
    return ImageDataset(images, list(range(n)), augment.ToTensor(augment.train_transform(CONFIG, "heavy")))


def epochs(seed, workers, n_epochs=2):
    loader = make_loader(augmented_dataset(), batch_size=4, shuffle=True, num_workers=workers, seed=seed)
    return [torch.cat([images for images, _, _ in loader]) for _ in range(n_epochs)]


def test_same_seed_same_augmentations_other_seed_others():
    for workers in (0, 2):
        first, again, other = epochs(0, workers), epochs(0, workers), epochs(1, workers)
        assert all(torch.equal(a, b) for a, b in zip(first, again))  # albumentations ignores global seeds: tlkit seeds it
        assert not torch.equal(first[0], other[0])
        assert not torch.equal(first[0], first[1])  # epochs differ from each other


def test_workers_do_not_repeat_each_others_draws():
    dataset = augmented_dataset(2)
    dataset.paths, dataset.labels = [dataset.paths[0]] * 8, [0] * 8  # one image: any difference comes from the random draws
    loader = make_loader(dataset, batch_size=2, shuffle=False, num_workers=2, seed=0)
    batches = [images for images, _, _ in loader]  # batches alternate between the two workers
    assert not torch.equal(batches[0], batches[1])
