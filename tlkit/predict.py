"""A saved model (runs:/RUN_ID or a bundle folder) + image files -> class scores, top-k rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tlkit import augment, bundle, runtime
from tlkit.backbone import create_model, feature_width, load_state
from tlkit.data import ImageDataset, make_loader
from tlkit.errors import TlkitError
from tlkit.features import pixels_of
from tlkit.images import BadImage, inspect_image, load_rgb


@torch.inference_mode()
def infer(module: torch.nn.Module, loader, *, precision: str = "32-true") -> np.ndarray:
    """Outputs of `module` for every item of `loader`, in order (autocast per `precision`)."""
    module.eval()
    device = next(module.parameters()).device
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    enabled = precision.startswith(("bf16", "16"))
    out = []
    for images, _, _ in loader:
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            out.append(module(images).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class Predictor:
    """Scores images exactly as the model's run preprocessed them."""

    bundle: bundle.Bundle
    backbone: torch.nn.Module | None
    head: torch.nn.Module | None
    estimator: object | None

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def score_name(self) -> str:
        """'probability', or 'score' for an SVM (its decision values are not probabilities)."""
        if self.estimator is not None and not hasattr(self.estimator, "predict_proba"):
            return "score"
        return "probability"

    def _features(self, paths: list[Path], batch_size: int, precision: str) -> np.ndarray:
        if self.bundle.features == "pixels":
            return np.stack([pixels_of(p if isinstance(p, np.ndarray) else load_rgb(p), self.bundle.pixel_size or 32) for p in paths])
        transform = augment.eval_transform(self.bundle.data_config)
        loader = make_loader(ImageDataset(paths, None, augment.ToTensor(transform)), batch_size=batch_size, num_workers=0)
        return infer(self.backbone, loader, precision=precision)

    def scores(self, paths: list[Path | np.ndarray], *, batch_size: int = 64, precision: str = "auto") -> np.ndarray:
        """(n_images, n_classes) for image files or decoded HxWx3 uint8 arrays: probabilities, or SVM
        decision values (see `score_name`)."""
        precision = runtime.resolve_precision(precision)
        features = self._features(paths, batch_size, precision)
        if self.estimator is not None:
            if hasattr(self.estimator, "predict_proba"):
                return self.estimator.predict_proba(features)
            return self.estimator.decision_function(features)
        with torch.inference_mode():
            logits = self.head(torch.from_numpy(features))
        return torch.softmax(logits.float(), dim=1).numpy()


def load_predictor(ref: str, *, tracking_uri: str | None = None) -> Predictor:
    """Load the model that a `baseline`, `pretrain` or `finetune` run saved."""
    folder, saved = bundle.fetch_bundle(ref, tracking_uri=tracking_uri)
    backbone = head = estimator = None
    if saved.features == "backbone":
        backbone = create_model(saved.model_name, img_size=int(saved.data_config["input_size"][-1]))
        load_state(backbone, bundle.backbone_state(folder), source=ref, name=saved.model_name)
        backbone = backbone.eval().to(memory_format=torch.channels_last)
    if saved.kind == "baseline":
        estimator = bundle.load_estimator(folder)
    else:
        head = torch.nn.Linear(feature_width(backbone), len(saved.classes))
        head.load_state_dict(bundle.head_state(folder))
    return Predictor(saved, backbone, head, estimator)


def decode_images(values: list) -> list[np.ndarray]:
    """Served inputs -> HxWx3 uint8 arrays: image file paths, encoded image bytes, or base64 strings of them."""
    import base64
    import binascii
    import io

    from PIL import Image, ImageOps

    from tlkit.images import to_rgb

    images = []
    for i, value in enumerate(values):
        data = value
        if isinstance(value, str):
            if Path(value).is_file():
                images.append(load_rgb(value))
                continue
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise TlkitError(f"input {i}: {value[:60]!r} is neither an image file path nor base64-encoded image bytes") from None
        try:
            with Image.open(io.BytesIO(bytes(data))) as image:
                images.append(np.asarray(to_rgb(ImageOps.exif_transpose(image))))
        except Exception:
            raise TlkitError(f"input {i}: the bytes are not an image PIL can decode") from None
    return images


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


def top_k_rows(predictor: Predictor, paths: list[Path], scores: np.ndarray, top_k: int) -> list[dict]:
    """One row per (image, rank): image, rank, class, and the probability or score."""
    k = max(1, min(top_k, len(predictor.classes)))
    rows = []
    for path, row in zip(paths, scores):
        for rank, index in enumerate(np.argsort(-row)[:k], start=1):
            rows.append({"image": str(path), "rank": rank, "class": predictor.classes[index], predictor.score_name: float(row[index])})
    return rows


def predict_images(ref: str, images: list[str], *, top_k: int = 1, tracking_uri: str | None = None) -> tuple[list[dict], list[tuple[str, str]], Predictor]:
    """Top-k classes for each image; unusable files are returned as skipped, not fatal."""
    if top_k < 1:
        raise TlkitError(f"--top-k must be at least 1, got {top_k}")
    predictor = load_predictor(ref, tracking_uri=tracking_uri)
    paths, skipped = expand_images(images)
    if not paths:
        detail = f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise TlkitError(f"no usable images among the {len(images)} path(s) given{detail}; pass image files or folders")
    return top_k_rows(predictor, paths, predictor.scores(paths), top_k), skipped, predictor
