"""Labels and scores -> metrics (accuracy to calibration) and the evaluation plots."""

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

from tlkit.core.files import printable  # noqa: E402


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], *, prefix: str = "heldout_"
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall, named `<prefix><metric>`."""
    labels = list(range(len(classes)))
    metrics = {
        "accuracy": accuracy_score(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
    }
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for name, p, r, f in zip(classes, precision, recall, f1):
        metrics[f"precision.{name}"] = p
        metrics[f"recall.{name}"] = r
        metrics[f"f1.{name}"] = f
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Fraction of images whose true class is among the k highest scores (scikit-learn's, every class labelled)."""
    from sklearn.metrics import top_k_accuracy_score

    return float(top_k_accuracy_score(y_true, scores, k=k, labels=np.arange(scores.shape[1])))


def most_confused(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], n: int = 5) -> list[tuple[str, str, int]]:
    """The n (true, predicted) class pairs mistaken most often, most first."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    np.fill_diagonal(matrix, 0)
    pairs = [(classes[i], classes[j], int(matrix[i, j])) for i, j in zip(*np.nonzero(matrix))]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:n]


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> tuple[float, list[dict]]:
    """Expected calibration error (Guo et al. 2017) over equal-width confidence bins, and the bins.

    ECE = sum over bins of (bin size / n) * |accuracy in bin - mean confidence in bin|.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high) if low > 0 else (confidence >= low) & (confidence <= high)
        if not inside.any():
            continue
        accuracy, mean_confidence = float(correct[inside].mean()), float(confidence[inside].mean())
        ece += inside.mean() * abs(accuracy - mean_confidence)
        table.append(
            {
                "low": float(low),
                "high": float(high),
                "count": int(inside.sum()),
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return float(ece), table


def reliability_figure(table: list[dict], ece: float):
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    centres = [(b["low"] + b["high"]) / 2 for b in table]
    widths = [b["high"] - b["low"] for b in table]
    axis.bar(
        centres, [b["accuracy"] for b in table], width=widths, edgecolor="black", color="#4c72b0", label="accuracy"
    )
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.plot(centres, [b["confidence"] for b in table], "o", color="#dd8452", label="mean confidence")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (top-class probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"reliability: ECE {ece:.3f}")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def losses(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per image: the cross-entropy -log p(true class)."""
    return -np.log(np.clip(probabilities[np.arange(len(y_true)), y_true], 1e-12, 1.0))


def image_grid(images: list[np.ndarray], titles: list[str], *, columns: int = 4, cell: float = 2.2, title: str = ""):
    """Images with a caption each, in a grid."""
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * cell, rows * (cell + 0.35)), dpi=100, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, titles):
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None)
        axis.set_title(printable(caption), fontsize=7)
    if title:
        figure.suptitle(printable(title), fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    return figure


def confusion_figure(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], *, title: str = "", normalise: bool = False
):
    """Confusion matrix, rows = true class, with counts (or, normalised, row fractions) in the cells."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    if normalise:
        matrix = np.round(matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), 2)
    side = max(3.5, 0.45 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(side, side), dpi=100)
    axis.imshow(matrix, cmap="Blues")
    names = [printable(c) for c in classes]  # a class folder's name may hold bytes that are not UTF-8
    axis.set_xticks(range(len(classes)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title or f"accuracy {accuracy_score(y_true, y_pred):.3f} (n={len(y_true)})")
    if len(classes) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            axis.text(
                j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > threshold else "black"
            )
    figure.tight_layout()
    return figure


def close(figure) -> None:
    plt.close(figure)


def denormalise(images: np.ndarray, mean, std) -> np.ndarray:
    """Normalised N x 3 x H x W floats -> N x H x W x 3 uint8, as a person would see them."""
    pixels = images.transpose(0, 2, 3, 1) * np.asarray(std) + np.asarray(mean)
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)


def curves_figure(
    history: dict[str, list[tuple[int, float]]],
    phases: list[tuple[int, str]],
    *,
    kept: int | None = None,
    title: str = "",
):
    """Loss and accuracy per epoch (train and val, epochs counted from 1), a dotted line where each training phase
    starts, and a solid one at `kept`, the epoch whose weights the model holds."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for axis, kind in zip(axes, ("loss", "accuracy")):
        plotted = False
        for split, style in (("train", "-"), ("val", "--")):
            points = history.get(f"{split}_{kind}") or []
            if points:
                plotted = True
                epochs, values = zip(*points)
                axis.plot([e + 1 for e in epochs], values, style, marker=".", label=split)
        for start, name in phases:  # epoch `start` is plotted at start + 1: the phase begins just before it
            axis.axvline(start + 0.5, color="grey", linestyle=":", linewidth=1)
            axis.text(
                start + 0.6,
                0.98,
                f"phase: {name}",
                transform=axis.get_xaxis_transform(),
                rotation=90,
                fontsize=7,
                va="top",
                color="grey",
            )
        if kept is not None:
            axis.axvline(kept, color="tab:green", linewidth=1.5, alpha=0.7, label=f"kept: epoch {kept}")
            plotted = True
        axis.set_xlabel("epoch")
        axis.set_ylabel(kind)
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        if plotted:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure
