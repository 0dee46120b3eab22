"""Every kind of saved model, with two classes and with three: predict, evaluate, explain, attack, export and
the served model give one answer for one image."""

import base64
import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image
from test_cli import assert_one_line_error, invoke

from tlkit.config import (
    BackboneConfig,
    BaselineConfig,
    ComputeConfig,
    EvaluateConfig,
    PretrainConfig,
    TrainConfig,
)
from tlkit.core import tracking
from tlkit.errors import TlkitError
from tlkit.models.network import load_model
from tlkit.review.predict import predict_images
from tlkit.runs.evaluate import run_evaluate, run_explain, run_export
from tlkit.runs.stages import RunOptions, run_baseline, run_train

# kept-probe: a fine-tune of pretrained weights that its frozen probe beat on val, so the run's model is the probe;
# ensemble: a fine-tune of pretrained weights delivered as its average with its probe (--keep ensemble)
# all-layers: an SVM on every stage's features (--layers all, tlkit.models.multilayer)
KINDS = ["finetune", "kept-probe", "ensemble", "svm", "logreg", "all-layers", "pixels"]
CLASSES = [2, 3]
# The matrices that cost the most run two classes in the default suite and three with the slow tests (CI runs both).
CLASSES_2_FAST = [2, pytest.param(3, marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_source, digits_target, digits_pair):
    """One MLflow store for the module: a fine-tuned tiny model, a fine-tune that delivered its probe, and the three
    baselines, on 3 and on 2 classes."""
    folder = tmp_path_factory.mktemp("review")
    models = {"folder": folder}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.configure(None, "review")
        backbone = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)
        compute = ComputeConfig(num_workers=0)
        quiet = RunOptions(progress=False)
        source = PretrainConfig(epochs=2, augment="none")
        pretrained = BackboneConfig(
            weights=run_train(digits_source, backbone, source, compute=compute, run=quiet).model_uri
        )
        for n, data in ((3, digits_target), (2, digits_pair)):
            train = TrainConfig(epochs=4, strategy="full", augment="none", hflip=False, lr=3e-3)
            models[n, "finetune"] = run_train(data, backbone, train, compute=compute, run=quiet)
            # a fine-tune that cannot learn (lr 1e-9): its head stays at its random start, and the probe is kept
            stalled = train.model_copy(update={"epochs": 1, "lr": 1e-9})
            models[n, "kept-probe"] = run_train(data, pretrained, stalled, compute=compute, run=quiet)
            both = train.model_copy(update={"keep": "ensemble"})
            models[n, "ensemble"] = run_train(data, pretrained, both, compute=compute, run=quiet)
            for kind in ("svm", "logreg", "pixels"):
                models[n, kind] = run_baseline(data, backbone, BaselineConfig(classifier=kind), compute=compute)
            every_stage = BaselineConfig(classifier="svm", layers="all")
            models[n, "all-layers"] = run_baseline(data, backbone, every_stage, compute=compute)
            models[n, "data"] = data
    yield models


