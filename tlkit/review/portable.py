"""An exported ONNX model and its JSON sidecar -> class probabilities, without torch or MLflow.

The sidecar's `preprocessing` spells out every step between an image file and the network's input
(tlkit.data.recipe), so that a deployer can reproduce `tlkit predict` from it alone (docs/serving.md has a runner
in twenty lines that imports neither torch nor tlkit). This module is tlkit's own such runner: `tlkit predict
model.onnx photo.jpg` and `tlkit.load("model.onnx")` use it. It imports Pillow, NumPy, OpenCV and onnxruntime.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.data.recipe import decoded, normalise, prepare
from tlkit.errors import TlkitError


class OnnxModel:
    """An exported ONNX model (with its sidecar beside it) on onnxruntime: predict_proba and predict as
    `tlkit.load` gives them for any model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        sidecar = self.path.with_suffix(".json")
        if not self.path.is_file() or not sidecar.is_file():
            raise TlkitError(
                f"{self.path} needs its model file and the JSON sidecar beside it ({sidecar.name}); export both with "
                "`tlkit export MODEL --format onnx`"
            )
        self.sidecar = json.loads(sidecar.read_text())
        if "preprocessing" not in self.sidecar:
            raise TlkitError(
                f"{sidecar} has no preprocessing recipe (exported by tlkit before 0.5); export the model again"
            )
        try:
            import onnxruntime
        except ImportError:
            raise TlkitError("running an ONNX model needs onnxruntime: pip install 'tlkit[export]'") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    @property
    def classes(self) -> list[str]:
        return list(self.sidecar["classes"])

    def predict_proba(self, images: Sequence[Any], *, batch_size: int = 64) -> np.ndarray:
        """(n_images, n_classes) calibrated class probabilities, float32."""
        recipe = self.sidecar["preprocessing"]
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([prepare(decoded(item, recipe), recipe) for item in images[start : start + batch_size]])
            out.append(self.session.run(None, {self.session.get_inputs()[0].name: normalise(batch, recipe)})[0])
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict(self, images: Sequence[Any]) -> list[str]:
        """The most probable class of each image."""
        probabilities = self.predict_proba(images)
        return [self.classes[i] for i in probabilities.argmax(axis=1)]
