"""FeatureSet -> fitted linear classifier (C chosen on the validation split) + held-out metrics.

Two heads, both standard for judging frozen features:
- svm: a linear SVM on L2-normalised features (Razavian et al. 2014, "CNN features off-the-shelf");
  normalising also makes liblinear converge ~100x faster than on raw features.
- logreg: multinomial L-BFGS logistic regression on standardised features (Kornblith et al. 2019).
C comes from a log grid, scored on the validation split, then the model is refit on train + val.

Both become a `heads.LinearHead` with a temperature fitted on out-of-fold decision values of the
refit data (5-fold cross-validation with the chosen C; the held-out split takes no part), so an SVM
gives probabilities too, and logistic regression's are calibrated even where a strong penalty
(small C) made them timid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import get_args

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from tlkit.config import LinearClassifier
from tlkit.core.metrics import calibration, classification_metrics
from tlkit.errors import TlkitError
from tlkit.features import calibrate
from tlkit.features.extract import FeatureSet
from tlkit.models import heads

CLASSIFIERS: tuple[str, ...] = get_args(LinearClassifier)
C_GRID = {"svm": np.logspace(-2, 3, 6), "logreg": np.logspace(-4, 2, 7)}


def build_classifier(kind: str, *, seed: int = 0) -> Pipeline:
    """The unfitted sklearn pipeline for `kind` (svm or logreg)."""
    if kind == "svm":
        return Pipeline(
            [
                ("normalize", Normalizer(norm="l2")),
                ("clf", LinearSVC(C=1.0, dual=False, max_iter=5000, random_state=seed)),
            ]
        )
    if kind == "logreg":
        return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=1.0, max_iter=2000))])
    raise TlkitError(f"unknown classifier {kind!r}; choose one of {', '.join(CLASSIFIERS)} or pixels")


@dataclass
class BaselineResult:
    """A fitted baseline and its held-out metrics.

    `estimator` is refit with the chosen C on every labelled image that is not held out; `head` is
    it as the model tlkit saves, with its temperature. `selection` says how C was chosen;
    `heldout_split` is the split the metrics are on, which never took part in choosing C or T.
    """

    estimator: Pipeline
    head: heads.LinearHead
    C: float
    selection: str
    selection_score: float  # accuracy of the chosen C where it was chosen
    metrics: dict[str, float]
    heldout_split: str
    y_true: np.ndarray
    y_pred: np.ndarray
    calibration: str = ""  # how the temperature was fitted


def heldout_split(splits: np.ndarray) -> str:
    """The split results are reported on: test; val only when there is no test split."""
    return "test" if (splits == "test").any() else "val"


def cross_validation(y: np.ndarray, *, seed: int = 0) -> StratifiedKFold | None:
    """Stratified k-fold over `y` (k = 5, fewer for tiny classes), or None when a class has a single image."""
    smallest = int(np.bincount(y).min()) if len(y) else 0
    return StratifiedKFold(min(5, smallest), shuffle=True, random_state=seed) if smallest >= 2 else None


@dataclass
class CSearch:
    """C chosen by accuracy (`search_C`): the value, its score where it was chosen, how, and the images that chose it
    (train, with val when val chose), which the chosen model is refit on."""

    C: float
    score: float
    how: str
    X: np.ndarray
    y: np.ndarray


def search_C(
    estimator, grid, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray] | None
) -> CSearch:
    """Choose C from `grid` by accuracy: on the val split when `val` is given (a test split reports, so val may
    choose), else by k-fold cross-validation on train (val, then held out, must not choose); C=1 when a class has a
    single training image. `estimator` is an sklearn estimator or a Pipeline whose classifier step is `clf`."""
    X, y = train
    if val is not None and len(val[1]):
        fold = np.concatenate([np.full(len(y), -1), np.zeros(len(val[1]), dtype=int)])
        X, y = np.concatenate([X, val[0]]), np.concatenate([y, val[1]])
        cv, how = PredefinedSplit(fold), "validation split"
    else:
        cv = cross_validation(y)
        if cv is None:
            return CSearch(C=1.0, score=float("nan"), how="none (too few images for cross-validation; C=1)", X=X, y=y)
        how = f"{cv.get_n_splits()}-fold cross-validation on train"
    name = "clf__C" if isinstance(estimator, Pipeline) else "C"
    search = GridSearchCV(estimator, {name: list(grid)}, cv=cv, scoring="accuracy", refit=False, n_jobs=1)
    with warnings.catch_warnings():  # an unconverged large-C grid point just scores worse
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X, y)
    return CSearch(C=float(search.best_params_[name]), score=float(search.best_score_), how=how, X=X, y=y)


def fit_baseline(
    features: FeatureSet, *, classifier: str = "svm", seed: int = 0, calibrated: bool = True
) -> BaselineResult:
    """Choose C, refit, calibrate, and score on the held-out split (test, else val; never the split that chose C or T).

    Args:
        features: features of a whole manifest (all splits).
        classifier: svm or logreg.
        seed: seed of the SVM's coordinate descent and of the calibration folds.
        calibrated: fit the temperature (a fine-tune's probe, which only reports accuracy, skips it).
    """
    pipeline = build_classifier(classifier, seed=seed)
    heldout = heldout_split(features.splits)
    train = features.subset("train")
    if len(np.unique(train[1])) < 2:
        raise TlkitError("the training split has fewer than two classes; add images or lower --val/--test")
    found = search_C(pipeline, C_GRID[classifier], train, features.subset("val") if heldout == "test" else None)
    C, score, selection, X, y = found.C, found.score, found.how, found.X, found.y
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator = clone(pipeline).set_params(clf__C=C).fit(X, y)
    X_eval, y_eval = features.subset(heldout)
    if not len(y_eval):
        raise TlkitError(
            "no held-out images (test and val splits are empty); ingest with --test 0.2 or give a test/ folder"
        )
    n_classes = len(features.classes)
    head = heads.from_sklearn(estimator, n_classes)
    temperature, how = 1.0, "none (calibrated=False)"
    if calibrated:
        temperature, how = out_of_fold_temperature(pipeline, C=C, X=X, y=y, n_classes=n_classes, seed=seed)
        head.temperature.fill_(temperature)
    y_pred = estimator.predict(X_eval)  # the head's argmax too (float64 here, float32 there: equal but for exact ties)
    # test_* always names the held-out figures, so runs line up in the UI; `heldout_split` says which split.
    metrics = classification_metrics(y_eval, y_pred, features.classes, prefix="heldout_")
    if calibrated:
        logits = head.numpy_logits(X_eval)
        metrics["heldout_ece_uncalibrated"] = calibration(y_eval, calibrate.softmax(logits))[0]
        metrics["heldout_ece"] = calibration(y_eval, calibrate.softmax(logits, temperature))[0]
        metrics["temperature"] = temperature
    return BaselineResult(
        estimator=estimator,
        head=head,
        C=C,
        selection=selection,
        selection_score=score,
        metrics=metrics,
        heldout_split=heldout,
        y_true=y_eval,
        y_pred=y_pred,
        calibration=how,
    )


def out_of_fold_temperature(
    pipeline: Pipeline, C: float, X: np.ndarray, y: np.ndarray, n_classes: int, seed: int
) -> tuple[float, str]:
    """T fitted on out-of-fold logits of the refit data (each image scored by a model fitted without it)."""
    cv = cross_validation(y, seed=seed)
    if cv is None:
        return 1.0, "none (a class has one image: no cross-validation; T=1)"
    logits = np.zeros((len(y), n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for fit_on, score_on in cv.split(X, y):
            fold = clone(pipeline).set_params(clf__C=C).fit(X[fit_on], y[fit_on])
            logits[score_on] = heads.from_sklearn(fold, n_classes).numpy_logits(X[score_on])
    return calibrate.fit_temperature(
        logits, y
    ), f"temperature on {cv.get_n_splits()}-fold out-of-fold decision values of the refit images"