@pytest.fixture
def here(store, monkeypatch):
    monkeypatch.chdir(store["folder"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(None, "review")
    return store


@pytest.mark.parametrize("n", CLASSES)
def test_a_finetune_that_its_probe_beat_delivers_the_probe_and_says_so(here, n):
    result = here[n, "kept-probe"]
    details, run = result.details, tracking.get_run(result.run_id)
    assert details["kept"] == run.data.params["kept"] == run.data.tags["tlkit.kept"] == "probe"
    scores = details["selection_scores"]
    assert scores["probe"] > scores["finetune"]
    assert run.data.metrics["selection_accuracy_probe"] == scores["probe"]
    assert run.data.metrics["selection_accuracy_finetune"] == scores["finetune"]
    assert run.data.params["selection.kept"] == "the val split (test reports)"
    assert run.data.params["probe_classifier"] == details["probe_classifier"] in ("svm", "logreg")
    assert run.data.params["probe_layers"] == details["probe_layers"] == load_model(result.model_uri).bundle.layers
    # the run's held-out figures are the delivered model's, the fine-tune's beside them
    assert (
        result.metrics["heldout_accuracy"] == details["probe_heldout_accuracy"] == run.data.metrics["heldout_accuracy"]
    )
    assert run.data.metrics["finetune_heldout_accuracy"] == details["finetune_heldout_accuracy"]
    # the saved model is the probe on the pretrained backbone: evaluated afresh, it scores what the probe scored
    evaluation = run_evaluate(result.model_uri, here[n, "data"], EvaluateConfig(split="test"))
    assert evaluation.metrics["test_accuracy"] == pytest.approx(details["probe_heldout_accuracy"])


@pytest.mark.parametrize("n", CLASSES)
def test_a_finetune_kept_as_an_ensemble_is_the_average_of_its_fine_tune_and_probe(here, n):
    result = here[n, "ensemble"]
    details, run = result.details, tracking.get_run(result.run_id)
    assert details["kept"] == run.data.params["kept"] == run.data.tags["tlkit.kept"] == "ensemble"
    assert details["keep"] == "ensemble" and details["selection_scores"] == {}  # insisted: no choice was made
    assert result.metrics["heldout_accuracy"] == details["ensemble_heldout_accuracy"]
    assert run.data.metrics["ensemble_heldout_accuracy"] == details["ensemble_heldout_accuracy"]
    loaded = load_model(result.model_uri)
    assert loaded.bundle.members == ["probe"]
    fine_tune, probe = loaded.network.members
    paths = images_of(here[n, "data"], 4)
    pixels = loaded.pixels(paths)
    with torch.no_grad():
        expected = (torch.softmax(fine_tune(pixels), 1) + torch.softmax(probe(pixels), 1)) / 2
    np.testing.assert_allclose(loaded.predict_proba(paths), expected.numpy(), atol=1e-6)
    # the probe member is the probe as `tlkit baseline` delivers it: the pretrained backbone, the probe's head
    assert float(probe.head.temperature) > 0 and probe.head.linear.out_features == n
    # evaluated afresh, the saved ensemble scores what the run reported for it
    evaluation = run_evaluate(result.model_uri, here[n, "data"], EvaluateConfig(split="test"))
    assert evaluation.metrics["test_accuracy"] == pytest.approx(details["ensemble_heldout_accuracy"])
    with pytest.raises(TlkitError, match="ensemble of two networks"):
        run_export(result.model_uri, "safetensors", here["folder"] / f"timm-{n}")


@pytest.mark.parametrize("n", CLASSES)
def test_an_all_layers_probe_reads_every_stage_and_its_run_says_so(here, n):
    from tlkit.models.multilayer import MultiLayer

    result = here[n, "all-layers"]
    loaded = load_model(result.model_uri)
    assert loaded.bundle.layers == "all" and result.details["layers"] == "all"
    assert tracking.get_run(result.run_id).data.params["layers"] == "all"
    backbone = loaded.network.backbone
    assert isinstance(backbone, MultiLayer)
    # every stage's average and the pooled last layer, each of unit length: the head reads them all
    assert loaded.network.head.linear.in_features == backbone.num_features > backbone.widths[-1] + 1
    with torch.no_grad():
        features = backbone(loaded.network.normalise(loaded.pixels(images_of(here[n, "data"], 3))))
    parts = features.split([*backbone.widths, features.shape[1] - sum(backbone.widths)], dim=1)
    for part in parts:
        np.testing.assert_allclose(part.norm(dim=1).numpy(), 1.0, atol=1e-5)
    # the saved backbone is the plain timm model's: its weights serve as any backbone's (--weights runs:/ID)
    from safetensors.torch import load_file

    folder = tracking.download_artifacts(result.run_id, "model") / "artifacts" / "bundle"
    assert not any(key.startswith("model.") for key in load_file(folder / "backbone.safetensors"))


def images_of(data, n=6):
    every = sorted(Path(data).rglob("*.png"))
    return every[:: max(1, len(every) // n)][:n]


def probabilities_of(rows, classes):
    """predict's top-k rows (k = every class) -> {image: [p(class) in class order]}."""
    table = {}
    for row in rows:
        table.setdefault(row["image"], {})[row["class"]] = row["probability"]
    return {image: [found[c] for c in classes] for image, found in table.items()}


@pytest.mark.parametrize("n", CLASSES_2_FAST)
@pytest.mark.parametrize("kind", KINDS)
def test_predict_evaluate_and_served_model_give_one_answer(here, n, kind):
    import mlflow.pyfunc
    import pandas as pd

    uri, data = here[n, kind].model_uri, here[n, "data"]
    paths = images_of(data)
    rows, _, loaded = predict_images(uri, [str(p) for p in paths], top_k=n)
    assert len(loaded.classes) == n
    assert len(rows) == n * len(paths)
    predicted = probabilities_of(rows, loaded.classes)
    for values in predicted.values():
        assert sum(values) == pytest.approx(1.0, abs=1e-05)
        assert min(values) > 0  # calibrated probabilities for every class, SVMs too

    served = mlflow.pyfunc.load_model(f"{uri}/model")
    as_text = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    for column in (as_text, [p.read_bytes() for p in paths]):
        answer = served.predict(pd.DataFrame({"image": column}))
        assert len(answer) == len(paths)  # one answer per image: none missing, none extra
        for path, (_, row) in zip(paths, answer.iterrows()):
            np.testing.assert_allclose([row[c] for c in loaded.classes], predicted[str(path)], atol=1e-6)
            assert row["class"] == loaded.classes[int(np.argmax(predicted[str(path)]))]

    evaluation = run_evaluate(uri, data, EvaluateConfig(split="test"))
    listed = tracking.client().download_artifacts(
        evaluation.run_id, "predictions.csv", str(here["folder"] / f"eval-{n}-{kind}")
    )
    by_image = {row["image"]: row for row in csv.DictReader(open(listed))}
    for path in paths:
        if str(path) in by_image:  # the test split's images among them
            got = [float(by_image[str(path)][f"probability.{c}"]) for c in loaded.classes]
            np.testing.assert_allclose(got, predicted[str(path)], atol=1e-5)
    assert {"test_accuracy", "test_ece"} <= set(evaluation.metrics)


@pytest.mark.parametrize("n", CLASSES_2_FAST)
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_and_torchscript_exports_give_predicts_probabilities(here, tmp_path, n, kind):
    onnxruntime = pytest.importorskip("onnxruntime")
    uri = here[n, kind].model_uri
    paths = images_of(here[n, "data"], 4)
    loaded = load_model(uri)
    expected = loaded.predict_proba(paths)
    onnx = run_export(uri, "onnx", tmp_path)
    sidecar = json.loads(onnx.files[1].read_text())
    assert sidecar["classes"] == loaded.classes
    assert sidecar["input_size"] == [3, 32, 32]
    assert "probabilities" in sidecar["output"]
    # what the sidecar says to do: resize and crop (tlkit's own preprocessing here), [0, 1], (x - mean) / std
    pixels = loaded.pixels(paths)
    normalised = (
        (pixels - torch.tensor(sidecar["mean"]).view(1, 3, 1, 1)) / torch.tensor(sidecar["std"]).view(1, 3, 1, 1)
    ).numpy()
    session = onnxruntime.InferenceSession(str(onnx.files[0]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": normalised})[0], expected, atol=1e-4)
    script = run_export(uri, "torchscript", tmp_path)
    np.testing.assert_allclose(
        torch.jit.load(str(script.files[0]))(torch.from_numpy(normalised)).detach().numpy(), expected, atol=1e-4
    )
    assert not list(tmp_path.glob(".*partial*"))  # written under a temporary name, renamed when checked


SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera" / "val"


@pytest.fixture(scope="module")
def deployed_photos(tmp_path_factory) -> list[Path]:
    """What a deployer feeds a model: photos smaller and larger than its input, a CMYK JPEG, an EXIF-rotated JPEG, a
    PNG with alpha, a 16-bit PNG, a grey JPEG; and real photos of 0.1-5 MP when ../shared is there."""
    folder = tmp_path_factory.mktemp("deployed")
    rng = np.random.default_rng(1)

    def photo(width, height):
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        image = np.stack([x / width * 255, y / height * 255, (x * y) / (width * height) * 255], axis=-1)
        image += rng.normal(0, 20, image.shape)
        return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))

    photo(20, 30).save(folder / "small.png")
    photo(640, 480).save(folder / "large.jpg", quality=90)  # decoded at reduced size (JPEG draft)
    photo(300, 200).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    photo(400, 300).save(folder / "rotated.jpg", exif=exif.tobytes())
    alpha = photo(50, 70).convert("RGBA")
    alpha.putalpha(Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8)))
    alpha.save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (40, 60)).astype(np.uint16)).save(folder / "sixteen.png")
    photo(90, 120).convert("L").save(folder / "grey.jpg")
    real = sorted(SHARED_PHOTOS.rglob("*.jpg"))[::40][:4] if SHARED_PHOTOS.is_dir() else []
    return sorted(folder.iterdir()) + real


