"""A saved model -> tracked runs that evaluate, explain, attack and export it.

Each function is one MLflow run linked to the model's run (tag `tlkit.model_run`), with its
metrics and PNGs, so a model's evaluations sit beside it in the UI.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tlkit.config import BackboneConfig, EvaluateConfig, SplitConfig
from tlkit.core import tracking
from tlkit.core.files import save_figure
from tlkit.core.metrics import (
    calibration,
    classification_metrics,
    close,
    confusion_figure,
    image_grid,
    losses,
    most_confused,
    plt,
    reliability_figure,
    top_k_accuracy,
)
from tlkit.data.ingest import Manifest
from tlkit.errors import TlkitError
from tlkit.models.network import LoadedModel, load_model
from tlkit.review.attack import fgsm_accuracy, to_image
from tlkit.review.explain import (
    METHODS,
    explain,
    explanation_figure,
    filters_figure,
    first_conv_filters,
    overview_figure,
)
from tlkit.review.export import export
from tlkit.review.predict import expand_images
from tlkit.runs.stages import RunOptions, StageResult, load_data, log_data, make_backbone

BATCH = 64
OVERVIEW = 16  # explanations on the one-page overview


def _model_run(ref: str) -> str:
    return tracking.parse_run_ref(ref)[0] if ref.startswith(tracking.RUNS_PREFIX) else ""


def _batches(paths: list[Path], loaded: LoadedModel):
    for start in range(0, len(paths), BATCH):
        yield start, loaded.pixels(paths[start : start + BATCH])


def _maps_for(
    loaded: LoadedModel,
    paths: list[Path],
    targets: list[int],
    *,
    method: str,
    titles: list[str],
    folder: Path,
    **options,
) -> list[Path]:
    """One explanation PNG per image, written to `folder`, and `overview.png` with the first OVERVIEW on one page."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    shown: list[tuple] = []
    for start, images in _batches(paths, loaded):
        chosen = torch.tensor(targets[start : start + len(images)])
        maps = explain(loaded.network, images, chosen, method, **options)
        for i, heat in enumerate(maps):
            k = start + i
            image = to_image(images[i])
            figure = explanation_figure(image, heat, titles[k], method)
            path = folder / f"{k:03d}-{Path(paths[k]).stem}-{method}.png"
            save_figure(figure, path)
            close(figure)
            written.append(path)
            if len(shown) < OVERVIEW:
                shown.append((image, heat, titles[k]))
    if len(shown) > 1:
        images, heats, titles_shown = (list(column) for column in zip(*shown))
        figure = overview_figure(images, heats, titles_shown, method)
        save_figure(figure, folder / "overview.png")
        close(figure)
    return written


def run_evaluate(
    model: str,
    data: str | Path | Manifest,
    settings: EvaluateConfig | None = None,
    *,
    data_split: SplitConfig | None = None,
    run: RunOptions = RunOptions(),
):
    """Score a saved model on one split: accuracy, balanced accuracy, macro-F1, top-k, per-class
    metrics, most-confused pairs, calibration, confusion matrices and the top losses; optionally TTA,
    maps for the top losses, and accuracy under FGSM. Returns a StageResult."""
    settings = settings or EvaluateConfig()
    manifest = load_data(data, data_split)
    split = settings.split or _heldout_split(model, manifest, run.tracking_uri)
    records = manifest.split(split)
    if not records:
        have = ", ".join(s for s in ("train", "val", "test") if manifest.split(s))
        raise TlkitError(f"the dataset has no {split!r} split (it has: {have}); pass --split with one of those")
    loaded = load_model(model, tracking_uri=run.tracking_uri)
    missing = sorted({r.label for r in records} - set(loaded.classes))
    if missing:
        raise TlkitError(
            f"the model does not know class(es) {', '.join(missing)}; it was trained on {', '.join(loaded.classes)}"
        )
    if settings.method == "gradcam" and settings.explain and loaded.is_pixels:
        raise TlkitError(
            "Grad-CAM needs a backbone's feature map and a pixels baseline has none; use --method saliency or occlusion"
        )
    scored = _Scored.of(loaded, manifest, split)
    metrics = scored.metrics()
    confused = most_confused(scored.y_true, scored.y_pred, scored.classes)
    details: dict = {
        "most_confused": confused,
        "calibration": loaded.bundle.head.get("calibration", "none"),
        "split": split,
    }
    params = {
        "model_uri": model,
        "split": split,
        "tta": settings.tta,
        "attack": settings.attack or "none",
        "explain_top": settings.explain,
    }
    with tracking.start_run(
        "evaluate",
        run_name=run.named(f"evaluate on {split}" + (" (tta)" if settings.tta else "")),
        params=params,
        tags={"tlkit.model_run": _model_run(model)},
    ) as run_id:
        log_data(manifest)
        metrics[f"{split}_ece"] = _log_scores(scored, confused)
        worst = [int(i) for i in np.argsort(-losses(scored.y_true, scored.scores))[: settings.top_losses]]
        details["top_losses"] = [scored.loss_row(i) for i in worst]
        _log_top_losses(scored, worst, loaded)
        _review(loaded, scored, worst, settings, metrics=metrics, details=details)
        tracking.log_metrics(metrics)
        tracking.log_dict({k: v for k, v in details.items() if k != "top_losses"}, "evaluation.json")
    return StageResult("evaluate", run_id, metrics, details=details)


