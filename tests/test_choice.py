"""Which model a fine-tune delivers: the split that chooses, the probe's score there, the rule, and the run's record."""

from collections import Counter

import numpy as np
import pytest
from conftest import TINY_MODEL
from test_cli import assert_one_line_error, invoke
from typer.testing import CliRunner

from tlkit.config import BackboneConfig, ComputeConfig, PretrainConfig, SplitConfig, TrainConfig
from tlkit.data.ingest import ingest
from tlkit.features.extract import FeatureSet
from tlkit.runs.stages import RunOptions, run_train
from tlkit.train.choice import SELECT, choice_splits, choose, probe_selection_accuracy, with_splits_of

CPU = ComputeConfig(num_workers=0)
QUIET = RunOptions(progress=False)


def test_val_chooses_when_a_test_split_reports(digits_target):
    manifest = ingest(digits_target)
    splits = choice_splits(manifest, use_val="select", seed=0)
    assert splits is not None and splits.split == "val"
    assert splits.manifest is manifest  # nothing held back: val already reports nothing


@pytest.mark.parametrize("case", ["no test split", "val trained on"])
def test_otherwise_a_share_of_each_class_of_train_is_held_back(digits_target, case):
    manifest = ingest(digits_target, test=0.0) if case == "no test split" else ingest(digits_target)
    splits = choice_splits(manifest, use_val="select" if case == "no test split" else "train", seed=3)
    assert splits is not None and splits.split == SELECT
    before = {r.path: r.split for r in manifest.records}
    after = {r.path: r.split for r in splits.manifest.records}
    held = [p for p, s in after.items() if s == SELECT]
    assert all(before[p] == "train" for p in held)  # only training images are held back
    assert {p: s for p, s in after.items() if p not in held} == {p: s for p, s in before.items() if p not in held}
    per_class = Counter(r.label for r in splits.manifest.split(SELECT))
    train_per_class = Counter(r.label for r in manifest.split("train"))
    assert set(per_class) == set(train_per_class)
    for label, n in per_class.items():
        assert n == round(0.2 * train_per_class[label])
    again = choice_splits(manifest, use_val="select" if case == "no test split" else "train", seed=3)
    assert again is not None and again.manifest.records == splits.manifest.records  # a resumed run holds back the same


def test_no_choice_where_every_class_has_one_training_image(tmp_path):
    from tlkit.data.samples import write_digits

    write_digits(tmp_path / "d", classes=[1, 7], per_class=2, size=16, seed=0)
    manifest = ingest(tmp_path / "d", val=0.5, test=0.0)
    assert all(n == 1 for n in Counter(r.label for r in manifest.split("train")).values())
    assert choice_splits(manifest, use_val="select", seed=0) is None


def test_the_higher_selection_score_is_kept_a_tie_keeps_the_probe_and_keep_insists():
    assert choose({"finetune": 0.8, "probe": 0.9}, "best") == "probe"
    assert choose({"finetune": 0.9, "probe": 0.8}, "best") == "finetune"
    assert choose({"finetune": 0.85, "probe": 0.85}, "best") == "probe"
    assert choose({"finetune": 0.1, "probe": 0.9}, "finetune") == "finetune"
    assert choose({"finetune": 0.9, "probe": 0.1}, "probe") == "probe"
    assert choose({"finetune": 0.9, "probe": 0.1, "ensemble": 0.1}, "ensemble") == "ensemble"


def test_the_ensemble_is_kept_only_where_it_beats_both_single_models():
    assert choose({"finetune": 0.8, "probe": 0.85, "ensemble": 0.9}, "best") == "ensemble"
    assert choose({"finetune": 0.9, "probe": 0.85, "ensemble": 0.9}, "best") == "finetune"  # one network, not two
    assert choose({"finetune": 0.8, "probe": 0.9, "ensemble": 0.9}, "best") == "probe"
    assert choose({"finetune": 0.9, "probe": 0.9, "ensemble": 0.9}, "best") == "probe"
    assert choose({"finetune": 0.95, "probe": 0.85, "ensemble": 0.9}, "best") == "finetune"