RUNNER = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"


def run_without_torch(code: str) -> np.ndarray:
    """Run `code` (which saves `probabilities` to sys.argv[1]) where torch cannot be imported; its array."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.npy"
        blocked = "import sys; sys.modules['torch'] = None; sys.modules['mlflow'] = None\n"
        done = subprocess.run([sys.executable, "-c", blocked + code, str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return np.load(out)


@pytest.mark.parametrize("n", CLASSES_2_FAST)
@pytest.mark.parametrize("kind", KINDS)
def test_an_onnx_export_alone_gives_predicts_probabilities_without_torch_or_tlkit(here, deployed_photos, n, kind):
    """The sidecar's recipe is enough: examples/onnx_predict.py (Pillow, NumPy, OpenCV, onnxruntime; no torch, no
    tlkit) and tlkit's own ONNX runner give `tlkit predict`'s probabilities for every kind of image."""
    pytest.importorskip("onnxruntime")
    uri = here[n, kind].model_uri
    rows, _, loaded = predict_images(uri, [str(p) for p in deployed_photos], top_k=n)
    expected = probabilities_of(rows, loaded.classes)
    folder = here["folder"] / f"onnx-{n}-{kind}"
    written = run_export(uri, "onnx", folder, force=True).files[0]
    paths = [str(p) for p in deployed_photos]
    standalone = run_without_torch(
        f"sys.path.insert(0, {str(RUNNER.parent)!r}); sys.modules['tlkit'] = None\n"
        "import numpy as np, onnx_predict\n"
        f"np.save(sys.argv[1], onnx_predict.main({str(written)!r}, {paths!r}))"
    )
    ours = run_without_torch(
        "import numpy as np\nfrom tlkit.review.portable import OnnxModel\n"
        f"np.save(sys.argv[1], OnnxModel({str(written)!r}).predict_proba({paths!r}))"
    )
    for i, path in enumerate(paths):
        np.testing.assert_allclose(standalone[i], expected[path], atol=1e-4, err_msg=path)
        np.testing.assert_allclose(ours[i], expected[path], atol=1e-4, err_msg=path)


def test_the_docs_short_runner_gives_predicts_probabilities_for_rgb_photos(here, deployed_photos, tmp_path):
    pytest.importorskip("onnxruntime")
    page = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    code = page.split("the runner fits in twenty lines:\n\n```python\n", 1)[1].split("```", 1)[0]
    uri = here[2, "logreg"].model_uri
    written = run_export(uri, "onnx", tmp_path / "export").files[0]
    rgb = [str(p) for p in deployed_photos if p.name in ("small.png", "large.jpg", "rotated.jpg") or "hymen" in str(p)]
    rows, _, loaded = predict_images(uri, rgb, top_k=2)
    expected = probabilities_of(rows, loaded.classes)
    got = run_without_torch(
        "sys.modules['tlkit'] = None\n"
        + code
        + f"\nnp.save(sys.argv[1], [predict({str(written)!r}, p) for p in {rgb!r}])"
    )
    for path, row in zip(rgb, got):
        np.testing.assert_allclose(row, expected[path], atol=1e-4, err_msg=path)


def test_tlkit_predict_runs_an_onnx_export_without_torch_or_mlflow(here, deployed_photos, tmp_path):
    pytest.importorskip("onnxruntime")
    uri = here[2, "finetune"].model_uri
    written = run_export(uri, "onnx", tmp_path / "export").files[0]
    paths = [str(p) for p in deployed_photos[:3]]
    out = tmp_path / "p.csv"
    run_without_torch(
        "from tlkit.cli import main\ntarget = sys.argv[1]\n"
        f"sys.argv = ['tlkit', 'predict', {str(written)!r}, *{paths!r}, '--top-k', '2', '--out', {str(out)!r}]\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
        "import numpy as np; np.save(target, np.zeros(1))"
    )
    rows, _, loaded = predict_images(uri, paths, top_k=2)
    expected = probabilities_of(rows, loaded.classes)
    got: dict = {}
    for row in csv.DictReader(open(out)):
        got.setdefault(row["image"], {})[row["class"]] = float(row["probability"])
    assert set(got) == set(paths)
    for path in paths:
        np.testing.assert_allclose([got[path][c] for c in loaded.classes], expected[path], atol=1e-4)


def test_the_recipe_is_trainings_evaluation_transform(deployed_photos):
    """tlkit.data.recipe (what every saved model and export uses) resizes and crops exactly as the albumentations
    evaluation transform that scored the model during training, for images smaller and larger than its side."""
    from tlkit.data import augment, recipe
    from tlkit.data.images import load_rgb

    for config in (
        {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic", "mean": (0,) * 3, "std": (1,) * 3},
        {"input_size": (3, 224, 224), "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0,) * 3, "std": (1,) * 3},
    ):
        steps = recipe.preprocessing(config)
        for path in deployed_photos:
            image = load_rgb(path, recipe.eval_side(config))
            np.testing.assert_array_equal(recipe.prepare(image, steps), augment.eval_pixels(config, image))


@pytest.mark.parametrize("n", CLASSES)
@pytest.mark.parametrize("kind", ["finetune", "logreg"])
def test_safetensors_export_loads_into_plain_timm(here, tmp_path, n, kind):
    import timm
    from safetensors.torch import load_file

    written = run_export(here[n, kind].model_uri, "safetensors", tmp_path)
    sidecar = json.loads(written.files[1].read_text())
    model = timm.create_model(sidecar["model"], num_classes=len(sidecar["classes"])).eval()
    model.load_state_dict(load_file(str(written.files[0])))
    loaded = load_model(here[n, kind].model_uri)
    batch = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(
            torch.softmax(model(loaded.network.normalise(batch)), 1).numpy(),
            loaded.probs(loaded.network(batch)).numpy(),
            atol=1e-5,
        )


@pytest.mark.parametrize("kind", ["svm", "pixels", "all-layers"])
def test_safetensors_export_is_refused_where_timm_cannot_hold_the_head(here, tmp_path, kind):
    with pytest.raises(TlkitError, match="export it as --format onnx or torchscript"):
        run_export(here[2, kind].model_uri, "safetensors", tmp_path)


@pytest.mark.parametrize("n", CLASSES_2_FAST)
@pytest.mark.parametrize("kind", KINDS)
def test_explain_maps_every_class_with_two_classes_too(here, tmp_path, n, kind):
    uri = here[n, kind].model_uri
    loaded = load_model(uri)
    paths = images_of(here[n, "data"], 2)
    method = "saliency" if kind == "pixels" else "gradcam"
    for target in loaded.classes:  # class 0 included: a two-class head gives it logits of its own, not a zero row
        folder = tmp_path / target
        result = run_explain(uri, [str(p) for p in paths], method=method, target=target, out=folder)
        assert len(result.files) == 2
        assert (folder / "overview.png").is_file()
    images = loaded.pixels(paths)
    from tlkit.review.explain import saliency

    # every class's score depends on the image (Grad-CAM may rightly find no evidence *for* a class)
    for target in range(n):
        heat = saliency(loaded.network, images, torch.full((len(paths),), target))
        assert np.abs(heat).max() > 0, f"an empty saliency map for class {loaded.classes[target]}"


def test_evaluate_logs_metrics_plots_tta_maps_and_fgsm(here):
    from mlflow import MlflowClient

    uri, data = here[3, "finetune"].model_uri, here[3, "data"]
    result = run_evaluate(
        uri, data, EvaluateConfig(tta=True, explain=2, method="gradcam", attack="fgsm", eps=[2 / 255, 0.05])
    )
    m = result.metrics
    assert {
        "test_accuracy",
        "test_balanced_accuracy",
        "test_macro_f1",
        "test_ece",
        "test_tta_accuracy",
        "test_f1.5",
    } <= set(m)
    assert "test_top3_accuracy" not in m  # 3 classes: top-3 is always right, so it is not reported
    assert m["test_fgsm_accuracy.eps_0.0000"] == pytest.approx(m["test_accuracy"])  # both float32: the same network
    assert m["test_fgsm_accuracy.eps_0.0500"] <= m["test_fgsm_accuracy.eps_0.0000"]
    assert result.details["tta_views"].startswith("image, 4 corner crops")  # trained without flips: no mirror
    client = MlflowClient(tracking.resolve_tracking_uri())
    run = client.get_run(result.run_id)
    assert run.data.tags["tlkit.model_run"] == uri.removeprefix("runs:/")
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {
        "plots/top_losses.png",
        "plots/reliability.png",
        "plots/confusion_matrix.png",
        "plots/confusion_matrix_normalised.png",
        "plots/fgsm_accuracy.png",
        "plots/fgsm_examples.png",
    } <= plots
    maps = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(result.run_id, "explain/top_losses-gradcam")}
    assert len(maps - {"overview.png"}) == 2
    assert "overview.png" in maps


@pytest.mark.parametrize(
    "kind",
    [
        "finetune",
        "ensemble",
        "svm",
        pytest.param("logreg", marks=pytest.mark.slow),
        pytest.param("pixels", marks=pytest.mark.slow),
    ],
)
def test_evaluate_two_classes_with_tta_maps_and_fgsm(here, kind):
    uri, data = here[2, kind].model_uri, here[2, "data"]
    method = "saliency" if kind == "pixels" else "gradcam"
    result = run_evaluate(uri, data, EvaluateConfig(tta=True, explain=1, method=method, attack="fgsm", eps=[0.05]))
    assert {"test_accuracy", "test_ece", "test_tta_accuracy", "test_fgsm_accuracy.eps_0.0500"} <= set(result.metrics)
    assert 0 <= result.metrics["test_ece"] <= 1


def test_evaluate_cli_on_an_svm_reports_calibration(here, runner):
    uri, data = here[3, "svm"].model_uri, here[3, "data"]
    result = invoke(runner, "evaluate", uri, data, "--split", "test")
    assert result.exit_code == 0
    assert "test_ece" in result.stdout
    assert "out-of-fold" in " ".join(result.stdout.split())
    evaluation = tracking.get_run(result.stdout.split("MLflow run ")[1].split()[0])
    # beside the model's run, not in the default experiment
    assert tracking.experiment_id("review") == evaluation.info.experiment_id
    assert_one_line_error(
        invoke(runner, "evaluate", uri, data, "--attack", "pgd"), "'--attack': 'pgd' is not one of 'fgsm'", usage=True
    )
    assert_one_line_error(
        invoke(runner, "explain", here[2, "pixels"].model_uri, str(images_of(data, 1)[0]), "--method", "gradcam"),
        "pixels baseline has none",
    )


@pytest.mark.parametrize("kind", ["svm", "logreg", "all-layers", "pixels", "finetune", "kept-probe", "ensemble"])
def test_every_model_logs_its_calibration_on_the_heldout_split(here, kind):
    for n in CLASSES:
        m = here[n, kind].metrics
        assert {"heldout_ece", "heldout_ece_uncalibrated", "temperature"} <= set(m), m
        assert 0 < m["temperature"] < 50


def test_explain_cli_writes_one_png_per_image(here, runner, tmp_path):
    uri, data = here[3, "finetune"].model_uri, here[3, "data"]
    paths = [str(p) for p in images_of(data, 2)]
    for method in ("saliency", "gradcam", "occlusion"):
        result = invoke(runner, "explain", uri, *paths, "--method", method, "--out", tmp_path / method, "--target", "6")
        assert result.exit_code == 0, result.output
        assert len(list((tmp_path / method).glob(f"*-{method}.png"))) == 2
        assert (tmp_path / method / "overview.png").is_file()
    assert_one_line_error(invoke(runner, "explain", uri, paths[0], "--target", "9"), "--target '9' is not a class")
    assert_one_line_error(
        invoke(runner, "explain", uri, paths[0], "--method", "lime"),
        "'--method': 'lime' is not one of 'saliency', 'gradcam', 'occlusion'",
        usage=True,
    )


def test_backbone_filters_cli(here, runner, tmp_path):
    result = invoke(runner, "backbone", "filters", here[3, "finetune"].model_uri, "--out", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "f.png").stat().st_size > 1000, result.output


def test_predict_cli_two_classes_prints_probabilities(here, runner, tmp_path):
    uri, data = here[2, "svm"].model_uri, here[2, "data"]
    result = invoke(runner, "predict", uri, str(images_of(data, 1)[0]), "--top-k", "5", "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert sum(float(r["probability"]) for r in rows) == pytest.approx(1.0, abs=1e-05)


class _Marker:
    """Unpickling this creates a file: the test's proof that a pickle was (not) loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def test_a_model_folder_holding_a_pickle_is_refused_and_never_unpickled(here, tmp_path, runner):
    import shutil

    loaded_folder = tracking.download_artifacts(here[2, "logreg"].run_id, "model")
    folder = tmp_path / "model"
    shutil.copytree(loaded_folder / "artifacts" / "bundle", folder)
    (
        folder / "head.safetensors"
    ).unlink()  # as tlkit 0.1 saved a baseline: estimator.joblib instead of the head's tensors
    marker = tmp_path / "executed"
    (folder / "estimator.joblib").write_bytes(pickle.dumps(_Marker(str(marker))))
    image = str(images_of(here[2, "data"], 1)[0])
    for command in (
        ["predict", folder, image],
        ["explain", folder, image],
        ["export", folder, "--out", tmp_path / "x"],
    ):
        assert_one_line_error(invoke(runner, *command), "estimator.joblib, a pickle", "fit the baseline again")
    assert not marker.exists()


