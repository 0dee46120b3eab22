"""Settings -> one tracked MLflow run per stage (ingest, extract, baseline, pretrain, finetune, predict).

Each function here composes the library modules and records what it did: the resolved settings
as params, the dataset fingerprint and tlkit version as tags, metrics, plots, and the model. The
CLI and pipelines call these, so a stage logs the same way wherever it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tlkit.config import BackboneConfig, BaselineConfig, ComputeConfig, PretrainConfig, SplitConfig, TrainConfig
from tlkit.core import tracking
from tlkit.core.files import replacing, write_csv
from tlkit.data.ingest import Manifest, format_report, ingest
from tlkit.errors import TlkitError
from tlkit.models import bundle

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tlkit.features.baseline import BaselineResult
    from tlkit.features.extract import FeatureSet
    from tlkit.models.backbone import Backbone
    from tlkit.train.choice import ChoiceSplits
    from tlkit.train.finetune import FitOptions, TrainResult
    from tlkit.train.lr_find import LRFindResult

# Each stage imports the heavy libraries it uses (timm, Lightning, scikit-learn, matplotlib) when it
# runs: a command pays for its own imports only (Lightning alone takes 4 s), and a cached extract none.


log = logging.getLogger("tlkit")


@dataclass
class StageResult:
    """What every tracked stage run produced (the one result type of tlkit.runs): its MLflow run, metrics,
    the model it saved (if any) and the files it wrote outside the store (export, explain, filters)."""

    stage: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    details: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class RunOptions:
    """How a tracked stage records and shows itself, whatever it computes: the MLflow store, the run's name (default:
    what it is) and progress bars. A command or a pipeline point gives the same to each of its stages."""

    tracking_uri: str | None = None
    run_name: str | None = None
    progress: bool = True

    def named(self, default: str) -> str:
        return self.run_name or default


def load_data(data: str | Path | Manifest, split: SplitConfig | None = None, *, warn: bool = True) -> Manifest:
    """A folder, CSV or manifest path (or a Manifest already in hand) -> Manifest.

    The report's warnings (empty class folders, huge images, leaks, imbalance) go to the `tlkit`
    logger, so every command that reads data says them, not only `tlkit ingest`.
    """
    if isinstance(data, Manifest):
        return data
    split = split or SplitConfig()
    manifest = ingest(data, val=split.val, test=split.test, seed=split.seed, shots=split.shots)
    if warn:
        for warning in manifest.report.warnings:
            log.warning(warning)
        if manifest.report.skipped:
            log.warning(
                f"{len(manifest.report.skipped)} file(s) skipped, e.g. {manifest.report.skipped[0][0]}: "
                f"{manifest.report.skipped[0][1]} "
                "(`tlkit ingest` lists them all)"
            )
    return manifest


def require_heldout(manifest: Manifest) -> None:
    """Refuse data with nothing to report on, before any model is built or run started."""
    if not manifest.split("val") and not manifest.split("test"):
        raise TlkitError(
            "the data has no val or test split to report on (every image is in train); let tlkit make them (--val 0.15 "
            "--test 0.15, with no split column or train/ folder), or give val/ or test/ images"
        )


def log_data(manifest: Manifest) -> None:
    counts = {s: len(manifest.split(s)) for s in ("train", "val", "test")}
    tracking.log_params(
        {
            "data.source": manifest.source,
            "data.fingerprint": manifest.fingerprint,
            "data.classes": len(manifest.classes),
            **{f"data.n_{s}": n for s, n in counts.items()},
            **{f"data.split.{k}": v for k, v in manifest.split_settings.items()},
        }
    )
    tracking.set_tags({"tlkit.data_fingerprint": manifest.fingerprint})
    tracking.log_dataset(
        str(manifest.root),
        name=manifest.root.name,
        digest=manifest.fingerprint,
        profile={"classes": len(manifest.classes), **{f"n_{s}": n for s, n in counts.items()}},
    )
    tracking.log_text(format_report(manifest, max_items=10_000), "data/report.txt")


def log_backbone(backbone: Backbone) -> None:
    tracking.log_params(
        {
            "model": backbone.name,
            "weights": backbone.weights,
            "weights_digest": backbone.digest,
            "img_size": backbone.data_config["input_size"][-1],
            "num_features": backbone.num_features,
        }
    )
    tracking.log_dict(
        {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()}, "data_config.json"
    )


def _log_selection(heldout: str, chosen: dict[str, str]) -> None:
    """Record which split the test_* metrics are on, and what chose each setting (never that split)."""
    tracking.log_params({"heldout_split": heldout, **{f"selection.{k}": v for k, v in chosen.items()}})
    tracking.set_tags({"tlkit.heldout_split": heldout})


def _log_figure(figure, path: str) -> None:
    from tlkit.core.metrics import close

    tracking.log_figure(figure, path)
    close(figure)


def _log_confusion(y_true, y_pred, classes: list[str], split: str) -> None:
    from tlkit.core.metrics import confusion_figure

    _log_figure(confusion_figure(y_true, y_pred, classes, title=f"{split} split"), "plots/confusion_matrix.png")


def make_backbone(
    config: BackboneConfig, *, tracking_uri: str | None = None, lazy: bool = False, cache: str | Path | None = None
) -> Backbone:
    """The backbone of `config`; `lazy`: from its card when one exists (tlkit.models.cards), built on first use of
    `.model`."""
    if lazy:
        from tlkit.models.cards import backbone_for

        return backbone_for(config, tracking_uri=tracking_uri, cache=cache)
    from tlkit.models.backbone import create_backbone

    return create_backbone(
        config.model,
        pretrained=config.pretrained,
        weights=config.weights,
        img_size=config.img_size,
        seed=config.seed,
        tracking_uri=tracking_uri,
    )


# ----------------------------------------------------------------------------------------------


def run_ingest(
    data: str | Path, split: SplitConfig, *, out: Path | None = None, run_name: str | None = None
) -> tuple[Manifest, Path, StageResult]:
    """Ingest `data`, write the manifest to `out`, and log the report as a run."""
    manifest = load_data(data, split, warn=False)  # the caller prints the whole report
    out = Path(out or f"{Path(data).resolve().name}.manifest.json")
    manifest.save(out)
    with tracking.start_run(
        "ingest", run_name=run_name or f"ingest {Path(data).name}", params=split.model_dump()
    ) as run_id:
        log_data(manifest)
        tracking.log_artifact(out, "data")
        tracking.log_metrics(
            {
                "images": len(manifest.records),
                "skipped": len(manifest.report.skipped),
                "duplicate_groups": len(manifest.report.duplicates),
            }
        )
    return manifest, out, StageResult("ingest", run_id)


def _features(
    manifest: Manifest,
    backbone: Backbone | None,
    compute: ComputeConfig,
    pixel_size: int,
    *,
    progress: bool = True,
    layers: str = "last",
) -> FeatureSet:
    from tlkit.features.extract import extract_features, pixel_features

    if backbone is None:
        return pixel_features(manifest, size=pixel_size, cache=compute.cache_dir)
    return extract_features(manifest, backbone, compute=compute, progress=progress, layers=layers)


def run_extract(
    data: str | Path | Manifest,
    backbone_config: BackboneConfig,
    *,
    split: SplitConfig | None = None,
    compute: ComputeConfig | None = None,
    run: RunOptions = RunOptions(),
    layers: str = "last",
) -> tuple[FeatureSet, StageResult]:
    """Frozen features of every image, cached; the run records throughput and whether the cache hit. `layers`:
    "last", the backbone's pooled features (what `tlkit baseline` reads by default); "all", every stage's too (what
    `baseline --layers all` and a fine-tune's probe read on a CNN)."""
    manifest = load_data(data, split)
    compute = compute or ComputeConfig()
    backbone = make_backbone(backbone_config, tracking_uri=run.tracking_uri, lazy=True, cache=compute.cache_dir)
    if layers == "all":
        from tlkit.models.multilayer import check_stages_of

        check_stages_of(backbone.name)  # a vision transformer is refused before its run starts
    name = f"{backbone.name} features{' (all layers)' if layers == 'all' else ''}"
    params = {"compute": compute.model_dump(), "layers": layers}
    with tracking.start_run("extract", run_name=run.named(name), params=params) as run_id:
        log_data(manifest)
        log_backbone(backbone)
        start = time.perf_counter()
        features = _features(manifest, backbone, compute, 0, progress=run.progress, layers=layers)
        seconds = time.perf_counter() - start
        tracking.log_params({"precision": features.meta["precision"], "feature_key": features.key})
        tracking.set_tags({"tlkit.cache_hit": str(features.cached)})
        tracking.log_metrics(
            {"images": len(features.X), "seconds": seconds, "images_per_s": len(features.X) / max(seconds, 1e-9)}
        )
    return features, StageResult(
        "extract", run_id, details={"seconds": seconds, "cached": features.cached, "shape": features.X.shape}
    )


def run_baseline(
    data: str | Path | Manifest,
    backbone_config: BackboneConfig,
    baseline: BaselineConfig,
    *,
    split: SplitConfig | None = None,
    compute: ComputeConfig | None = None,
    run: RunOptions = RunOptions(),
) -> StageResult:
    """Fit a linear classifier on cached features (or raw pixels) and save it as the run's model."""
    manifest = load_data(data, split)
    require_heldout(manifest)
    compute = compute or ComputeConfig()
    pixels = baseline.classifier == "pixels"
    backbone = (
        None
        if pixels
        else make_backbone(backbone_config, tracking_uri=run.tracking_uri, lazy=True, cache=compute.cache_dir)
    )
    classifier = "svm" if pixels else baseline.classifier
    layers = "last" if pixels else baseline.layers
    params = {"classifier": classifier, "features": "pixels" if pixels else "backbone", "seed": baseline.seed}
    if pixels:
        params["pixel_size"] = baseline.pixel_size
    else:
        params["layers"] = layers
    if backbone is not None and layers == "all":
        from tlkit.models.multilayer import check_stages_of

        check_stages_of(backbone.name)  # a vision transformer is refused before its run starts
    reads = f"{backbone.name}{' (all layers)' if layers == 'all' else ''}" if backbone is not None else "pixels"
    name = run.named(f"{reads} + {classifier}")
    with tracking.start_run("baseline", run_name=name, params=params, tags=tracking.RANKED) as run_id:
        log_data(manifest)
        if backbone is not None:
            log_backbone(backbone)
        features = _features(manifest, backbone, compute, baseline.pixel_size, progress=run.progress, layers=layers)
        from tlkit.features.baseline import fit_baseline

        start = time.perf_counter()
        result = fit_baseline(features, classifier=classifier, seed=baseline.seed)
        fit_seconds = time.perf_counter() - start
        tracking.log_params({"C": result.C, "feature_key": features.key})
        _log_selection(result.heldout_split, {"C": result.selection, "temperature": result.calibration})
        tracking.set_tags({"tlkit.cache_hit": str(features.cached)})
        tracking.log_metrics(
            {**result.metrics, "selection_accuracy": result.selection_score, "fit_seconds": fit_seconds}
        )
        _log_confusion(result.y_true, result.y_pred, manifest.classes, result.heldout_split)
        saved = bundle.Bundle(
            kind="baseline",
            model_name=None if backbone is None else backbone.name,
            data_config=dict(backbone.data_config)
            if backbone
            else {"input_size": (3, baseline.pixel_size, baseline.pixel_size)},
            classes=manifest.classes,
            features="pixels" if pixels else "backbone",
            layers=layers,
            pixel_size=baseline.pixel_size if pixels else None,
            weights="" if backbone is None else backbone.weights,
            head={"calibration": result.calibration},
            extra={"classifier": classifier, "C": result.C},
        )
        _save_model(saved, None if backbone is None else backbone.model, result.head)
    details = {
        "C": result.C,
        "cached": features.cached,
        "model": "pixels" if backbone is None else backbone.name,
        "layers": layers,
        "heldout_split": result.heldout_split,
        "selection": result.selection,
    }
    return StageResult(
        stage="baseline", run_id=run_id, metrics=result.metrics, model_uri=f"runs:/{run_id}", details=details
    )


def _save_model(saved: bundle.Bundle, backbone, head, *, members: dict | None = None) -> None:
    """The model as the active run's `model/` artifact: a bundle (tensors + JSON) inside an MLflow pyfunc model;
    `members` (an ensemble's other networks) as bundle.save_bundle takes them."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = bundle.save_bundle(Path(tmp) / "bundle", saved, backbone=backbone, head=head, members=members)
        tracking.log_model(folder, bundle.ARTIFACT_PATH, code=Path(__file__).parents[1] / "review" / "pyfunc_model.py")


def checkpoint_dir(run_id: str) -> Path:
    """Where a training run keeps last.ckpt / best.ckpt, so that --resume finds them."""
    return Path(os.environ.get("TLKIT_CHECKPOINTS", ".tlkit/checkpoints")) / run_id


def _resolve_auto_lr(
    manifest: Manifest, backbone: Backbone, train: TrainConfig, compute: ComputeConfig
) -> tuple[TrainConfig, LRFindResult]:
    """--lr auto: sweep the rates (ratios kept), log the plot to the active run, return the suggested rate."""
    from tlkit.core.metrics import close
    from tlkit.core.runtime import resolve_precision
    from tlkit.train.finetune import build_module, train_loader, with_resolved_defaults
    from tlkit.train.lr_find import find_lr

    probe = with_resolved_defaults(train, manifest).model_copy(update={"lr": 1e-3})
    module = build_module(manifest, backbone, probe)
    loader, _ = train_loader(manifest, backbone, probe, num_workers=compute.num_workers)
    found = find_lr(module, loader, precision=resolve_precision(compute.precision))
    figure = found.figure()
    tracking.log_figure(figure, "plots/lr_find.png")
    close(figure)
    tracking.log_metrics({"suggested_lr": found.suggestion})
    return train.model_copy(update={"lr": found.suggestion}), found


def run_lr_find(
    data: str | Path | Manifest,
    backbone_config: BackboneConfig,
    train: TrainConfig,
    *,
    split: SplitConfig | None = None,
    compute: ComputeConfig | None = None,
    run: RunOptions = RunOptions(),
) -> StageResult:
    """Sweep learning rates for this backbone and data; log the loss-vs-LR plot and the suggestion."""
    manifest = load_data(data, split)
    compute = compute or ComputeConfig()
    backbone = make_backbone(backbone_config, tracking_uri=run.tracking_uri)
    with tracking.start_run("lr-find", run_name=run.run_name, params={"train": train.model_dump()}) as run_id:
        log_data(manifest)
        log_backbone(backbone)
        _, found = _resolve_auto_lr(manifest, backbone, train, compute)
    return StageResult(
        "lr-find", run_id, {"suggested_lr": found.suggestion}, details={"lrs": found.lrs, "losses": found.losses}
    )


def run_train(
    data: str | Path | Manifest,
    backbone_config: BackboneConfig,
    train: TrainConfig,
    *,
    split: SplitConfig | None = None,
    compute: ComputeConfig | None = None,
    run: RunOptions = RunOptions(),
    resume: str | Path | None = None,
    score_probe: bool = True,
) -> StageResult:
    """Train backbone + new head and save the best epoch as the run's model: a pretrain run when `train` is a
    PretrainConfig (`tlkit pretrain`, a pretrain stage), else a finetune run.

    `resume` continues an interrupted fit from its last checkpoint: a run id (str) into that same MLflow run; a
    checkpoint file (Path: a lost Ray point's `last.ckpt`) into a new run, tagged `tlkit.resumed_from`. With
    `score_probe` (finetune of pretrained weights), the linear probes on the same backbone's frozen features are
    fitted first, from the feature cache when it has them; the better one's held-out accuracy is logged beside the
    fine-tune's, and the run's model is the one `train.keep` says (tlkit.train.choice): by default whichever of the
    two scores higher on a split that reports nothing.
    """
    kind = "pretrain" if isinstance(train, PretrainConfig) else "finetune"
    start_from = resume if isinstance(resume, Path) else None
    resume_run = resume if isinstance(resume, str) else None
    manifest = load_data(data, split)
    require_heldout(manifest)  # before torch, Lightning and the model load
    from tlkit.train.callbacks import MetricsCallback
    from tlkit.train.finetune import FitOptions, check_settings, train_classifier

    compute = compute or ComputeConfig()
    backbone = make_backbone(backbone_config, tracking_uri=run.tracking_uri)
    check_settings(manifest, backbone, train)  # every setting's error before the run (and the store) exists
    with_probe = score_probe and kind == "finetune" and not backbone.weights.startswith("random")
    if kind == "finetune" and train.keep in ("probe", "ensemble") and not with_probe:
        raise TlkitError(
            f"--keep {train.keep} delivers a linear probe on the pretrained backbone's frozen features"
            f"{' (with the fine-tune)' if train.keep == 'ensemble' else ''}, but this fine-tune has none (random "
            f"weights, or --no-probe); drop --keep {train.keep} or give pretrained --weights"
        )
    with tracking.start_run(
        kind,
        run_name=run.named(f"{backbone.name} {kind} ({train.strategy})"),
        params={"train": train.model_dump()},
        run_id=resume_run,
        tags=tracking.RANKED if kind == "finetune" else None,
    ) as run_id:
        log_data(manifest)
        log_backbone(backbone)
        # before training: the backbone is trained in place
        probe = _frozen_probe(manifest, backbone, train, compute=compute, progress=run.progress) if with_probe else None
        if train.lr == "auto":
            train, found = _resolve_auto_lr(manifest, backbone, train, compute)
        _log_train_batch(manifest, backbone, train)
        workdir = _checkpoint_workdir(run_id, start_from)
        fit = FitOptions(
            callbacks=[MetricsCallback(run_id)], workdir=workdir, resume=resume is not None, progress=run.progress
        )
        fit_on = probe.splits.manifest if probe is not None and probe.splits is not None else manifest
        train, fit, refit = _plan_refit(kind, manifest, backbone, train, probe=probe, compute=compute, fit=fit)
        result = train_classifier(fit_on, backbone, train, compute=compute, fit=fit)
        fitted = _Fitted(run_id=run_id, kind=kind, manifest=fit_on, backbone=backbone, train=train, result=result)
        summary = _record_fit(fitted, resumed=resume_run is not None)
        delivered = _deliver(fitted, probe, compute=compute, refit=refit)
    shutil.rmtree(workdir, ignore_errors=True)  # finished: the model is in the run; checkpoints only serve --resume
    details = {
        **summary,
        **delivered.details,
        # None, not -1, when no epoch was chosen (a refit keeps its last)
        "best_epoch": delivered.details.get("best_epoch", result.best_epoch),
        "heldout_split": result.heldout_split,
        "precision": result.settings["precision"],
    }
    return StageResult(
        stage=kind, run_id=run_id, metrics=delivered.metrics, model_uri=f"runs:/{run_id}", details=details
    )


@dataclass
class _Probe:
    """A fine-tune's frozen probe: the model it would deliver (`tlkit baseline`'s, fitted on all of train), the
    pretrained backbone it reads, and the split that chooses between it and the fine-tune (None: no choice)."""

    result: BaselineResult
    classifier: str
    layers: str  # the backbone's layers it reads: "last" or "all" (tlkit.models.multilayer)
    pretrained: torch.nn.Module
    splits: ChoiceSplits | None
    selection_accuracy: float | None
    heldout_logits: np.ndarray  # calibrated, of the probe as delivered, on the held-out split
    selection_logits: np.ndarray | None  # calibrated, of the probe fitted without the selection split, on it


def _frozen_probe(
    manifest: Manifest, backbone: Backbone, train: TrainConfig, *, compute: ComputeConfig, progress: bool
) -> _Probe:
    """The better linear probe on the backbone's frozen features (from the feature cache when it has them): the SVM
    or logistic regression, each calibrated as `tlkit baseline` calibrates it, whichever scores higher where it is
    chosen (a tie: the SVM); with its accuracy on the selection split when `train.keep` is best.

    The probe reads every stage of the backbone where it has stages (a CNN: `tlkit baseline --layers all`,
    tlkit.models.multilayer), else the last layer. Chosen on the whole transfer suite, not by each run's val split:
    against the last layer, every layer gave the probe the fine-tune would get the same or better test accuracy on
    all seven sets (chest X-rays 0.747 against 0.680), where a choice between the two on val picked the last layer on
    six of them, losing up to 0.067 (docs/fine-tuning.md)."""
    import copy

    from tlkit.features.baseline import CLASSIFIERS, fit_baseline
    from tlkit.models.multilayer import has_stages
    from tlkit.train import choice

    layers = "all" if has_stages(backbone.model) else "last"
    features = _features(manifest, backbone, compute, 0, progress=progress, layers=layers)
    fits = {kind: fit_baseline(features, classifier=kind, seed=train.seed) for kind in CLASSIFIERS}
    splits = choice.choice_splits(manifest, use_val=train.use_val, seed=train.seed) if train.keep == "best" else None
    if splits is not None and splits.split == choice.SELECT:
        carved = choice.with_splits_of(features, splits.manifest)
        scores = {
            kind: choice.probe_selection_accuracy(carved, splits.split, classifier=kind, seed=train.seed)
            for kind in fits
        }
    else:  # where each chose its C: val when a test split reports, else cross-validation on train
        scores = {kind: fit.selection_score for kind, fit in fits.items()}
    kind = choice.better_probe(scores)
    head, heldout = fits[kind].head, fits[kind].heldout_split
    selection_logits = None
    if splits is not None:
        C = fits[kind].C if splits.split == "val" else None  # val chose it; else cross-validation on the rest
        on = features if splits.split == "val" else choice.with_splits_of(features, splits.manifest)
        selection_logits = choice.selection_probe_logits(on, splits.split, classifier=kind, seed=train.seed, C=C)
    return _Probe(
        result=fits[kind],
        classifier=kind,
        layers=layers,
        pretrained=copy.deepcopy(backbone.model),
        splits=splits,
        selection_accuracy=scores[kind] if splits is not None else None,
        heldout_logits=head.numpy_logits(features.subset(heldout)[0]) / float(head.temperature),
        selection_logits=selection_logits,
    )


def _log_train_batch(manifest: Manifest, backbone: Backbone, train: TrainConfig) -> None:
    from tlkit.train.finetune import train_batch_figure

    figure = train_batch_figure(
        manifest,
        backbone.data_config,
        train.augment,
        hflip=train.hflip,
        seed=train.seed,
        title=f"training images as the model sees them (augment: {Path(train.augment).name})",
    )
    _log_figure(figure, "plots/train_batch.png")


def _checkpoint_workdir(run_id: str, start_from: Path | None) -> Path:
    """The run's checkpoint folder; seeded with `start_from` (a lost Ray point's last.ckpt) when given."""
    workdir = checkpoint_dir(run_id)
    if start_from is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        with replacing(workdir / "last.ckpt") as target:
            shutil.copyfile(start_from, target)
        tracking.set_tags({"tlkit.resumed_from": start_from.parent.name})
    return workdir


@dataclass
class _Fitted:
    """A finished fit and what it was fitted from."""

    run_id: str
    kind: str
    manifest: Manifest
    backbone: Backbone
    train: TrainConfig
    result: TrainResult


def _record_fit(fitted: _Fitted, *, resumed: bool) -> dict[str, float]:
    """A finished fit into its run: resolved settings, how its epoch was chosen, its curves."""
    run_id, kind, backbone = fitted.run_id, fitted.kind, fitted.backbone
    train, result = fitted.train, fitted.result
    from tlkit.core.metrics import curves_figure

    resolved = result.settings
    if not resumed:
        tracking.log_params(
            {
                "precision": resolved["precision"],
                "lr_resolved": train.lr,
                "batch_size_resolved": resolved["batch_size"],
                "epochs_resolved": resolved["epochs"],
                "layer_groups": resolved["groups"],
                "group_lrs": [f"{lr:.3g}" for lr in resolved["group_lrs"]],
                "phases": [f"{p['name']}@{p['start']}" for p in resolved["phases"]],
            }
        )
    _log_selection(result.heldout_split, resolved["selection"])
    tracking.log_dict(resolved["train_transform"], "augment/train_transform.json")
    summary: dict[str, float] = {
        "best_epoch": result.best_epoch if result.best_epoch is not None else -1,
        "epochs_run": result.epochs_run,
    }
    if result.best_val_accuracy is not None:
        summary["best_val_accuracy"] = result.best_val_accuracy
    if "probe_selection_accuracy" in resolved:
        summary["probe_selection_accuracy"] = resolved["probe_selection_accuracy"]
    tracking.log_metrics(summary)
    history = {
        key: tracking.metric_steps(run_id, key) for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
    }
    phases = [(p["start"], p["name"]) for p in resolved["phases"]]
    _log_figure(
        curves_figure(
            history,
            phases,
            kept=result.best_epoch if result.best_epoch is not None else result.epochs_run,
            title=f"{kind} {backbone.name}: {train.strategy}",
        ),
        "plots/training_curves.png",
    )
    return summary


def _plan_refit(
    kind: str,
    manifest: Manifest,
    backbone: Backbone,
    train: TrainConfig,
    *,
    probe: _Probe | None,
    compute: ComputeConfig,
    fit: FitOptions,
) -> tuple[TrainConfig, FitOptions, _Refit | None]:
    """How val joins a fine-tune that refits (use_val 'refit', where a test split reports; without one, val is the
    held-out split and never trains): with no probe to choose against, or --keep finetune, the fine-tune is
    delivered whatever val says, so val joins its one fit (unless --patience needs val to stop on: then val judges
    it, as with select); otherwise val judges the first fit and a `_Refit` trains the delivered one again on
    train + val."""
    refits = kind == "finetune" and train.use_val == "refit" and manifest.split("test") and manifest.split("val")
    if not refits:
        return train, fit, None
    if probe is None or train.keep == "finetune":
        return train.model_copy(update={"use_val": "select" if train.patience else "train"}), fit, None
    refit = _Refit(manifest, backbone, train, compute=compute, fit=fit, pretrained=probe.pretrained)
    return train, dataclasses.replace(fit, checkpoint_at_end=True), refit  # a --resume during the refit finds it done


@dataclass
class _Refit:
    """The fine-tune trained again on train + val from the pretrained weights, with the recipe and the number of
    epochs of the fit that val judged, the last epoch kept: what `tlkit baseline` does with its probe after val chose
    its C. With 25 training images a class (flowers17, 17 classes), the probe's val images are 40% more data, and
    the fine-tune trained on train alone lost to it by 0.10 on test (0.718 against 0.818); trained on train + val it
    scored 0.869 (docs/fine-tuning.md)."""

    manifest: Manifest  # with its val split, which joins train
    backbone: Backbone
    train: TrainConfig
    compute: ComputeConfig
    fit: FitOptions
    pretrained: torch.nn.Module  # the backbone's weights before any fit (the selection fit trains `backbone` in place)

    def __call__(self, judged: TrainResult, temperature: tuple[float, str]) -> TrainResult:
        """Train it; `judged`: the fit on train alone (its epochs run: fewer where --patience stopped it),
        `temperature`: the one fitted on val for it, which the refit (trained on val) takes."""
        import copy
        from dataclasses import replace

        from tlkit.core import lines
        from tlkit.train.finetune import FitOptions, train_classifier

        update: dict = {"use_val": "train", "patience": None}
        if judged.epochs_run and judged.epochs_run < int(judged.settings["epochs"]):
            update["epochs"] = judged.epochs_run  # early stopping chose fewer epochs
        settings = self.train.model_copy(update=update)
        images = len(self.manifest.split("train")) + len(self.manifest.split("val"))
        if self.fit.progress:
            lines.say(f"refit: the fine-tune again on train + val ({images} images), the last epoch kept")
        workdir = self.fit.workdir / "refit" if self.fit.workdir else None  # None: a temporary folder
        backbone = replace(self.backbone, model=copy.deepcopy(self.pretrained))
        fit = FitOptions(
            callbacks=[],  # the run's curves are the judged fit's
            workdir=workdir,
            resume=self.fit.resume and workdir is not None and (workdir / "last.ckpt").exists(),
            progress=self.fit.progress,
            temperature=temperature,
        )
        return train_classifier(self.manifest, backbone, settings, compute=self.compute, fit=fit)


@dataclass
class _Delivered:
    """The run's model, as chosen (tlkit.train.choice): its held-out metrics, and what the run says of the choice."""

    metrics: dict[str, float]
    details: dict