@pytest.mark.parametrize("n_classes", [2, 5])
def test_the_ensembles_probabilities_are_the_mean_of_its_members_and_its_network_gives_them(n_classes):
    import torch

    from tlkit.features.calibrate import softmax
    from tlkit.models.network import Ensemble
    from tlkit.train.choice import mean_probabilities

    rng = np.random.default_rng(n_classes)
    a, b = rng.normal(size=(7, n_classes)) * 4, rng.normal(size=(7, n_classes)) * 4
    expected = (softmax(a) + softmax(b)) / 2
    np.testing.assert_allclose(mean_probabilities(a, b), expected)
    logits = Ensemble.combine([torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)])
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), expected, atol=1e-6)
    # one member certain of another class: the mean still gives each class its share, no log(0)
    certain = np.full((1, n_classes), -1e4)
    certain[0, 0] = 1e4
    sure = Ensemble.combine([torch.tensor(certain, dtype=torch.float32)] * 2)
    assert torch.isfinite(sure).all() and torch.softmax(sure, 1)[0, 0] == pytest.approx(1.0)


def test_the_ensembles_probe_member_is_scored_by_a_probe_that_never_saw_the_selection_split():
    from tlkit.train.choice import selection_probe_logits

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    X = rng.normal(size=(80, 8)) + 3 * y[:, None]
    splits = np.array(["train"] * 80, dtype=object)
    splits[::5] = SELECT
    flipped = FeatureSet(X=X, y=np.where(splits == SELECT, 1 - y, y), splits=splits, classes=["a", "b"], key="k")
    logits = selection_probe_logits(flipped, SELECT, classifier="logreg")
    assert logits.shape == (16, 2)
    assert (logits.argmax(1) == flipped.y[splits == SELECT]).mean() == 0.0  # the held labels were not learnt


def test_the_better_probe_on_the_selection_split_is_the_candidate_and_a_tie_keeps_the_svm():
    from tlkit.train.choice import better_probe

    assert better_probe({"svm": 0.8, "logreg": 0.9}) == "logreg"
    assert better_probe({"svm": 0.9, "logreg": 0.9}) == "svm"
    assert better_probe({"svm": float("nan"), "logreg": float("nan")}) == "svm"  # no score anywhere: the SVM