def test_a_damaged_head_is_one_line(here, tmp_path, runner):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tracking.download_artifacts(here[2, "svm"].run_id, "model") / "artifacts" / "bundle", folder)
    head = folder / "head.safetensors"
    head.write_bytes(head.read_bytes()[:40])
    assert_one_line_error(
        invoke(runner, "predict", folder, str(images_of(here[2, "data"], 1)[0])), "head.safetensors", "damaged"
    )


def test_served_model_never_reads_a_path(here):
    import mlflow.pyfunc
    import pandas as pd

    from tlkit.review.serving import Refused

    served = mlflow.pyfunc.load_model(f"{here[2, 'finetune'].model_uri}/model")
    image = images_of(here[2, "data"], 1)[0]
    messages = []
    for value in (str(image), "/etc/passwd", "/etc/nonexistent-file", "not base64 at all!"):
        with pytest.raises(Refused) as refused:
            served.predict(pd.DataFrame({"image": [value]}))
        messages.append(refused.value.message)
    assert len(set(messages)) == 1
    assert "not a base64-encoded image (JPEG, PNG, WebP, TIFF, BMP or GIF)" in messages[0]  # no file-exists oracle
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PCX")  # a format Pillow reads, photos do not come in
    with pytest.raises(Refused, match="not a base64-encoded image"):
        served.predict(pd.DataFrame({"image": [base64.b64encode(png.getvalue()).decode()]}))


