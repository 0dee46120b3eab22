"""Temperature scaling and the one head: known answers on synthetic data, scikit-learn's own probabilities."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from tlkit.core.metrics import calibration
from tlkit.features import calibrate
from tlkit.models import heads


def overconfident(n, classes=3, true_t=3.0, seed=0):
    """Logits whose calibrated temperature is `true_t`: labels drawn from softmax(logits / true_t)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (n, classes))
    probs = calibrate.softmax(logits, true_t)
    y = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, y


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    logits, y = overconfident(4000, true_t=3.0)
    assert calibrate.fit_temperature(logits, y) == pytest.approx(3.0, rel=0.1)
    assert calibrate.fit_temperature(logits[:5], y[:5]) == 1.0  # too few images to fit anything


@pytest.mark.parametrize("classes", [2, 4])
def test_temperature_lowers_calibration_error_on_heldout_data(classes):
    logits, y = overconfident(1200, classes=classes, true_t=2.5, seed=1)
    fit, held = slice(0, 600), slice(600, None)
    t = calibrate.fit_temperature(logits[fit], y[fit])
    before = calibration(y[held], calibrate.softmax(logits[held]))[0]
    after = calibration(y[held], calibrate.softmax(logits[held], t))[0]
    assert after < before / 2
    assert (calibrate.softmax(logits, t).argmax(1) == logits.argmax(1)).all()  # no prediction changes


def test_cross_fitted_scores_each_image_with_a_temperature_fitted_without_it():
    logits, y = overconfident(300, classes=2, true_t=2.0, seed=2)
    t, probs = calibrate.cross_fitted(logits, y)
    assert t == pytest.approx(calibrate.fit_temperature(logits, y))
    assert t > 1.3
    assert not np.allclose(probs, calibrate.softmax(logits, t))  # fold temperatures, not the final one
    assert calibration(y, probs)[0] < calibration(y, calibrate.softmax(logits))[0]
    t_single, plain = calibrate.cross_fitted(logits[:12], np.r_[np.zeros(11, int), 1])  # a class of one image: no folds
    assert t_single == 1.0
    assert np.allclose(plain, calibrate.softmax(logits[:12]))


def blobs(classes, n=60, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return rng.normal(0, 1, (n, d)) + y[:, None] * 0.8, y


@pytest.mark.parametrize("classes", [2, 3])
def test_logistic_regression_head_gives_sklearns_probabilities(classes):
    X, y = blobs(classes)
    model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=0.5, max_iter=1000))]).fit(X, y)
    head = heads.from_sklearn(model, classes)
    got = calibrate.softmax(head.numpy_logits(X))
    np.testing.assert_allclose(got, model.predict_proba(X), atol=1e-5)
    linear = head.as_linear()  # the normalisation and temperature folded into one layer (timm's classifier)
    with torch.no_grad():
        np.testing.assert_allclose(
            linear(torch.as_tensor(X, dtype=torch.float32)).numpy(), head.numpy_logits(X), atol=1e-4
        )


@pytest.mark.parametrize("classes", [2, 3])
def test_svm_head_keeps_sklearns_decisions_and_scores_every_class(classes):
    X, y = blobs(classes, seed=3)
    model = Pipeline([("normalize", Normalizer()), ("clf", LinearSVC(dual=False))]).fit(X, y)
    head = heads.from_sklearn(model, classes, temperature=0.5)
    logits = head.numpy_logits(X)
    assert (logits.argmax(1) == model.predict(X)).all()
    if classes == 2:  # one decision value d -> (-d/2, d/2): both classes have a score that moves
        d = model.decision_function(X)
        np.testing.assert_allclose(logits, np.c_[-d / 2, d / 2], atol=1e-5)
    assert head.as_linear() is None  # L2 normalisation is not linear
    with torch.no_grad():
        np.testing.assert_allclose(head(torch.as_tensor(X, dtype=torch.float32)).numpy(), logits / 0.5, atol=1e-5)


def test_a_head_round_trips_through_its_tensors():
    X, y = blobs(3)
    head = heads.from_sklearn(
        Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(X, y), 3, temperature=1.7
    )
    again = heads.from_state(heads.state(head), head.norm)
    np.testing.assert_allclose(again.numpy_logits(X), head.numpy_logits(X))
    assert float(again.temperature) == pytest.approx(1.7)