def test_the_probe_of_a_cnn_reads_every_layer_and_kept_it_serves_and_exports_with_one_answer(
    tracked, digits_source, digits_pair, tmp_path
):
    """A backbone with stages (a CNN) gets a probe on every stage's features; kept, the model is that probe, saved
    with its layers: predict, evaluate, the served model and the ONNX file alone give one answer, two classes."""
    import mlflow.pyfunc
    import pandas as pd

    onnxruntime = pytest.importorskip("onnxruntime")
    from tlkit.config import EvaluateConfig
    from tlkit.models.multilayer import MultiLayer
    from tlkit.models.network import load_model
    from tlkit.runs.evaluate import run_evaluate, run_export

    tiny = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)
    pre = run_train(digits_source, tiny, PretrainConfig(epochs=2, augment="none"), compute=CPU, run=QUIET)
    train = TrainConfig(epochs=1, augment="none", strategy="full", lr=1e-9, keep="probe")
    result = run_train(digits_pair, BackboneConfig(weights=pre.model_uri), train, compute=CPU, run=QUIET)
    details, run = result.details, tracked.get_run(result.run_id)
    assert details["kept"] == "probe"
    assert details["probe_layers"] == run.data.params["probe_layers"] == "all"
    loaded = load_model(result.model_uri)
    assert isinstance(loaded.network.backbone, MultiLayer) and loaded.bundle.layers == "all"
    evaluation = run_evaluate(result.model_uri, digits_pair, EvaluateConfig(split="test"))
    assert evaluation.metrics["test_accuracy"] == pytest.approx(details["probe_heldout_accuracy"])
    paths = sorted(digits_pair.rglob("*.png"))[::12][:5]
    expected = loaded.predict_proba(paths)
    served = mlflow.pyfunc.load_model(f"{result.model_uri}/model")
    answer = served.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    np.testing.assert_allclose(answer[loaded.classes].to_numpy(), expected, atol=1e-6)
    # the probe is `tlkit baseline --layers all`'s, with the classifier the fine-tune's probe chose
    from tlkit.config import BaselineConfig
    from tlkit.runs.stages import run_baseline

    same = BaselineConfig(classifier=details["probe_classifier"], layers="all")
    alone = run_baseline(digits_pair, BackboneConfig(weights=pre.model_uri), same, compute=CPU)
    assert alone.metrics["heldout_accuracy"] == details["probe_heldout_accuracy"]
    np.testing.assert_allclose(load_model(alone.model_uri).predict_proba(paths), expected, atol=1e-6)
    onnx = run_export(result.model_uri, "onnx", tmp_path)
    mean = np.array(loaded.bundle.data_config["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(loaded.bundle.data_config["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    session = onnxruntime.InferenceSession(str(onnx.files[0]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": (loaded.pixels(paths).numpy() - mean) / std})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("classifier", ["svm", "logreg"])
def test_the_probes_selection_score_comes_from_a_model_that_never_saw_the_selection_split(classifier):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    X = rng.normal(size=(80, 8)) + 3 * y[:, None]  # separable: a probe fitted on train gets the held images right
    splits = np.array(["train"] * 80, dtype=object)
    splits[::5] = SELECT
    features = FeatureSet(X=X, y=y, splits=splits, classes=["a", "b"], key="k")
    assert probe_selection_accuracy(features, SELECT, classifier=classifier) == 1.0
    flipped = FeatureSet(X=X, y=np.where(splits == SELECT, 1 - y, y), splits=splits, classes=["a", "b"], key="k")
    assert (
        probe_selection_accuracy(flipped, SELECT, classifier=classifier) == 0.0
    )  # fitted on train alone: the held labels are not learnt


def test_features_take_the_held_back_split_of_the_manifest(digits_target):
    manifest = ingest(digits_target, test=0.0)
    splits = choice_splits(manifest, use_val="select", seed=0)
    assert splits is not None
    n = len(manifest.records)
    features = FeatureSet(
        X=np.zeros((n, 2)),
        y=manifest.labels(),
        splits=np.array([r.split for r in manifest.records]),
        classes=[],
        key="",
    )
    carved = with_splits_of(features, splits.manifest)
    assert (carved.splits == SELECT).sum() == len(splits.manifest.split(SELECT))
    assert (features.splits == SELECT).sum() == 0  # the cached set is not changed


def test_without_a_test_split_the_candidates_are_scored_on_held_back_training_images(
    tracked, digits_source, digits_pair
):
    tiny = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)
    pre = run_train(digits_source, tiny, PretrainConfig(epochs=2, augment="none"), compute=CPU, run=QUIET)
    train = TrainConfig(epochs=2, augment="none", strategy="full", lr=3e-3)
    no_test = SplitConfig(test=0.0)
    result = run_train(digits_pair, BackboneConfig(weights=pre.model_uri), train, split=no_test, compute=CPU, run=QUIET)
    details, run = result.details, tracked.get_run(result.run_id)
    assert "training images (20% of each class, seed 0) held back" in details["choice_split"]
    assert run.data.params["selection.kept"] == details["choice_split"]
    scores = details["selection_scores"]
    assert scores[details["kept"]] == max(scores.values())  # the delivered model is the better one where it was chosen
    assert details["heldout_split"] == run.data.params["heldout_split"] == "val"


@pytest.mark.parametrize("keep", ["probe", "ensemble"])
def test_keep_probe_without_pretrained_weights_is_refused_in_one_line_before_any_run(workdir, digits_pair, keep):
    args = ["finetune", digits_pair, "--model", TINY_MODEL, "--no-pretrained", "--img-size", "32", "--keep", keep]
    assert_one_line_error(
        invoke(CliRunner(), *args), f"--keep {keep}", f"drop --keep {keep} or give pretrained --weights"
    )
    assert not (workdir / "mlflow.db").exists()


def test_the_summary_says_what_was_kept_why_and_what_the_other_candidate_scored():
    from tlkit.cli.train import choice_line

    details = {
        "kept": "probe",
        "keep": "best",
        "selection_scores": {"finetune": 0.8, "probe": 0.9, "ensemble": 0.85},
        "choice_split": "the val split (test reports)",
        "finetune_heldout_accuracy": 0.75,
        "probe_heldout_accuracy": 0.85,
        "ensemble_heldout_accuracy": 0.8,
        "heldout_split": "test",
        "probe_classifier": "svm",
        "probe_layers": "last",
    }
    assert choice_line(details) == (
        "kept the linear SVM on the frozen features (on the val split (test reports): fine-tune 0.8000, probe "
        "0.9000, ensemble 0.8500); on the test split: the fine-tune 0.7500, the ensemble 0.8000"
    )
    insisted = {**details, "kept": "ensemble", "keep": "ensemble", "selection_scores": {}, "probe_classifier": "logreg"}
    assert choice_line(insisted) == (
        "kept the ensemble of the fine-tune and the logistic regression on the frozen features (--keep ensemble); on "
        "the test split: the fine-tune 0.7500, the probe 0.8500"
    )
    refitted = {**details, "kept": "finetune", "refit": "train + val (595 images), 10 epochs, the last kept"}
    assert choice_line(refitted) == (
        "kept the fine-tune (on the val split (test reports): fine-tune 0.8000, probe 0.9000, ensemble 0.8500, then "
        "trained again on train + val (595 images), 10 epochs, the last kept); on the test split: the probe 0.8500, "
        "the ensemble 0.8000"
    )
    every_layer = {**details, "probe_layers": "all"}
    assert choice_line(every_layer).startswith("kept the linear SVM on every layer's frozen features (on the val")


@pytest.fixture
def fits(monkeypatch):
    """Each `train_classifier` call of a run: its training images and how val was used."""
    import tlkit.train.finetune as finetune

    calls, original = [], finetune.train_classifier

    def spy(manifest, backbone, settings=None, **kwargs):
        trained = len(manifest.split("train")) + (len(manifest.split("val")) if settings.use_val == "train" else 0)
        calls.append({"use_val": settings.use_val, "images": trained})
        return original(manifest, backbone, settings, **kwargs)

    monkeypatch.setattr(finetune, "train_classifier", spy)
    return calls


@pytest.mark.parametrize("keep", ["ensemble", "finetune", "probe"])
def test_a_delivered_fine_tune_is_trained_again_on_train_and_val_when_a_test_split_reports(
    tracked, digits_source, digits_pair, fits, keep
):
    """use_val 'refit' (the default): val judges a fit on train alone, then a fine-tune that is delivered (alone or in
    the ensemble) is trained again on train + val, as the probe is refitted there; test reports it. Two classes."""
    from tlkit.config import EvaluateConfig
    from tlkit.runs.evaluate import run_evaluate

    tiny = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)
    pre = run_train(digits_source, tiny, PretrainConfig(epochs=2, augment="none"), compute=CPU, run=QUIET)
    fits.clear()
    train = TrainConfig(epochs=2, augment="none", strategy="full", lr=3e-3, keep=keep)
    result = run_train(digits_pair, BackboneConfig(weights=pre.model_uri), train, compute=CPU, run=QUIET)
    manifest = ingest(digits_pair)
    n_train, n_val = len(manifest.split("train")), len(manifest.split("val"))
    details, run = result.details, tracked.get_run(result.run_id)
    assert details["kept"] == keep and details["heldout_split"] == "test"
    if keep == "probe":  # nothing of the fine-tune is delivered: no refit
        assert fits == [{"use_val": "refit", "images": n_train}] and "refit" not in run.data.params
        return
    if keep == "finetune":  # nothing to choose: val joins the one fit
        assert fits == [{"use_val": "train", "images": n_train + n_val}] and "refit" not in run.data.params
    else:
        assert fits == [{"use_val": "refit", "images": n_train}, {"use_val": "train", "images": n_train + n_val}]
        assert (
            run.data.params["refit"]
            == details["refit"]
            == f"train + val ({n_train + n_val} images), 2 epochs, the last kept"
        )
        assert "selection_fit_heldout_accuracy" in run.data.metrics
    assert details["best_epoch"] is None  # the last epoch of the fit on train + val
    # the delivered model is the refitted one: evaluated as a user would, it scores what the run reports
    evaluation = run_evaluate(result.model_uri, digits_pair, EvaluateConfig(split="test"))
    assert evaluation.metrics["test_accuracy"] == pytest.approx(run.data.metrics["heldout_accuracy"])
    assert run.data.metrics[f"{keep}_heldout_accuracy"] == run.data.metrics["heldout_accuracy"]


def test_select_trains_on_train_alone_and_without_a_test_split_val_never_trains(
    tracked, digits_source, digits_pair, fits
):
    tiny = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)
    pre = run_train(digits_source, tiny, PretrainConfig(epochs=2, augment="none"), compute=CPU, run=QUIET)
    weights = BackboneConfig(weights=pre.model_uri)
    for train, split in [
        (TrainConfig(epochs=2, augment="none", strategy="full", keep="finetune", use_val="select"), None),
        (TrainConfig(epochs=2, augment="none", strategy="full", keep="finetune"), SplitConfig(test=0.0)),
    ]:
        fits.clear()
        result = run_train(digits_pair, weights, train, split=split, compute=CPU, run=QUIET)
        assert [call["use_val"] for call in fits] == [train.use_val] and "refit" not in result.details


def test_with_nothing_to_choose_val_joins_the_one_fit_unless_patience_stops_on_it(tracked, digits_source, fits):
    """Random weights have no probe to choose against: refit trains the one fit on train + val, but --patience needs
    val to stop on, so there val judges (select) and never trains."""
    tiny = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)
    manifest = ingest(digits_source)
    n_train, n_val = len(manifest.split("train")), len(manifest.split("val"))
    for patience, expected in [(None, {"use_val": "train", "images": n_train + n_val}), (1, None)]:
        fits.clear()
        train = TrainConfig(epochs=3, augment="none", strategy="full", patience=patience)
        result = run_train(digits_source, tiny, train, compute=CPU, run=QUIET)
        assert fits == [expected or {"use_val": "select", "images": n_train}]
        history = tracked.get_metric_history(result.run_id, "val_accuracy")
        assert bool(history) == (patience is not None) and result.details["heldout_split"] == "test"