@dataclass
class _Scored:
    """One split's images, their true classes, and the model's probabilities for them."""

    split: str
    paths: list[Path]
    y_true: np.ndarray
    scores: np.ndarray
    classes: list[str]

    @classmethod
    def of(cls, loaded: LoadedModel, manifest: Manifest, split: str) -> _Scored:
        records = manifest.split(split)
        index = {c: i for i, c in enumerate(loaded.classes)}
        paths = [manifest.abspath(r) for r in records]
        return cls(
            split=split,
            paths=paths,
            y_true=np.array([index[r.label] for r in records]),
            scores=loaded.predict_proba(paths),
            classes=loaded.classes,
        )

    @property
    def y_pred(self) -> np.ndarray:
        return self.scores.argmax(1)

    def metrics(self) -> dict[str, float]:
        prefix = f"{self.split}_"
        metrics = classification_metrics(self.y_true, self.y_pred, self.classes, prefix=prefix)
        for k in (3, 5):
            if k < len(self.classes):
                metrics[f"{prefix}top{k}_accuracy"] = top_k_accuracy(self.y_true, self.scores, k)
        return metrics

    def loss_row(self, i: int) -> tuple[str, str, str, float]:
        """(image, true class, predicted class, its probability) of image `i`."""
        predicted = int(self.y_pred[i])
        return (
            str(self.paths[i]),
            self.classes[self.y_true[i]],
            self.classes[predicted],
            float(self.scores[i, predicted]),
        )


def _review(
    loaded: LoadedModel, scored: _Scored, worst: list[int], settings: EvaluateConfig, *, metrics: dict, details: dict
) -> None:
    """The optional parts of an evaluation, into the open run: TTA, maps of the top losses, FGSM."""
    prefix = f"{scored.split}_"
    if settings.tta:
        metrics[f"{prefix}tta_accuracy"], details["tta_views"] = _tta_accuracy(
            loaded, scored.paths, scored.y_true, settings.tta_flip
        )
    if settings.explain:
        chosen = worst[: settings.explain]
        titles = [f"true {row[1]} -> {row[2]} ({row[3]:.2f})" for row in map(scored.loss_row, chosen)]
        with tempfile.TemporaryDirectory() as tmp:
            _maps_for(
                loaded,
                [scored.paths[i] for i in chosen],
                [int(scored.y_pred[i]) for i in chosen],
                method=settings.method,
                titles=titles,
                folder=Path(tmp),
            )
            tracking.log_artifacts(Path(tmp), f"explain/top_losses-{settings.method}")
    if settings.attack == "fgsm":
        eps_values = sorted(set([0.0, *(settings.eps or [1 / 255, 2 / 255, 4 / 255, 8 / 255])]))
        metrics.update(_log_fgsm(loaded, scored, eps_values))
        details["fgsm"] = "float32 network, as every scoring path: eps 0 is its clean accuracy"


def _log_scores(scored: _Scored, confused: list) -> float:
    """The scores into the evaluate run: reliability diagram, predictions.csv, confusion matrices, most-confused
    pairs. Returns the expected calibration error."""
    paths, y_true, scores, classes, split = scored.paths, scored.y_true, scored.scores, scored.classes, scored.split
    y_pred = scores.argmax(1)
    ece, bins = calibration(y_true, scores)
    figure = reliability_figure(bins, ece)
    tracking.log_figure(figure, "plots/reliability.png")
    close(figure)
    _log_predictions(paths, y_true, scores, classes)
    for normalise, name in ((False, "confusion_matrix.png"), (True, "confusion_matrix_normalised.png")):
        title = f"{split} split" + (", row fractions" if normalise else "")
        figure = confusion_figure(y_true, y_pred, classes, title=title, normalise=normalise)
        tracking.log_figure(figure, f"plots/{name}")
        close(figure)
    pairs = [{"true": t, "predicted": p, "count": n} for t, p, n in confused]
    tracking.log_dict({"most_confused": pairs}, "most_confused.json")
    return ece


