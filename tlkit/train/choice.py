"""A fine-tune and its frozen probe -> the one model `tlkit finetune` delivers, chosen where nothing is reported.

Two candidates come out of every fine-tune of pretrained weights: the fine-tuned network, and its probe, a linear
classifier on the pretrained backbone's frozen features (`tlkit baseline`'s model, from the same feature cache: the
SVM or logistic regression, whichever scores higher on the selection split).
Neither wins everywhere: on few images a class of many classes, or far from ImageNet, the frozen features can
hold more than a fine-tune keeps (issue 30's table: aerial images 0.895 against 0.800), and on low-resolution or
simple sets the fine-tune wins. So with `keep="best"` both are scored on a selection split, and the higher one is
the run's model; a tie keeps the probe (`choose`).

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
from sklearn.exceptions import ConvergenceWarning

from tlkit.data.ingest import Manifest, carve
from tlkit.features.baseline import C_GRID, build_classifier, search_C
from tlkit.features.extract import FeatureSet

SELECTION_FRACTION = 0.2  # of each class's training images, held back for the choice when val reports
SELECT = "select"  # the name of that split in the manifest the candidates train on
CANDIDATES = ("finetune", "probe")


@dataclass(frozen=True)
class ChoiceSplits:
    """What the candidates train on, and the split that chooses between them."""

    manifest: Manifest  # with the selection split: val, or SELECT carved out of train
    split: str  # "val" or SELECT
    how: str  # in words, for the run and the summary


def choice_splits(manifest: Manifest, *, use_val: str, seed: int) -> ChoiceSplits | None:
    """The selection split of this data: val when a test split reports (and val is not trained on), else a carved
    share of train; None when train is too small to give any image (every class has one)."""
    if manifest.split("test") and manifest.split("val") and use_val == "select":
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


def probe_selection_accuracy(features: FeatureSet, split: str, *, classifier: str = "svm", seed: int = 0) -> float:
    """A probe's accuracy on the carved selection split: C by cross-validation on the rest of train, fitted there.
    (On val, a probe's score is `fit_baseline`'s own selection_score: C was chosen there.)"""
    train, held = features.subset("train"), features.subset(split)
    pipeline = build_classifier(classifier, seed=seed)
    found = search_C(pipeline, C_GRID[classifier], train, None)
    with warnings.catch_warnings():  # as in search_C: an unconverged large C just scores worse
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = pipeline.set_params(clf__C=found.C).fit(*train)
    return float((fitted.predict(held[0]) == held[1]).mean())


def better_probe(scores: dict[str, float]) -> str:
    """The probe with the higher selection score; of a tie (or of no scores: NaN), the first, the SVM."""
    return max(scores, key=lambda kind: -1.0 if math.isnan(scores[kind]) else scores[kind])


def choose(scores: dict[str, float], keep: str) -> str:
    """The delivered candidate: `keep` itself, or with "best" the higher selection score. A tie keeps the probe: on
    equal evidence, the candidate of lower variance (a convex fit, the same on every seed, where a fine-tune's
    held-out figure moves by a few points between seeds)."""
    if keep != "best":
        return keep
    return "probe" if scores["probe"] >= scores["finetune"] else "finetune"