def test_a_fine_tune_stopped_during_its_refit_resumes_into_the_same_run(
    tracked, digits_source, digits_pair, monkeypatch
):
    """Ctrl-C during the refit ends the run KILLED; --resume finds the judged fit finished (its last.ckpt is written
    at its end, which a fit with nothing after it skips) and delivers the refitted model into the same run."""
    import tlkit.runs.stages as stages
    from tlkit.core.outcome import ended_runs

    tiny = BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32)
    pre = run_train(digits_source, tiny, PretrainConfig(epochs=2, augment="none"), compute=CPU, run=QUIET)
    weights = BackboneConfig(weights=pre.model_uri)
    # one phase: no last.ckpt on the way
    train = TrainConfig(epochs=2, augment="none", strategy="full", keep="ensemble")
    refit = stages._Refit.__call__

    def stopped(self, judged, temperature):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages._Refit, "__call__", stopped)
    with pytest.raises(KeyboardInterrupt) as raised:
        run_train(digits_pair, weights, train, compute=CPU, run=QUIET)
    ((run_id, status, _),) = [(e.run_id, e.status, e.recorded) for e in ended_runs(raised.value)]
    assert status == "KILLED" == tracked.get_run(run_id).info.status
    monkeypatch.setattr(stages._Refit, "__call__", refit)
    result = run_train(digits_pair, weights, train, compute=CPU, run=QUIET, resume=run_id)
    assert result.run_id == run_id and tracked.get_run(run_id).info.status == "FINISHED"
    assert result.details["kept"] == "ensemble" and result.details["refit"].startswith("train + val")
