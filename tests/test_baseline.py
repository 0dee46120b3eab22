import numpy as np
import pytest

from tlkit.errors import TlkitError
from tlkit.features.baseline import fit_baseline
from tlkit.features.extract import FeatureSet


def blobs(n_per_class=20, splits=("train", "val", "test"), seed=0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 3
    X, y, s = [], [], []
    for split in splits:
        for c in range(3):
            X.append(centres[c] + rng.normal(size=(n_per_class, 16)))
            y += [c] * n_per_class
            s += [split] * n_per_class
    return FeatureSet(np.concatenate(X).astype(np.float32), np.array(y), np.array(s), ["a", "b", "c"], "k")


@pytest.mark.parametrize("classifier", ["svm", "logreg"])
def test_separable_features_are_learned(classifier):
    result = fit_baseline(blobs(), classifier=classifier)
    assert result.metrics["heldout_accuracy"] > 0.95
    assert result.selection == "validation split"
    assert result.C > 0
    assert {"heldout_balanced_accuracy", "heldout_macro_f1", "heldout_precision.a", "heldout_recall.c"} <= set(
        result.metrics
    )
    assert len(result.estimator.predict(blobs().X)) == 180


def test_refit_uses_train_and_val():
    result = fit_baseline(blobs(), classifier="logreg")
    assert result.estimator.named_steps["clf"].n_features_in_ == 16
    assert result.estimator.named_steps["scale"].n_samples_seen_ == 120  # train + val


def test_without_val_cross_validates_on_train():
    result = fit_baseline(blobs(splits=("train", "test")), classifier="svm")
    assert "cross-validation" in result.selection


def test_noise_stays_near_chance():
    noise = blobs()
    noise.X = np.random.default_rng(1).normal(size=noise.X.shape).astype(np.float32)
    assert fit_baseline(noise).metrics["heldout_accuracy"] < 0.6


def test_single_class_training_split_is_an_error():
    data = blobs()
    data.y[data.splits == "train"] = 0
    with pytest.raises(TlkitError, match="fewer than two classes"):
        fit_baseline(data)


def test_without_test_split_val_is_held_out_and_chooses_nothing():
    """Train/val data: C from cross-validation on train, the model fit on train alone, scored on val."""
    from sklearn.base import clone

    from tlkit.features.baseline import build_classifier

    data = blobs(splits=("train", "val"))
    result = fit_baseline(data, classifier="logreg")
    assert result.heldout_split == "val"
    assert "cross-validation on train" in result.selection
    assert result.estimator.named_steps["scale"].n_samples_seen_ == 60  # train only: val never seen
    X_val, y_val = data.subset("val")
    alone = clone(build_classifier("logreg")).set_params(clf__C=result.C).fit(*data.subset("train"))
    assert (alone.predict(X_val) == result.y_pred).all()
    assert len(result.y_true) == len(y_val)
    assert "val_accuracy" not in result.metrics  # one held-out figure, under heldout_*, with heldout_split saying which


def test_with_test_split_val_chooses_c_and_test_reports():
    result = fit_baseline(blobs(), classifier="svm")
    assert result.heldout_split == "test"
    assert result.selection == "validation split"
    assert len(result.y_true) == 60
