"""Loaders: the training seed fixes the batches and the augmentations, in this process and in workers."""

import numpy as np
import torch
from test_augment import CONFIG

from tlkit.data import augment
from tlkit.data.loaders import ImageDataset, make_loader


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
        # albumentations ignores global seeds: tlkit seeds it
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not torch.equal(first[0], other[0])
        assert not torch.equal(first[0], first[1])  # epochs differ from each other


def test_workers_do_not_repeat_each_others_draws():
    dataset = augmented_dataset(2)
    # one image: any difference comes from the random draws
    dataset.paths, dataset.labels = (
        [dataset.paths[0]] * 8,
        [0] * 8,
    )
    loader = make_loader(dataset, batch_size=2, shuffle=False, num_workers=2, seed=0)
    batches = [images for images, _, _ in loader]  # batches alternate between the two workers
    assert not torch.equal(batches[0], batches[1])


def photo_files(folder, n=6):
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (480, 640) if i % 2 else (300, 200)
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=85)
        paths.append(path)
    return paths


def test_decoded_images_give_the_same_batches_as_decoding_every_epoch(tmp_path):
    """In memory, on disk (memory budget 0) or not cached at all: bit-identical augmented batches."""
    import hashlib

    from tlkit.data.loaders import DecodedImages

    paths = photo_files(tmp_path / "img")
    transform = augment.ToTensor(augment.train_transform(CONFIG, "medium"))
    side = transform.decode_side
    assert side is not None
    assert side < 300  # these JPEGs are decoded reduced
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    sizes = [Image_size(p) for p in paths]

    def batches(decoded):
        dataset = ImageDataset(paths, list(range(len(paths))), transform, decoded)
        loader = make_loader(dataset, batch_size=3, shuffle=True, num_workers=0, seed=4)
        return [torch.cat([images for images, _, _ in loader]) for _ in range(2)]

    plain = batches(None)
    in_memory = DecodedImages(paths, digests, sizes, side, memory_mb=100, cache=tmp_path / "cache")
    on_disk = DecodedImages(paths, digests, sizes, side, memory_mb=0, cache=tmp_path / "cache")
    assert in_memory.in_memory
    assert not on_disk.in_memory
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == len(paths)
    for cached in (in_memory, on_disk):
        assert all(torch.equal(a, b) for a, b in zip(plain, batches(cached)))
    # a later run reads the files
    again = DecodedImages(paths, digests, sizes, side, memory_mb=0, cache=tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(plain, batches(again)))


def Image_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size
