"""A saved model (runs:/RUN_ID or a model folder) + image files -> calibrated class probabilities, top-k rows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlkit.data.images import BadImage, inspect_image
from tlkit.errors import TlkitError

if TYPE_CHECKING:  # torch loads with the model, not with this module: an ONNX model is predicted without it
    from tlkit.models.network import LoadedModel


def expand_images(items: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files and folders (searched recursively) -> (usable image files, [(path, why skipped)])."""
    paths, skipped = [], []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            skipped.append((item, "does not exist"))
            continue
        for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            try:
                inspect_image(file)
                paths.append(file)
            except BadImage as bad:
                skipped.append((str(file), bad.reason))
    return paths, skipped


def top_k_rows(classes: list[str], paths: list[Path], probabilities: np.ndarray, top_k: int) -> list[dict]:
    """One row per (image, rank): image, rank, class, probability (ties: the earlier class first)."""
    k = max(1, min(top_k, len(classes)))
    rows = []
    for path, row in zip(paths, probabilities):
        for rank, index in enumerate(np.argsort(-row, kind="stable")[:k], start=1):
            rows.append({"image": str(path), "rank": rank, "class": classes[index], "probability": float(row[index])})
    return rows


def usable_images(images: list[str], top_k: int) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files among `images` (folders searched) and the skipped ones; an error when none is usable."""
    if top_k < 1:
        raise TlkitError(f"--top-k must be at least 1, got {top_k}")
    paths, skipped = expand_images(images)  # before the model loads: a wrong folder is said at once
    if not paths:
        detail = f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise TlkitError(f"no usable images among the {len(images)} path(s) given{detail}; pass image files or folders")
    return paths, skipped


def predict_images(
    ref: str, images: list[str], *, top_k: int = 1, tracking_uri: str | None = None
) -> tuple[list[dict], list[tuple[str, str]], LoadedModel]:
    """Top-k classes for each image; unusable files are returned as skipped, not fatal."""
    from tlkit.models.network import load_model

    paths, skipped = usable_images(images, top_k)
    model = load_model(ref, tracking_uri=tracking_uri)
    return top_k_rows(model.classes, paths, model.predict_proba(paths), top_k), skipped, model


def predict_onnx(model: str, images: list[str], *, top_k: int = 1) -> tuple[list[dict], list[tuple[str, str]]]:
    """predict_images for an exported ONNX model (its sidecar beside it), on onnxruntime: no torch, no MLflow."""
    from tlkit.review.portable import OnnxModel

    paths, skipped = usable_images(images, top_k)
    loaded = OnnxModel(model)
    return top_k_rows(loaded.classes, paths, loaded.predict_proba(paths), top_k), skipped
