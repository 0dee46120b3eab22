"""Manifest + Backbone + strategy -> trained classifier (Lightning): the best epoch's weights and metrics.

Used by `tlkit pretrain` (train a backbone on a source task) and `tlkit finetune` (transfer it with
a new head). Here: the settings a fit resolves from the data, its loaders, and the fit itself; the
Lightning module (layer groups, one explicit learning rate each) is in `module.py`, its callbacks in
`callbacks.py`, and which groups train when in `strategies.py`.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from tlkit.config import ComputeConfig, TrainConfig
from tlkit.core import runtime
from tlkit.core.metrics import classification_metrics
from tlkit.data import augment
from tlkit.data.ingest import Manifest
from tlkit.data.loaders import DecodedImages, ImageDataset, default_image_cache_mb, make_loader
from tlkit.errors import TlkitError
from tlkit.features.forward import infer
from tlkit.models.backbone import Backbone, layer_groups, merge_groups
from tlkit.models.heads import class_rows
from tlkit.train.callbacks import (
    LastPhaseEarlyStopping,
    LatestCheckpoint,
    PhaseCallback,
    WholeModelCheckpoint,
)
from tlkit.train.module import MONITOR, ImageClassifier
from tlkit.train.strategies import group_lrs, plan_phases

if TYPE_CHECKING:
    from tlkit.features.extract import FeatureSet

DEFAULT_BATCH = 32
# the default batch shrinks (to 8 at least) so that a small training set still makes this many steps an epoch
MIN_STEPS_PER_EPOCH = 8
MIN_DEFAULT_STEPS = 100  # the default epochs (10) rise on a small training set to make this many optimizer steps
LP_FT_C_GRID = (0.01, 0.1, 1.0, 10.0)  # LP-FT's probe: L-BFGS logistic regression on raw features (no scaling)
# Without a test split the val split is held out: it chooses nothing, so scoring it during training only draws a curve
# (the weights and every result are the same). At most this many points of it, not one every epoch.
HELDOUT_CURVE_POINTS = 5


@dataclass
class TrainResult:
    """The trained module (best epoch's weights loaded) and how it did."""

    module: ImageClassifier
    best_epoch: int | None
    best_val_accuracy: float | None
    metrics: dict[str, float]
    heldout_split: str
    y_true: np.ndarray
    y_pred: np.ndarray
    epochs_run: int
    settings: dict = field(default_factory=dict)
    temperature: float = 1.0  # divides the head's logits: softmax of them is calibrated (tlkit.features.calibrate)
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # float32 logits before T, of each split scored


def _dataset(manifest: Manifest, split: str, transform, decoded: DecodedImages | None = None) -> ImageDataset:
    records = manifest.split(split)
    return ImageDataset(
        [manifest.abspath(r) for r in records], manifest.labels(records), augment.ToTensor(transform), decoded
    )


def decode_split(
    manifest: Manifest, split: str, transform, *, memory_mb: float, cache: str | Path | None = None
) -> DecodedImages:
    """The split's images decoded once at the side `transform` reads (see data.DecodedImages)."""
    records = manifest.split(split)
    return DecodedImages(
        [manifest.abspath(r) for r in records],
        [r.sha256 for r in records],
        [(r.width, r.height) for r in records],
        augment.decode_side(transform),
        memory_mb=memory_mb,
        cache=cache,
    )


def build_module(manifest: Manifest, backbone: Backbone, settings: TrainConfig) -> ImageClassifier:
    """The module with its layer groups, learning rates, phases and class weights."""
    if settings.lr == "auto":
        raise TlkitError("lr 'auto' must be resolved with tlkit.train.lr_find before building the module")
    groups = merge_groups(layer_groups(backbone.model), settings.groups)
    phases = plan_phases(
        settings.strategy,
        epochs=settings.epochs,
        n_groups=len(groups),
        freeze_epochs=settings.freeze_epochs,
        unfreeze_every=settings.unfreeze_every,
    )
    counts = np.bincount(manifest.labels(manifest.split("train")), minlength=len(manifest.classes)).astype(np.float64)
    weights = None
    if settings.balance == "weights":
        weights = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    module = ImageClassifier(
        backbone.model,
        backbone.num_features,
        len(manifest.classes),
        groups=groups,
        lrs=group_lrs(
            settings.lr, len(groups), lr_mult=settings.lr_mult, lrs=settings.lrs, frozen=settings.frozen_groups
        ),
        phases=phases,
        class_weights=weights,
        settings=settings,
    )
    return module.to(memory_format=torch.channels_last)


def with_resolved_defaults(settings: TrainConfig, manifest: Manifest) -> TrainConfig:
    """`settings` with the default batch size resolved (32, or fewer for a small training set) and, where epochs were
    not given, the default 10 epochs raised to at least MIN_DEFAULT_STEPS optimizer steps.

    With 40 training images a batch of 32 makes one optimizer step an epoch (the last, partial batch is
    dropped), so the default batch keeps 8 steps an epoch where it can. Ten epochs of 8 steps fine-tune a few
    hundred photos as well as 20 do (docs/real-photos.md), but 40 digits make 5 steps an epoch, and the
    quickstart's ImageNet fine-tune scores 0.818 in 20 epochs (100 steps), 0.749 in 16 (80 steps) and 0.552 in 10:
    so at least 100 steps (13 epochs of 8 steps; 20 of 5).
    """
    n_train = len(manifest.split("train")) + (len(manifest.split("val")) if settings.use_val == "train" else 0)
    if settings.batch_size is None:
        settings = settings.model_copy(
            update={"batch_size": max(8, min(DEFAULT_BATCH, n_train // MIN_STEPS_PER_EPOCH))}
        )
    if "epochs" not in settings.model_fields_set:  # the default: 10 epochs, at least MIN_DEFAULT_STEPS steps
        steps = max(1, n_train // (settings.batch_size or DEFAULT_BATCH))
        epochs = max(settings.epochs, math.ceil(MIN_DEFAULT_STEPS / steps))
        settings = settings.model_copy(update={"epochs": epochs})
    return settings


def train_loader(
    manifest: Manifest,
    backbone: Backbone,
    settings: TrainConfig,
    *,
    num_workers: int | None = None,
    memory_mb: float | None = None,
    cache: str | Path | None = None,
):
    """The shuffled, augmented training loader; with `memory_mb`, its images are decoded once (decode_split)."""
    transform = augment.resolve_train_transform(backbone.data_config, settings.augment, hflip=settings.hflip)
    decoded = (
        None if memory_mb is None else decode_split(manifest, "train", transform, memory_mb=memory_mb, cache=cache)
    )
    dataset = _dataset(manifest, "train", transform, decoded)
    # A last batch of one image breaks BatchNorm in training; drop the incomplete batch (reshuffled each epoch).
    batch_size = settings.batch_size or DEFAULT_BATCH  # resolved by with_resolved_defaults before training
    drop_last = len(dataset) > batch_size
    sampler = None
    if settings.balance == "sampler":
        labels = np.asarray(dataset.labels)
        per_sample = 1.0 / np.bincount(labels)[labels]
        sampler = WeightedRandomSampler(
            per_sample.tolist(),
            num_samples=len(labels),
            replacement=True,
            generator=torch.Generator().manual_seed(settings.seed),
        )
    loader = make_loader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        seed=settings.seed,
        drop_last=drop_last,
        sampler=sampler,
    )
    return loader, transform


def train_batch_figure(
    manifest: Manifest,
    data_config: dict,
    augment_name: str,
    *,
    hflip: bool = True,
    n: int = 16,
    seed: int = 0,
    title: str = "",
):
    """A grid of `n` training images as the model sees them: augmented, shown denormalised (fastai's show_batch)."""
    from tlkit.core.metrics import denormalise, image_grid

    transform = augment.resolve_train_transform(data_config, augment_name, hflip=hflip)
    loader = make_loader(_dataset(manifest, "train", transform), batch_size=n, shuffle=True, num_workers=0, seed=seed)
    images, labels, _ = next(iter(loader))
    pixels = denormalise(images.float().numpy(), data_config["mean"], data_config["std"])
    return image_grid(
        list(pixels), [manifest.classes[i] for i in labels.tolist()], columns=min(8, len(pixels)), cell=1.6, title=title
    )


@dataclass(frozen=True)
class HeadInit:
    """How LP-FT's head was fitted before the fine-tune: the probe's selection accuracy, and how C was chosen."""

    selection_accuracy: float
    how_C: str


def fit_linear_probe(module: ImageClassifier, features: FeatureSet, *, seed: int = 0) -> HeadInit:
    """LP-FT's first step: fit the head to convergence on the frozen features (L-BFGS logistic regression).

    The features are the backbone's last layer's (`extract_features`, cached): a pass over the images the first time,
    as the fine-tune's probe of a CNN reads every layer instead.
    Fitted on the raw features, so the head's weights stay on the scale of the features the fine-tune will move:
    folding a StandardScaler into the head instead (w / scale) gives features of tiny variance huge weights: LP-FT
    of the digits resnet18 scores 0.878 that way, 0.975 on raw features (strategies.yaml, seed 0). The regularisation is
    chosen on the val split when a test split reports, else by cross-validation on train (val is then the
    held-out split); the head is fitted on train alone, so val still judges epochs fairly.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from tlkit.features.baseline import search_C

    X, y = features.subset("train")
    has = set(features.splits.tolist())
    val = features.subset("val") if {"val", "test"} <= has else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        found = search_C(LogisticRegression(max_iter=3000, random_state=seed), LP_FT_C_GRID, (X, y), val)
        fitted = LogisticRegression(C=found.C, max_iter=3000, random_state=seed).fit(X, y)
    # one row per class, as every head converted from scikit-learn (two classes: -d/2 and d/2, the probe's odds)
    weight, bias = class_rows(fitted.coef_, fitted.intercept_, fitted.classes_, module.head.out_features)
    with torch.no_grad():
        module.head.weight.copy_(torch.from_numpy(weight))
        module.head.bias.copy_(torch.from_numpy(bias))
    return HeadInit(selection_accuracy=found.score, how_C=found.how)


def check_settings(manifest: Manifest, backbone: Backbone, settings: TrainConfig) -> None:
    """Errors of settings that this data or backbone cannot honour, raised before any run starts."""
    check_data(manifest, settings)
    groups = merge_groups(layer_groups(backbone.model), settings.groups)
    if settings.lr != "auto":
        group_lrs(settings.lr, len(groups), lr_mult=settings.lr_mult, lrs=settings.lrs, frozen=settings.frozen_groups)
    plan_phases(
        settings.strategy,
        epochs=settings.epochs,
        n_groups=len(groups),
        freeze_epochs=settings.freeze_epochs,
        unfreeze_every=settings.unfreeze_every,
    )


def check_data(manifest: Manifest, settings: TrainConfig) -> None:
    """Errors of settings that this data cannot honour, raised before any run starts."""
    if not manifest.split("train"):
        raise TlkitError("the training split is empty; ingest with smaller --val/--test or give a train/ folder")
    if not manifest.split("val") and not manifest.split("test"):
        raise TlkitError(
            "the data has no val or test split to report on (every image is in train); let tlkit make them (--val 0.15 "
            "--test 0.15, with no split column or train/ folder), or give val/ or test/ images"
        )
    if not manifest.split("test"):
        if settings.use_val == "train":
            raise TlkitError(
                "use_val 'train' trains on the val split and the data has no test split to report on; ingest with "
                "--test > 0 or use --use-val select"
            )
        if settings.patience is not None:
            raise TlkitError(
                "--patience stops on the val split, but this data has no test split, so val is where results are "
                "reported; drop --patience (the schedule runs to its end) or add a test split"
            )


@dataclass
class FitOptions:
    """How one fit runs, beside what it learns (TrainConfig) and where (ComputeConfig).

    callbacks: extra Lightning callbacks. workdir: where checkpoints go (`last.ckpt`, `best.ckpt`; a temporary
    folder by default). resume: continue from `workdir/last.ckpt`. progress: show a progress bar. calibrated: fit
    the head's temperature (calibrate.calibrate_logits; tune's trials skip it). temperature: a temperature fitted
    elsewhere and how, used instead (a refit on train + val takes its selection fit's). checkpoint_at_end: write
    last.ckpt when training ends too (a fit that a refit follows: --resume then finds it finished).
    val_every_epoch: score val after every epoch even where it chooses no epoch (a tune's trial: its pruner and its
    value read val's last score), instead of at most HELDOUT_CURVE_POINTS times.
    """

    callbacks: list[L.Callback] = field(default_factory=list)
    workdir: Path | None = None
    resume: bool = False
    progress: bool = True
    calibrated: bool = True
    val_every_epoch: bool = False
    temperature: tuple[float, str] | None = None
    checkpoint_at_end: bool = False


def train_classifier(
    manifest: Manifest,
    backbone: Backbone,
    settings: TrainConfig | None = None,
    *,
    compute: ComputeConfig | None = None,
    fit: FitOptions | None = None,
    module: ImageClassifier | None = None,
) -> TrainResult:
    """Train per `settings`; keep the best epoch by validation accuracy.

    The val split chooses the best epoch only when a test split reports the result. Without a test
    split, val is the held-out split: the schedule runs to its end, the last epoch is kept, and val
    only scores it (a curve of at most HELDOUT_CURVE_POINTS points is logged for reading, never for choosing).

    Args:
        manifest: the dataset (train split trains; val split picks the best epoch, or trains too with use_val 'train').
        backbone: the backbone to start from.
        settings: epochs, learning rates, strategy and the rest (TrainConfig()).
        compute: devices (several run as spawned DDP processes), precision ("auto" or Lightning's), DataLoader
            workers (default: per machine, see data.default_workers), image_cache_mb, the memory for the train
            and val images decoded once before the first epoch (default: data.default_image_cache_mb; what does not
            fit goes to .npy files under the cache folder, `cache_dir`); its batch_size is not used
            (settings.batch_size is).
        fit: callbacks, checkpoint folder, resume, progress bar, calibration (FitOptions()).
        module: a module from `build_module` (e.g. after an LR search); built here by default.

    Returns:
        The module with the best epoch's weights, and its metrics on the held-out split.
    """
    settings = with_resolved_defaults(settings or TrainConfig(), manifest)
    compute = compute or ComputeConfig()
    fit = fit or FitOptions()
    check_data(manifest, settings)
    if settings.use_val == "train":
        manifest = manifest.with_val_as_train()  # as the baselines refit on train+val; the last epoch is kept
    selects = bool(manifest.split("val")) and bool(manifest.split("test"))  # val may choose only when test reports
    L.seed_everything(settings.seed, workers=True, verbose=False)
    module = module or build_module(manifest, backbone, settings)
    precision = runtime.training_precision(compute.precision, module)
    L.seed_everything(
        settings.seed, workers=True, verbose=False
    )  # the fit starts from the seed, whatever the head drew
    budget = default_image_cache_mb() if compute.image_cache_mb is None else compute.image_cache_mb
    loaders = _Loaders.build(
        manifest, backbone, settings, num_workers=compute.num_workers, memory_mb=budget, cache=compute.cache_dir
    )
    head_init = None
    if settings.strategy == "lp-ft" and not fit.resume:
        from tlkit.features.extract import extract_features

        # the last layer's frozen features, from the cache (a CNN's probe reads every layer: computed once more)
        features = extract_features(manifest, backbone, compute=compute, progress=fit.progress)
        head_init = fit_linear_probe(module, features, seed=settings.seed)
    epochs_run, best_epoch = _fit(
        module, loaders, settings, devices=compute.devices, precision=precision, fit=fit, selects=selects
    )
    module.apply_phase(len(module.phases) - 1)
    result = _evaluate(module, manifest, loaders, settings, precision=precision, selects=selects, fit=fit)
    result.best_epoch, result.epochs_run = best_epoch, epochs_run
    selection = {"epoch": "best val_score on the val split" if selects else "last (the schedule runs to its end)"}
    if head_init is not None:
        selection["probe_C"] = head_init.how_C
    result.settings = {
        "precision": precision,
        "batch_size": settings.batch_size,
        "epochs": settings.epochs,
        "phases": [p.__dict__ for p in module.phases],
        "group_lrs": module.lrs,
        "groups": module.group_labels,
        "train_transform": augment.to_dict(loaders.train_transform),
        "selection": {**selection, **result.settings["selection"]},  # the temperature's, when calibrated
    }
    if head_init is not None:
        result.settings["probe_selection_accuracy"] = head_init.selection_accuracy
    return result


def _fit(
    module: ImageClassifier,
    loaders: _Loaders,
    settings: TrainConfig,
    *,
    devices: Any,
    precision: str,
    fit: FitOptions,
    selects: bool,
) -> tuple[int, int | None]:
    """Run Lightning's fit; load the best epoch's weights when val `selects`. Returns the epochs run (a resumed
    run's earlier ones included) and the best epoch, counted from 1 (None when the last epoch is kept)."""
    # a fit with no checkpoint folder of its own (a tune's trial, a library call) keeps them in a temporary one,
    # removed when it ends: nothing of a fit outlives it unless --resume needs it
    with _checkpoint_folder(fit.workdir) as workdir:
        trainer = runtime.build_trainer(
            devices=devices,
            precision=precision,
            progress=fit.progress,
            root_dir=workdir,
            max_epochs=settings.epochs,
            callbacks=_callbacks(
                module,
                settings,
                workdir,
                selects=selects,
                resume=fit.resume,
                more=fit.callbacks,
                at_end=fit.checkpoint_at_end,
            ),
            # the best-epoch ModelCheckpoint; without it Lightning would add one that saves every epoch
            enable_checkpointing=selects,
            check_val_every_n_epoch=1
            if selects or fit.val_every_epoch
            else math.ceil(settings.epochs / HELDOUT_CURVE_POINTS),
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        with runtime.quiet_lightning():
            # tlkit's own checkpoints hold tensors, numbers and strings only: read them with weights_only=True
            trainer.fit(
                module,
                loaders.train,
                loaders.val,
                ckpt_path=str(workdir / "last.ckpt") if fit.resume else None,
                weights_only=True if fit.resume else None,
            )
        if not selects:  # the module holds the last epoch's weights already
            return trainer.current_epoch, None
        state = torch.load(workdir / "best.ckpt", map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        return trainer.current_epoch, int(state["epoch"]) + 1


@contextmanager
def _checkpoint_folder(folder: str | Path | None) -> Iterator[Path]:
    """`folder`, or a temporary folder that is removed when the fit ends."""
    if folder is not None:
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="tlkit-train-") as tmp:
        yield Path(tmp)


@dataclass
class _Loaders:
    """The loaders of a fit: train (augmented, decoded once), val (decoded once, if any), and the eval transform."""

    train: Any
    val: Any
    train_transform: Any
    eval_transform: Any
    num_workers: int | None
    batch_size: int

    @classmethod
    def build(
        cls,
        manifest: Manifest,
        backbone: Backbone,
        settings: TrainConfig,
        *,
        num_workers: int | None,
        memory_mb: float,
        cache: str | Path | None,
    ) -> _Loaders:
        # Train and val are read every epoch: decode them once, at the size the transforms read.
        loader, train_tf = train_loader(
            manifest, backbone, settings, num_workers=num_workers, memory_mb=memory_mb, cache=cache
        )
        train_images = loader.dataset.decoded
        eval_tf = augment.eval_transform(backbone.data_config)
        batch_size = (settings.batch_size or DEFAULT_BATCH) * 2
        val_loader = None
        if manifest.split("val"):
            used = train_images.nbytes / 2**20 if train_images is not None and train_images.in_memory else 0
            val_images = decode_split(manifest, "val", eval_tf, memory_mb=memory_mb - used, cache=cache)
            val_loader = make_loader(
                _dataset(manifest, "val", eval_tf, val_images), batch_size=batch_size, num_workers=num_workers
            )
        return cls(
            train=loader,
            val=val_loader,
            train_transform=train_tf,
            eval_transform=eval_tf,
            num_workers=num_workers,
            batch_size=batch_size,
        )


def _callbacks(
    module: ImageClassifier,
    settings: TrainConfig,
    workdir: Path,
    *,
    selects: bool,
    resume: bool,
    more: list,
    at_end: bool = False,
) -> list[L.Callback]:
    """The fit's callbacks: the best epoch (when val selects), last.ckpt for --resume, the phases, early stopping."""
    last = workdir / "last.ckpt"
    if resume and not last.exists():
        raise TlkitError(
            f"nothing to resume: {last} does not exist (the run saved no epoch yet, or ran on another machine)"
        )
    # The best epoch's weights only (a third of a checkpoint with AdamW's state): it is read for nothing else.
    best = WholeModelCheckpoint(
        dirpath=workdir,
        filename="best",
        monitor=MONITOR,
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
        save_weights_only=True,
    )
    latest = LatestCheckpoint(last, at_end=at_end)  # Lightning's save_last refreshes it only with a new best
    extra: list[L.Callback] = [*([best] if selects else []), latest, PhaseCallback(), *more]
    if settings.patience is not None:
        extra.append(
            LastPhaseEarlyStopping(module.phases[-1].start, monitor=MONITOR, mode="max", patience=settings.patience)
        )
    return extra


def split_logits(
    result: TrainResult, manifest: Manifest, split: str, backbone: Backbone, *, compute: ComputeConfig
) -> np.ndarray:
    """The trained module's logits (before its temperature) on `split` of `manifest` (a selection split it did not
    train on), in float32 with the eval transform, as every saved model is scored; kept in `result.logits`."""
    if split not in result.logits:
        loader = make_loader(
            _dataset(manifest, split, augment.eval_transform(backbone.data_config)),
            batch_size=(result.settings.get("batch_size") or DEFAULT_BATCH) * 2,
            num_workers=compute.num_workers,
        )
        result.logits[split] = infer(result.module, loader, precision="32-true")
    return result.logits[split]


def split_accuracy(
    result: TrainResult, manifest: Manifest, split: str, backbone: Backbone, *, compute: ComputeConfig
) -> float:
    """The trained module's accuracy on `split` of `manifest` (see `split_logits`)."""
    logits = split_logits(result, manifest, split, backbone, compute=compute)
    return float((logits.argmax(1) == manifest.labels(manifest.split(split))).mean())


def _evaluate(
    module: ImageClassifier,
    manifest: Manifest,
    loaders: _Loaders,
    settings: TrainConfig,
    *,
    precision: str,
    selects: bool,
    fit: FitOptions,
) -> TrainResult:
    """The trained module on the held-out split (and val, when it selected): metrics, and the head's temperature
    (fitted where `fit.calibrated`, or `fit.temperature` given)."""
    heldout = manifest.eval_split
    eval_loader = make_loader(
        _dataset(manifest, heldout, loaders.eval_transform),
        batch_size=loaders.batch_size,
        num_workers=loaders.num_workers,
    )
    y_true = manifest.labels(manifest.split(heldout))
    logits = infer(module, eval_loader, precision=precision)
    y_pred = logits.argmax(1)
    metrics = classification_metrics(y_true, y_pred, manifest.classes, prefix="heldout_")  # as in baselines
    best_val = None
    if selects:
        y_val = manifest.labels(manifest.split("val"))
        best_val = float((infer(module, loaders.val, precision=precision).argmax(1) == y_val).mean())
    selection: dict[str, Any] = {}
    temperature = 1.0
    scored: dict[str, np.ndarray] = {}
    if fit.calibrated:  # in float32, as every saved model is scored (network.LoadedModel)
        from tlkit.features.calibrate import calibrate_logits

        # scored at the training precision above; a second pass only when that was not float32
        heldout_logits = logits if precision == "32-true" else infer(module, eval_loader, precision="32-true")
        scored[heldout] = heldout_logits
        on_val = None
        if selects:
            scored["val"] = infer(module, loaders.val, precision="32-true")
            on_val = (scored["val"], manifest.labels(manifest.split("val")))
        temperature, calibration, selection["temperature"] = calibrate_logits(
            heldout_logits, y_true, fit=on_val, given=fit.temperature, split=heldout, seed=settings.seed
        )
        metrics.update(calibration)
    return TrainResult(
        module=module,
        best_epoch=None,
        best_val_accuracy=best_val,
        metrics=metrics,
        heldout_split=heldout,
        y_true=y_true,
        y_pred=y_pred,
        epochs_run=0,
        settings={"selection": selection},
        temperature=temperature,
        logits=scored,
    )
