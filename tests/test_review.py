"""Evaluate, explain, export and serve saved models, through the library and the CLI."""

import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from test_cli import assert_one_line_error, invoke
from test_ui import free_port, serving
from tlkit import tracking
from tlkit.config import BackboneConfig, BaselineConfig, ComputeConfig, TrainConfig
from tlkit.errors import TlkitError
from tlkit.network import load_network
from tlkit.predict import load_predictor, predict_images
from tlkit.review import run_evaluate, run_export
from tlkit.stages import run_baseline, run_train


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_target):
    """One MLflow store for the module, with a fine-tuned tiny model and two baselines in it."""
    folder = tmp_path_factory.mktemp("review")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.configure(None, "review")
        backbone = BackboneConfig(model=TINY_MODEL, img_size=32)
        compute = ComputeConfig(num_workers=0)
        tuned = run_train("finetune", digits_target, backbone, TrainConfig(epochs=4, strategy="full", augment="none", hflip=False, lr=3e-3), compute=compute, progress=False)
        svm = run_baseline(digits_target, backbone, BaselineConfig(classifier="svm"), compute=compute)
        logreg = run_baseline(digits_target, backbone, BaselineConfig(classifier="logreg"), compute=compute)
        pixels = run_baseline(digits_target, backbone, BaselineConfig(classifier="pixels"), compute=compute)
        yield {"folder": folder, "finetune": tuned.model_uri, "svm": svm.model_uri, "logreg": logreg.model_uri, "pixels": pixels.model_uri}