@dataclass
class _Ensemble:
    """The fine-tune and its probe averaged: the fine-tune member's temperature, and the held-out figures."""

    temperature: float
    how: str
    metrics: dict[str, float]
    y_pred: np.ndarray


def _ensemble(fitted: _Fitted, probe: _Probe, scores: dict[str, float], *, compute: ComputeConfig) -> _Ensemble:
    """Score the ensemble on the selection split (into `scores`) and on the held-out split. The fine-tune member's
    temperature is fitted on the selection split; without one, on val where val chose the epoch; else it is 1."""
    from tlkit.features.calibrate import fit_temperature
    from tlkit.train.choice import mean_probabilities
    from tlkit.train.finetune import split_logits

    manifest, result = fitted.manifest, fitted.result

    def logits(split: str) -> np.ndarray:
        return split_logits(result, manifest, split, fitted.backbone, compute=compute)

    def labels(split: str) -> np.ndarray:
        return manifest.labels(manifest.split(split))

    if probe.splits is not None and probe.selection_logits is not None:
        split = probe.splits.split
        temperature = fit_temperature(logits(split), labels(split))
        how = f"the fine-tune's temperature on {probe.splits.how}"
        probs = mean_probabilities(logits(split) / temperature, probe.selection_logits)
        scores["ensemble"] = float((probs.argmax(1) == labels(split)).mean())
    elif "val" in result.logits and result.heldout_split == "test":
        temperature, how = result.temperature, "the fine-tune's temperature on the val split (it chose the epoch)"
    else:
        temperature, how = 1.0, "the fine-tune uncalibrated (no split is left to fit its temperature on)"
    heldout = result.heldout_split
    metrics, y_pred = _ensemble_heldout(manifest, heldout, logits=logits(heldout), probe=probe, temperature=temperature)
    return _Ensemble(temperature=temperature, how=how, metrics=metrics, y_pred=y_pred)