def _tta_accuracy(loaded: LoadedModel, paths: list[Path], y_true: np.ndarray, flip: bool | None) -> tuple[float, str]:
    """Accuracy of the predictions averaged over views (mirror by default when the model trained with flips)."""
    if flip is None:
        flip = bool(loaded.bundle.extra.get("hflip", not loaded.is_pixels))
    tta_scores = np.concatenate([loaded.tta_probs(images, flip=flip).numpy() for _, images in _batches(paths, loaded)])
    views = (
        "image, mirror, 4 corner crops"
        if flip
        else "image, 4 corner crops (no mirror: the model trained without flips)"
    )
    return float((tta_scores.argmax(1) == y_true).mean()), views


def _heldout_split(model: str, manifest: Manifest, tracking_uri: str | None) -> str:
    """The split the model's own run reported on (its `heldout_split`), when this data has it; else test, else val."""
    if model.startswith(tracking.RUNS_PREFIX):
        reported = tracking.get_run(tracking.parse_run_ref(model)[0], tracking_uri).data.params.get("heldout_split")
        if reported and manifest.split(reported):
            return reported
    return manifest.eval_split


def _log_predictions(paths: list[Path], y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> None:
    """predictions.csv: per image its true class, the predicted one, and every class's probability (as `tlkit predict`
    gives them)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "true", "predicted", *(f"probability.{c}" for c in classes)])
    for path, truth, row in zip(paths, y_true, probabilities):
        writer.writerow([str(path), classes[truth], classes[int(row.argmax())], *(f"{p:.6f}" for p in row)])
    tracking.log_text(buffer.getvalue(), "predictions.csv")


def _log_top_losses(scored: _Scored, worst: list[int], loaded: LoadedModel) -> None:
    y_true, y_pred, scores, classes = scored.y_true, scored.y_pred, scored.scores, scored.classes
    images = [loaded.prepare(loaded.decode(scored.paths[i])) for i in worst]
    titles = [
        f"{classes[y_true[i]]} -> {classes[y_pred[i]]}\n{scores[i, y_pred[i]]:.2f}, true {scores[i, y_true[i]]:.2f}"
        for i in worst
    ]
    figure = image_grid(images, titles, columns=min(4, max(1, len(images))), title="top losses (true -> predicted)")
    tracking.log_figure(figure, "plots/top_losses.png")
    close(figure)


def _log_fgsm(loaded: LoadedModel, scored: _Scored, eps_values: list[float]) -> dict[str, float]:
    """Accuracy at each budget (metrics, and a curve), and originals beside adversarial examples."""
    images = torch.cat([batch for _, batch in _batches(scored.paths, loaded)])
    accuracy, examples = fgsm_accuracy(
        loaded.network, images, torch.from_numpy(scored.y_true), eps_values, batch_size=BATCH
    )
    metrics = {f"{scored.split}_fgsm_accuracy.eps_{eps:.4f}": acc for eps, acc in accuracy.items()}
    figure, axis = plt.subplots(figsize=(4.5, 3.5), dpi=100)
    axis.plot([e * 255 for e in accuracy], list(accuracy.values()), "o-")
    axis.set_xlabel("eps (pixel levels out of 255)")
    axis.set_ylabel("accuracy under FGSM")
    axis.set_ylim(0, 1)
    figure.tight_layout()
    tracking.log_figure(figure, "plots/fgsm_accuracy.png")
    close(figure)
    strongest = max(accuracy)
    shown = min(6, len(images))
    with torch.no_grad():
        clean = loaded.network(images[:shown]).argmax(1)
        fooled = loaded.network(examples[strongest][:shown]).argmax(1)
    grid, titles = [], []
    for i in range(shown):
        grid += [to_image(images[i]), to_image(examples[strongest][i])]
        titles += [
            f"original: {loaded.classes[clean[i]]}",
            f"eps {strongest * 255:.0f}/255: {loaded.classes[fooled[i]]}",
        ]
    figure = image_grid(grid, titles, columns=4)
    tracking.log_figure(figure, "plots/fgsm_examples.png")
    close(figure)
    return metrics


def run_explain(
    model: str,
    images: list[str],
    *,
    method: str = "saliency",
    target: str | None = None,
    patch: int = 8,
    stride: int = 4,
    out: Path | None = None,
    run: RunOptions = RunOptions(),
) -> StageResult:
    """One PNG per image (image, map, overlay) for the target class (default: the predicted one)."""
    if method not in METHODS:
        raise TlkitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    loaded = load_model(model, tracking_uri=run.tracking_uri)
    if method == "gradcam" and loaded.is_pixels:
        raise TlkitError(
            "Grad-CAM needs a backbone's feature map and a pixels baseline has none; use --method saliency or occlusion"
        )
    if target is not None and target not in loaded.classes:
        raise TlkitError(
            f"--target {target!r} is not a class of this model; its classes are {', '.join(loaded.classes)}"
        )
    paths, skipped = expand_images(images)
    if not paths:
        detail = f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise TlkitError(f"no usable images among the {len(images)} path(s) given{detail}; pass image files or folders")
    predicted, confidence = [], []
    for _, batch in _batches(paths, loaded):
        with torch.no_grad():
            probs = loaded.probs(loaded.network(batch))
        predicted += probs.argmax(1).tolist()
        confidence += probs.max(1).values.tolist()
    targets = [loaded.classes.index(target)] * len(paths) if target else predicted
    titles = [
        f"{Path(p).name}: {loaded.classes[t]}" + ("" if target else f" ({c:.2f})")
        for p, t, c in zip(paths, targets, confidence)
    ]
    options = {"patch": patch, "stride": stride} if method == "occlusion" else {}
    params = {"model_uri": model, "method": method, "target": target or "predicted", "images": len(paths)}
    if method == "occlusion":
        params |= {"patch": patch, "stride": stride}
    # without `out`, the maps live in the run alone: drawn in a temporary folder that is removed once logged
    with contextlib.ExitStack() as scratch:
        folder = Path(out) if out else Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="tlkit-explain-")))
        files = _maps_for(loaded, paths, targets, method=method, titles=titles, folder=folder, **options)
        with tracking.start_run(
            "explain",
            run_name=run.named(f"explain ({method}, {len(paths)} image{'s' if len(paths) != 1 else ''})"),
            params=params,
            tags={"tlkit.model_run": _model_run(model)},
        ) as run_id:
            tracking.log_artifacts(folder, f"explain/{method}")
    return StageResult("explain", run_id, details={"skipped": skipped, "folder": out}, files=files if out else [])


def run_filters(
    model: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    out: Path | None = None,
    run: RunOptions = RunOptions(),
) -> StageResult:
    """The first convolution's filters of a timm model (hub or file weights) or of a run's backbone, as a PNG grid."""

    if model.startswith(tracking.RUNS_PREFIX):
        backbone = make_backbone(BackboneConfig(weights=model), tracking_uri=run.tracking_uri)
    else:
        backbone = make_backbone(
            BackboneConfig(model=model, pretrained=pretrained, weights=weights), tracking_uri=run.tracking_uri
        )
    weights_tensor = first_conv_filters(backbone.model)
    figure = filters_figure(
        weights_tensor,
        f"{backbone.name}: first convolution, {weights_tensor.shape[0]} filters "
        f"{weights_tensor.shape[2]}x{weights_tensor.shape[3]} ({backbone.weights})",
    )
    path = Path(out or f"{backbone.name}-filters.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    close(figure)
    with tracking.start_run(
        "filters",
        run_name=run.run_name,
        params={"model": backbone.name, "weights": backbone.weights},
        tags={"tlkit.model_run": _model_run(model)},
    ) as run_id:
        tracking.log_artifact(path, "plots")
    return StageResult(
        "filters", run_id, details={"shape": tuple(weights_tensor.shape), "weights": backbone.weights}, files=[path]
    )


def run_export(
    model: str,
    fmt: str,
    out: Path,
    *,
    run: RunOptions = RunOptions(),
    force: bool = False,
) -> StageResult:
    """The model as ONNX / TorchScript / safetensors + JSON sidecar in `out`; checked against PyTorch."""
    loaded = load_model(model, tracking_uri=run.tracking_uri)
    written = export(loaded, fmt, Path(out), source=model, force=force)
    metrics = {} if written["max_abs_difference"] is None else {"max_abs_difference": written["max_abs_difference"]}
    with tracking.start_run(
        "export",
        run_name=run.named(f"export {fmt}"),
        params={"model_uri": model, "format": fmt, "out": str(Path(out).resolve())},
        tags={"tlkit.model_run": _model_run(model)},
    ) as run_id:
        tracking.log_artifact(written["sidecar"], "export")
        if metrics:
            tracking.log_metrics(metrics)
    return StageResult(
        "export",
        run_id,
        metrics,
        details=json.loads(written["sidecar"].read_text()),
        files=[written["model"], written["sidecar"]],
    )
