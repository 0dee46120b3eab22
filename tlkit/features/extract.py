"""Manifest + frozen Backbone -> FeatureSet (one row per image), cached on disk.

The cache key is (model, weights digest, preprocessing, precision, dataset fingerprint): change any
of them and the features are recomputed; change nothing and the second call reads the file.
Extraction runs through Lightning's predict loop (tlkit.features.forward), so `devices` spreads it over
several GPUs. A cache hit imports neither torch nor timm: the backbone's identity comes from its card
(tlkit.models.cards), and the model is built only when features must be computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlkit.config import ComputeConfig
from tlkit.core import runtime
from tlkit.core.cache import cache_dir
from tlkit.data.images import load_rgb
from tlkit.data.ingest import Manifest

if TYPE_CHECKING:
    from tlkit.models.backbone import Backbone


@dataclass
class FeatureSet:
    """Features of every image of a manifest, in manifest order.

    Attributes:
        X: (n_images, n_features) float32.
        y: class index per image.
        splits: split name per image.
        classes: class names, indexed by `y`.
        key: the cache key (identifies model, weights, preprocessing and data).
        cached: True when read from the cache rather than computed.
    """

    X: np.ndarray
    y: np.ndarray
    splits: np.ndarray
    classes: list[str]
    key: str
    meta: dict = field(default_factory=dict)
    cached: bool = False

    def subset(self, *splits: str) -> tuple[np.ndarray, np.ndarray]:
        mask = np.isin(self.splits, splits)
        return self.X[mask], self.y[mask]


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _feature_set(X: np.ndarray, manifest: Manifest, *, key: str, meta: dict, cached: bool = False) -> FeatureSet:
    """The rows of X as the manifest's images: their labels and splits, in the manifest's order."""
    return FeatureSet(
        X=X,
        y=manifest.labels(),
        splits=np.array([r.split for r in manifest.records]),
        classes=manifest.classes,
        key=key,
        meta=meta,
        cached=cached,
    )


def _load_cached(path: Path, manifest: Manifest, key: str, meta: dict) -> FeatureSet | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as stored:
            X, hashes = stored["X"], stored["sha256"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache file is recomputed, not trusted
    if list(hashes) != [r.sha256 for r in manifest.records]:
        return None
    return _feature_set(X, manifest, key=key, meta=meta, cached=True)


def _save(path: Path, X: np.ndarray, manifest: Manifest) -> None:
    from tlkit.core.files import replacing

    # a concurrent reader sees the old file or the new one
    with (
        replacing(path) as partial,
        open(partial, "wb") as handle,
    ):
        np.savez(handle, X=X, sha256=np.array([r.sha256 for r in manifest.records]))


def extract_features(
    manifest: Manifest,
    backbone: Backbone,
    *,
    compute: ComputeConfig | None = None,
    use_cache: bool = True,
    progress: bool = True,
    layers: str = "last",
) -> FeatureSet:
    """Run the frozen backbone over every image of the manifest (all splits), or read the cache.

    Args:
        manifest: the dataset.
        backbone: the frozen feature extractor; its data config fixes the preprocessing.
        compute: batch size, DataLoader workers (default: per machine, see data.default_workers), Lightning devices,
            precision ("auto": bf16-mixed where the device runs it natively) and the cache folder (default
            $TLKIT_CACHE or .tlkit/cache).
        use_cache: read an existing cache entry (the result is written either way).
        progress: show a progress bar.
        layers: "last", the backbone's pooled features; or "all", every stage's too (tlkit.models.multilayer).
    """
    compute = compute or ComputeConfig()
    cache = compute.cache_dir
    precision = runtime.resolve_precision(compute.precision)

    def describe() -> tuple[str, dict]:
        meta = {
            "kind": "backbone",
            "model": backbone.name,
            "weights_digest": backbone.digest,
            "transform": backbone.preprocessing,
            "precision": precision,
            "data": manifest.fingerprint,
            **({"layers": layers} if layers != "last" else {}),  # the last layer's keys as they always were
        }
        return _key(meta), meta

    key, meta = describe()
    path = cache_dir(cache) / "features" / f"{key}.npz"
    if use_cache and (found := _load_cached(path, manifest, key, meta)) is not None:
        return found
    from tlkit.data import augment
    from tlkit.data.loaders import ImageDataset, make_loader
    from tlkit.features.forward import forward_loader

    model = backbone.model  # built here when `backbone` came from its card
    width = backbone.num_features
    if layers == "all":
        from tlkit.models.multilayer import MultiLayer

        model = MultiLayer(model, backbone.name)
        width = model.num_features
    key, meta = describe()  # the built model's own digest and preprocessing, should the card have been stale
    path = cache_dir(cache) / "features" / f"{key}.npz"
    dataset = ImageDataset(
        [manifest.abspath(r) for r in manifest.records],
        None,
        augment.ToTensor(augment.eval_transform(backbone.data_config)),
    )
    loader = make_loader(dataset, batch_size=compute.batch_size, num_workers=compute.num_workers)
    X = forward_loader(model, width, loader, devices=compute.devices, precision=precision, progress=progress)
    _save(path, X, manifest)
    return _feature_set(X, manifest, key=key, meta=meta)


def pixel_features(manifest: Manifest, *, size: int = 32, cache: str | os.PathLike | None = None) -> FeatureSet:
    """Raw RGB pixels downscaled to size x size and scaled to [0, 1]: the naive baseline's features."""
    meta = {"kind": "pixels", "size": size, "data": manifest.fingerprint}
    key = _key(meta)
    path = cache_dir(cache) / "features" / f"{key}.npz"
    if (found := _load_cached(path, manifest, key, meta)) is not None:
        return found
    X = np.stack([pixels_of(load_rgb(manifest.abspath(r)), size) for r in manifest.records])
    _save(path, X, manifest)
    return _feature_set(X, manifest, key=key, meta=meta)


def pixels_of(image: np.ndarray, size: int) -> np.ndarray:
    """One RGB uint8 image -> its flattened size x size pixel vector in [0, 1]."""
    from PIL import Image

    small = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(small, dtype=np.float32) / 255.0).reshape(-1)