def _ensemble_heldout(
    manifest: Manifest, heldout: str, *, logits: np.ndarray, probe: _Probe, temperature: float
) -> tuple[dict[str, float], np.ndarray]:
    """The ensemble's held-out metrics and predictions, from the fine-tune member's logits there."""
    from tlkit.core.metrics import calibration, classification_metrics
    from tlkit.train.choice import mean_probabilities

    probs = mean_probabilities(logits / temperature, probe.heldout_logits)
    y_true, y_pred = manifest.labels(manifest.split(heldout)), probs.argmax(1)
    metrics = classification_metrics(y_true, y_pred, manifest.classes, prefix="heldout_")
    metrics["heldout_ece"] = calibration(y_true, probs)[0]
    raw_probe = probe.heldout_logits * float(probe.result.head.temperature)
    metrics["heldout_ece_uncalibrated"] = calibration(y_true, mean_probabilities(logits, raw_probe))[0]
    metrics["temperature"] = temperature  # the fine-tune member's (the probe member's is its run's)
    return metrics, y_pred


def _refitted(
    refit: _Refit, fitted: _Fitted, probe: _Probe, ensemble: _Ensemble, *, kept: str, compute: ComputeConfig
) -> tuple[TrainResult, _Ensemble, dict]:
    """The refit of the fine-tune that val judged (`fitted`), with the temperature val gave it (alone, or as the
    ensemble's member); the ensemble's held-out figures with it as member (as judged where it is not kept); what
    the run says of it (details, and its held-out `figures`)."""
    from tlkit.train.finetune import split_logits

    judged = fitted.result
    how = "the fit on train alone, on the val split (the refit trains on val)"
    in_ensemble = (ensemble.temperature, f"{ensemble.how}, of {how}")
    result = refit(judged, in_ensemble if kept == "ensemble" else (judged.temperature, f"temperature of {how}"))
    if kept == "ensemble":
        heldout = result.heldout_split
        logits = split_logits(result, fitted.manifest, heldout, fitted.backbone, compute=compute)
        metrics, y_pred = _ensemble_heldout(
            fitted.manifest, heldout, logits=logits, probe=probe, temperature=ensemble.temperature
        )
        ensemble = dataclasses.replace(ensemble, metrics=metrics, y_pred=y_pred)
    images = len(fitted.manifest.split("train")) + len(fitted.manifest.split("val"))
    figures = {
        "selection_fit_heldout_accuracy": judged.metrics["heldout_accuracy"],
        "finetune_heldout_accuracy": result.metrics["heldout_accuracy"],
        "ensemble_heldout_accuracy": ensemble.metrics["heldout_accuracy"],
    }
    said = f"train + val ({images} images), {result.settings['epochs']} epochs, the last kept"
    return result, ensemble, {"refit": said, "best_epoch": None, "figures": figures}


