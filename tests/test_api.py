"""tlkit from Python (tlkit/api.py): load any model form and predict paths, PIL images and arrays alike; fit a
baseline and a fine-tune without the command line."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_MODEL
from PIL import Image

import tlkit
from tlkit.errors import TlkitError


def test_importing_tlkit_loads_no_heavy_library():
    code = "import sys, tlkit; print(sorted(m for m in ('torch', 'mlflow', 'timm', 'lightning') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_fit_load_and_predict_from_python_two_classes(tracked, digits_pair, tmp_path):
    backbone = {"model": TINY_MODEL, "img_size": 32, "pretrained": False}
    probe = tlkit.baseline(digits_pair, **backbone, classifier="logreg")
    tuned = tlkit.finetune(digits_pair, **backbone, epochs=1, augment="none", hflip=False)
    assert probe.metrics["heldout_accuracy"] > 0.5
    assert tuned.model_uri.startswith("runs:/")
    files = sorted(digits_pair.rglob("*.png"))[:3]
    for result in (probe, tuned):
        model = tlkit.load(result.model_uri)
        assert model.classes == ["3", "8"]
        from_files = model.predict_proba(files)
        pil = [Image.open(f) for f in files]
        arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        np.testing.assert_allclose(model.predict_proba(pil), from_files, atol=1e-6)
        np.testing.assert_allclose(model.predict_proba(arrays), from_files, atol=1e-6)
        assert model.predict(files) == [model.classes[i] for i in from_files.argmax(1)]
        assert from_files.shape == (3, 2)


def test_bad_input_is_one_clear_error(tracked, digits_pair):
    with pytest.raises(TlkitError, match="name a backbone"):
        tlkit.baseline(digits_pair)
    with pytest.raises(TlkitError, match="sidecar"):
        tlkit.load(digits_pair / "missing.onnx")
