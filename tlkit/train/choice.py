"""A fine-tune and its frozen probe -> the one model `tlkit finetune` delivers, chosen where nothing is reported.

Three candidates come out of every fine-tune of pretrained weights: the fine-tuned network; its probe, a linear
classifier on the pretrained backbone's frozen features (`tlkit baseline`'s model, from the same feature cache: the
SVM or logistic regression, whichever scores higher on the selection split); and their ensemble, the two
networks' calibrated class probabilities averaged with equal weights.
Neither single model wins everywhere: on few images a class of many classes, or far from ImageNet, the frozen
features can hold more than a fine-tune keeps (issue 30's table: aerial images 0.895 against 0.800), and on
low-resolution or simple sets the fine-tune wins; where they err on different images, their average beats both
(the transfer suite, seed 0: natural scenes and sign digits). So with `keep="best"` the three are scored on a
selection split, and the highest is the run's model; a tie keeps the probe, then the fine-tune: the ensemble
costs two forward passes an image, and must earn them (`choose`).

The ensemble's fine-tune member has its temperature fitted on the selection split (the weights of the average
depend on it; the split chose nothing of the fine-tune's where it was carved out of train), its probe member is
the probe as delivered; on the selection split itself the probe member is the one fitted without it
(`selection_probe_logits`), as the probe's own score is.

The selection split reports nothing: it is val when a test split reports the result (val already chose the
fine-tune's epoch and the probe's C there), and otherwise a share of each class's training images held back before
either candidate trains (`SELECTION_FRACTION`), as a tune's trials are scored. The fine-tune then trains without
them; the probe, if chosen, is refitted on all of train as `tlkit baseline` fits it (C by cross-validation), since
that costs seconds. `keep="finetune"` or `"probe"` delivers that candidate whatever the scores.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from tlkit.data.ingest import Manifest, carve
from tlkit.features.baseline import C_GRID, build_classifier, search_C
from tlkit.features.calibrate import softmax
from tlkit.features.extract import FeatureSet
from tlkit.models import heads

SELECTION_FRACTION = 0.2  # of each class's training images, held back for the choice when val reports
SELECT = "select"  # the name of that split in the manifest the candidates train on
CANDIDATES = ("probe", "finetune", "ensemble")  # in the order a tie keeps them


@dataclass(frozen=True)
class ChoiceSplits:
    """What the candidates train on, and the split that chooses between them."""

    manifest: Manifest  # with the selection split: val, or SELECT carved out of train
    split: str  # "val" or SELECT
    how: str  # in words, for the run and the summary


def choice_splits(manifest: Manifest, *, use_val: str, seed: int) -> ChoiceSplits | None:
    """The selection split of this data: val when a test split reports (and val is not trained on), else a carved
    share of train; None when train is too small to give any image (every class has one)."""
    if manifest.split("test") and manifest.split("val") and use_val != "train":
        return ChoiceSplits(manifest, "val", "the val split (test reports)")
    held = carve(manifest.split("train"), SELECTION_FRACTION, seed)
    if not held:
        return None
    records = [replace(r, split=SELECT) if r.split == "train" and r.path in held else r for r in manifest.records]
    how = f"{len(held)} training images ({SELECTION_FRACTION:.0%} of each class, seed {seed}) held back"
    carved = replace(manifest, records=records, split_settings={**manifest.split_settings, "choice": how})
    return ChoiceSplits(carved, SELECT, how)


def with_splits_of(features: FeatureSet, manifest: Manifest) -> FeatureSet:
    """`features` (rows in the manifest's order) with the splits of `manifest`, the same images split otherwise."""
    return replace(features, splits=np.array([r.split for r in manifest.records]))


def _fitted_on_train(features: FeatureSet, classifier: str, seed: int, C: float | None):
    """The probe fitted on the train split alone: with `C`, or C by cross-validation on train."""
    train = features.subset("train")
    pipeline = build_classifier(classifier, seed=seed)
    if C is None:
        C = search_C(pipeline, C_GRID[classifier], train, None).C
    with warnings.catch_warnings():  # as in search_C: an unconverged large C just scores worse
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clone(pipeline).set_params(clf__C=C).fit(*train), C


def probe_selection_accuracy(features: FeatureSet, split: str, *, classifier: str = "svm", seed: int = 0) -> float:
    """A probe's accuracy on the carved selection split: C by cross-validation on the rest of train, fitted there.
    (On val, a probe's score is `fit_baseline`'s own selection_score: C was chosen there.)"""
    fitted, _ = _fitted_on_train(features, classifier, seed, None)
    X, y = features.subset(split)
    return float((fitted.predict(X) == y).mean())


def selection_probe_logits(
    features: FeatureSet, split: str, *, classifier: str, seed: int = 0, C: float | None = None
) -> np.ndarray:
    """Calibrated logits on `split` of the probe fitted on train alone (C given where val chose it, else by
    cross-validation on train), its temperature from out-of-fold decision values of train: the ensemble's probe
    member where the ensemble is scored."""
    from tlkit.features.baseline import out_of_fold_temperature

    fitted, C = _fitted_on_train(features, classifier, seed, C)
    n_classes = len(features.classes)
    train = features.subset("train")
    pipeline = build_classifier(classifier, seed=seed)
    temperature, _ = out_of_fold_temperature(pipeline, C=C, X=train[0], y=train[1], n_classes=n_classes, seed=seed)
    return heads.from_sklearn(fitted, n_classes).numpy_logits(features.subset(split)[0]) / temperature


def mean_probabilities(*calibrated_logits: np.ndarray) -> np.ndarray:
    """The ensemble's class probabilities: the members' softmax, averaged with equal weights."""
    return np.mean([softmax(logits) for logits in calibrated_logits], axis=0)


def better_probe(scores: dict[str, float]) -> str:
    """The probe with the higher selection score; of a tie (or of no scores: NaN), the first, the SVM."""
    return max(scores, key=lambda kind: -1.0 if math.isnan(scores[kind]) else scores[kind])


def choose(scores: dict[str, float], keep: str) -> str:
    """The delivered candidate: `keep` itself, or with "best" the highest selection score. A tie keeps the probe: on
    equal evidence, the candidate of lower variance (a convex fit, the same on every seed, where a fine-tune's
    held-out figure moves by a few points between seeds); then the fine-tune, one network where the ensemble runs
    two."""
    if keep != "best":
        return keep
    scored = [name for name in CANDIDATES if name in scores]
    return max(scored, key=lambda name: (scores[name], -scored.index(name)))