def _deliver(
    fitted: _Fitted, probe: _Probe | None, *, compute: ComputeConfig, refit: _Refit | None = None
) -> _Delivered:
    """Choose between the fine-tune, its probe and their ensemble, and log the chosen one as the run's model with its
    metrics; with `refit`, a chosen fine-tune (alone or in the ensemble) is first trained again on train + val."""
    from tlkit.models import heads
    from tlkit.train.choice import choose
    from tlkit.train.finetune import split_accuracy

    manifest, backbone, train, result = fitted.manifest, fitted.backbone, fitted.train, fitted.result
    kept, scores, figures, ensemble = "finetune", {}, {}, None
    details: dict = {"kept": "finetune", "keep": train.keep}
    if probe is not None:
        details["probe_classifier"] = probe.classifier
        details["probe_layers"] = probe.layers
        figures["finetune_heldout_accuracy"] = result.metrics["heldout_accuracy"]
        figures["probe_heldout_accuracy"] = probe.result.metrics["heldout_accuracy"]
        if probe.splits is not None and probe.selection_accuracy is not None:
            tuned = result.best_val_accuracy if probe.splits.split == "val" else None
            if tuned is None:
                tuned = split_accuracy(result, manifest, probe.splits.split, backbone, compute=compute)
            scores = {"finetune": tuned, "probe": probe.selection_accuracy}
            details["choice_split"] = probe.splits.how
        ensemble = _ensemble(fitted, probe, scores, compute=compute)
        figures["ensemble_heldout_accuracy"] = ensemble.metrics["heldout_accuracy"]
        # best without a selection split (every class has one training image): the fine-tune
        kept = choose(scores, train.keep) if scores else ("finetune" if train.keep == "best" else train.keep)
        details.update(kept=kept, selection_scores=scores)
        if refit is not None and kept in ("finetune", "ensemble"):
            result, ensemble, refitted = _refitted(refit, fitted, probe, ensemble, kept=kept, compute=compute)
            figures.update(refitted.pop("figures"))
            details.update(refitted)
    if fitted.kind == "finetune":
        chosen = {"selection.kept": details["choice_split"]} if scores else {}
        probe_params = {
            "probe_classifier": details.get("probe_classifier", ""),
            "probe_layers": details.get("probe_layers", ""),
        }
        refitted = {"refit": details["refit"]} if "refit" in details else {}
        tracking.log_params({"kept": kept, **probe_params, **chosen, **refitted})
        tracking.set_tags({"tlkit.kept": kept})
    saved = bundle.Bundle(
        kind=fitted.kind,
        model_name=backbone.name,
        data_config=dict(backbone.data_config),
        classes=manifest.classes,
        weights=backbone.weights,
        extra={"best_epoch": result.best_epoch, "strategy": train.strategy, "hflip": train.hflip, "kept": kept},
    )
    members: dict = {}
    if kept == "probe" and probe is not None:
        metrics, scored = probe.result.metrics, (probe.result.y_true, probe.result.y_pred, probe.result.heldout_split)
        saved.head = {"calibration": probe.result.calibration, "C": probe.result.C}
        saved.extra.update(best_epoch=None, classifier=probe.classifier)
        saved.layers = probe.layers
        body, head = probe.pretrained, probe.result.head
    elif kept == "ensemble" and probe is not None and ensemble is not None:
        metrics, scored = ensemble.metrics, (result.y_true, ensemble.y_pred, result.heldout_split)
        saved.head = {"calibration": ensemble.how}
        body, head = result.module.backbone, heads.from_linear(result.module.head, temperature=ensemble.temperature)
        member = bundle.Bundle(
            kind="baseline",
            model_name=backbone.name,
            data_config=dict(backbone.data_config),
            classes=manifest.classes,
            weights=backbone.weights,
            layers=probe.layers,
            head={"calibration": probe.result.calibration},
            extra={"classifier": probe.classifier, "C": probe.result.C},
        )
        members[bundle.PROBE_MEMBER] = (member, probe.pretrained, probe.result.head)
    else:
        metrics, scored = result.metrics, (result.y_true, result.y_pred, result.heldout_split)
        saved.head = {"calibration": result.settings["selection"].get("temperature", "none")}
        body, head = result.module.backbone, heads.from_linear(result.module.head, temperature=result.temperature)
    tracking.log_metrics({**metrics, **figures, **{f"selection_accuracy_{k}": v for k, v in scores.items()}})
    _log_confusion(scored[0], scored[1], manifest.classes, scored[2])
    _save_model(saved, body, head, members=members)
    return _Delivered(metrics=metrics, details={**details, **figures})


def run_predict(
    model: str,
    images: list[str],
    *,
    top_k: int = 1,
    out: Path | None = None,
    run: RunOptions = RunOptions(),
) -> tuple[list[dict], list[tuple[str, str]], StageResult]:
    """Top-k classes per image from a saved model; the predictions CSV is logged as an artifact."""
    from tlkit.review.predict import predict_images

    rows, skipped, loaded = predict_images(model, images, top_k=top_k, tracking_uri=run.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        target = write_csv(Path(out) if out else Path(tmp) / "predictions.csv", rows)
        count = len(rows) // max(1, min(top_k, len(loaded.classes)))
        with tracking.start_run(
            "predict",
            run_name=run.named(f"predict ({count} image{'s' if count != 1 else ''})"),
            params={"model_uri": model, "top_k": top_k, "images": count},
        ) as run_id:
            tracking.log_artifact(target, "predictions")
            tracking.log_metrics({"skipped": len(skipped)})
    return rows, skipped, StageResult("predict", run_id)
