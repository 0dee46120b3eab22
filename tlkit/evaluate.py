"""True and predicted labels -> metrics dict and confusion-matrix figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], *, prefix: str = "test_") -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall, named `<prefix><metric>`."""
    labels = list(range(len(classes)))
    metrics = {
        "accuracy": accuracy_score(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
    }
    precision, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for name, p, r in zip(classes, precision, recall):
        metrics[f"precision.{name}"] = p
        metrics[f"recall.{name}"] = r
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], *, title: str = ""):
    """Confusion matrix, rows = true class, with counts in the cells."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    side = max(3.5, 0.45 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(side, side), dpi=100)
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title or f"accuracy {accuracy_score(y_true, y_pred):.3f} (n={len(y_true)})")
    if len(classes) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            axis.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > threshold else "black")
    figure.tight_layout()
    return figure


def close(figure) -> None:
    plt.close(figure)