@pytest.fixture
def here(store, monkeypatch):
    monkeypatch.chdir(store["folder"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(None, "review")
    return store


def images_of(digits_target, n=6):
    return sorted(Path(digits_target).rglob("*.png"))[:: 90 // n][:n]


@pytest.mark.parametrize("kind", ["finetune", "svm", "logreg"])
def test_network_scores_match_the_saved_model(here, digits_target, kind):
    paths = images_of(digits_target)
    loaded = load_network(here[kind])
    with torch.no_grad():
        scores = loaded.probs(loaded.network(loaded.pixels(paths))).numpy()
    expected = load_predictor(here[kind]).scores(paths, precision="32-true")
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert loaded.probabilities == (kind != "svm")


def test_pixels_baseline_has_no_network(here):
    with pytest.raises(TlkitError, match="pixels baseline: it has no network"):
        load_network(here["pixels"])


def test_evaluate_logs_metrics_plots_tta_maps_and_fgsm(here, digits_target):
    from mlflow import MlflowClient

    result = run_evaluate(here["finetune"], digits_target, tta=True, explain_top=2, method="gradcam", attack="fgsm", eps=[2 / 255, 0.05])
    m = result.metrics
    assert {"test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_ece", "test_tta_accuracy", "test_f1.5"} <= set(m)
    assert "test_top3_accuracy" not in m  # 3 classes: top-3 is always right, so it is not reported
    assert m["test_fgsm_accuracy.eps_0.0000"] == pytest.approx(m["test_accuracy"], abs=0.02)
    assert m["test_fgsm_accuracy.eps_0.0500"] <= m["test_fgsm_accuracy.eps_0.0000"]
    assert result.details["tta_views"].startswith("image, 4 corner crops")  # trained without flips: no mirror
    client = MlflowClient(tracking.resolve_tracking_uri())
    run = client.get_run(result.run_id)
    assert run.data.tags["tlkit.model_run"] == here["finetune"].removeprefix("runs:/")
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/top_losses.png", "plots/reliability.png", "plots/confusion_matrix.png", "plots/confusion_matrix_normalised.png",
            "plots/fgsm_accuracy.png", "plots/fgsm_examples.png"} <= plots
    maps = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(result.run_id, "explain/top_losses-gradcam")}
    assert len(maps - {"overview.png"}) == 2 and "overview.png" in maps


def test_evaluate_an_svm_says_why_there_is_no_calibration(here, digits_target, runner):
    result = invoke(runner, "evaluate", here["svm"], digits_target, "--split", "test")
    assert result.exit_code == 0 and "an SVM gives scores, not probabilities" in result.stdout and "test_ece" not in result.stdout
    evaluation = tracking.get_run(result.stdout.split("MLflow run ")[1].split()[0])
    assert tracking.experiment_id("review") == evaluation.info.experiment_id  # beside the model's run, not in the default experiment
    assert_one_line_error(invoke(runner, "evaluate", here["pixels"], digits_target, "--tta"), "pixels baseline")
    assert_one_line_error(invoke(runner, "evaluate", here["svm"], digits_target, "--attack", "pgd"), "unknown attack 'pgd'")


def test_explain_cli_writes_one_png_per_image(here, digits_target, runner, tmp_path):
    paths = [str(p) for p in images_of(digits_target, 2)]
    for method in ("saliency", "gradcam", "occlusion"):
        result = invoke(runner, "explain", here["finetune"], *paths, "--method", method, "--out", tmp_path / method, "--target", "6")
        assert result.exit_code == 0, result.output
        assert len(list((tmp_path / method).glob(f"*-{method}.png"))) == 2 and (tmp_path / method / "overview.png").is_file()
    assert_one_line_error(invoke(runner, "explain", here["finetune"], paths[0], "--target", "9"), "--target '9' is not a class")
    assert_one_line_error(invoke(runner, "explain", here["finetune"], paths[0], "--method", "lime"), "unknown method 'lime'")


def test_backbone_filters_cli(here, runner, tmp_path):
    result = invoke(runner, "backbone", "filters", here["finetune"], "--out", tmp_path / "f.png")
    assert result.exit_code == 0 and (tmp_path / "f.png").stat().st_size > 1000, result.output


@pytest.mark.parametrize("kind", ["finetune", "svm"])
def test_onnx_and_torchscript_round_trips_match(here, tmp_path, kind):
    onnxruntime = pytest.importorskip("onnxruntime")
    loaded = load_network(here[kind])
    batch = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.network(batch).numpy()
    normalised = ((batch - loaded.network.mean) / loaded.network.std).numpy()
    onnx = run_export(here[kind], "onnx", tmp_path)
    session = onnxruntime.InferenceSession(str(onnx.files[0]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": normalised})[0], expected, atol=1e-4)
    script = run_export(here[kind], "torchscript", tmp_path)
    np.testing.assert_allclose(torch.jit.load(str(script.files[0]))(torch.from_numpy(normalised)).detach().numpy(), expected, atol=1e-4)
    sidecar = json.loads(onnx.files[1].read_text())
    assert sidecar["classes"] == ["5", "6", "7"] and sidecar["input_size"] == [3, 32, 32] and len(sidecar["mean"]) == 3
    assert sidecar["softmax_is_probability"] == (kind != "svm") and "interpolation" in sidecar


def test_safetensors_export_loads_into_plain_timm(here, tmp_path):
    import timm
    from safetensors.torch import load_file

    written = run_export(here["finetune"], "safetensors", tmp_path)
    sidecar = json.loads(written.files[1].read_text())
    model = timm.create_model(sidecar["model"], num_classes=len(sidecar["classes"])).eval()
    model.load_state_dict(load_file(str(written.files[0])))
    loaded = load_network(here["finetune"])
    batch = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(model(loaded.network.normalise(batch)).numpy(), loaded.network(batch).numpy(), atol=1e-5)
    with pytest.raises(TlkitError, match="export it as --format onnx or torchscript"):
        run_export(here["svm"], "safetensors", tmp_path)


def test_mlflow_models_serve_answers_like_tlkit_predict(here, digits_target):
    import base64

    paths = images_of(digits_target, 3)
    rows, _, predictor = predict_images(here["finetune"], [str(p) for p in paths], top_k=3)
    port = free_port()
    env_path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # it execs uvicorn from the environment
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"{here['finetune']}/model", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    os.environ["MLFLOW_TRACKING_URI"] = tracking.resolve_tracking_uri()
    old_path, os.environ["PATH"] = os.environ["PATH"], env_path
    try:
        with serving(command, port, ping="/ping") as base:
            data = [[str(paths[0])], [base64.b64encode(paths[1].read_bytes()).decode()], [str(paths[2])]]
            request = urllib.request.Request(f"{base}/invocations", data=json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())["predictions"]
    finally:
        os.environ["PATH"] = old_path
        del os.environ["MLFLOW_TRACKING_URI"]
    expected = {(row["image"], row["class"]): row["probability"] for row in rows}
    for path, served in zip(paths, answer):
        for name in predictor.classes:
            assert served[name] == pytest.approx(expected[(str(path), name)], abs=1e-3)
        assert served["class"] == max(predictor.classes, key=lambda c: served[c])