def test_served_model_reads_every_format_and_mode_tlkit_trains_on(here, tmp_path):
    """TIFF (16-bit, CMYK), BMP, GIF, a 16-bit PNG and a CMYK JPEG: served as bytes, the answer `tlkit predict` gives
    for the same file."""
    import mlflow.pyfunc
    import pandas as pd

    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    files = {
        "photo.tif": rgb,
        "cmyk.tif": rgb.convert("CMYK"),
        "sixteen.tif": Image.fromarray(rng.integers(0, 65535, (40, 50)).astype(np.uint16)),
        "photo.bmp": rgb,
        "photo.gif": rgb.convert("P"),
        "sixteen.png": Image.fromarray(rng.integers(0, 65535, (40, 50)).astype(np.uint16)),
        "cmyk.jpg": rgb.convert("CMYK"),
    }
    paths = []
    for name, image in files.items():
        image.save(tmp_path / name)
        paths.append(tmp_path / name)
    uri = here[2, "finetune"].model_uri
    rows, _, loaded = predict_images(uri, [str(p) for p in paths], top_k=2)
    expected = probabilities_of(rows, loaded.classes)
    served = mlflow.pyfunc.load_model(f"{uri}/model")
    answer = served.predict(pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in paths]}))
    for path, (_, row) in zip(paths, answer.iterrows()):
        np.testing.assert_allclose([row[c] for c in loaded.classes], expected[str(path)], atol=1e-6, err_msg=path.name)


def test_evaluate_scores_the_split_the_model_reported_on_by_default(tracked, workdir, digits_pair, runner):
    import shutil

    data = workdir / "trainval"  # a train/ val/ tree (no test split), as most photo folders come
    for i, path in enumerate(sorted(Path(digits_pair).rglob("*.png"))):
        target = data / ("val" if i % 4 == 0 else "train") / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    model = run_baseline(
        data,
        BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32),
        BaselineConfig(classifier="pixels"),
        compute=ComputeConfig(num_workers=0),
    )
    assert model.details["heldout_split"] == "val"
    result = invoke(runner, "evaluate", model.model_uri, data)
    assert result.exit_code == 0, result.output
    assert "on the val split" in " ".join(result.stdout.split())
    assert "val_accuracy" in result.stdout
    assert_one_line_error(
        invoke(runner, "evaluate", model.model_uri, data, "--split", "test"), "no 'test' split", "it has: train, val"
    )
