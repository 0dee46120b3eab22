"""Manifest + Backbone + strategy -> trained classifier (Lightning): the best epoch's weights and metrics.

Used by `tlkit pretrain` (train a backbone on a source task) and `tlkit finetune` (transfer it with
a new head). The backbone is split into layer groups (timm's group_matcher); each group has its own
explicit learning rate, and the strategy's phases decide which groups train when. Every parameter
group exists from the first step; a phase change builds a new optimizer and schedule over the same
groups (adding groups mid-fit breaks schedulers and DDP).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
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
from tlkit.train.strategies import Phase, group_lrs, phase_end, phase_index, plan_phases

if TYPE_CHECKING:
    from tlkit.features.extract import FeatureSet

DEFAULT_BATCH = 32
MIN_STEPS_PER_EPOCH = (
    8  # the default batch shrinks (to 8 at least) so that a small training set still makes this many steps
)
MONITOR = "val_score"  # val accuracy, ties broken by lower val loss (see ImageClassifier.on_validation_epoch_end)
MIN_SCHEDULED_STEPS = 8
MIN_DEFAULT_STEPS = 100  # the default epochs (10) rise on a small training set to make this many optimizer steps
LP_FT_C_GRID = (0.01, 0.1, 1.0, 10.0)  # LP-FT's probe: L-BFGS logistic regression on raw features (no scaling)
# Without a test split the val split is held out: it chooses nothing, so scoring it during training only draws a curve
# (the weights and every result are the same). At most this many points of it, not one every epoch.
HELDOUT_CURVE_POINTS = 5
CHECKPOINT_EVERY_S = 30.0  # last.ckpt (for --resume) at most this often, besides phase ends


class ImageClassifier(L.LightningModule):
    """A timm backbone (num_classes=0), split into layer groups, followed by a new linear head.

    Args:
        backbone: the timm model returning pooled features.
        num_features: width of those features.
        num_classes: number of target classes.
        groups: (label, parameter names) of each body group, input side first (`layer_groups`, `merge_groups`).
        lrs: learning rate of each body group, then of the head (see `strategies.group_lrs`).
        phases: which groups train when (see `strategies.plan_phases`); default: all, always.
        class_weights: per-class loss weights, for imbalanced data.
        settings: the recipe's loss and optimiser settings, read here: `weight_decay` (AdamW's, never on biases and
            norm parameters), `label_smoothing` (training loss only), `schedule` (onecycle, cosine with 5% linear
            warm-up, or constant; restarted every phase) and `bn` ("frozen" keeps BatchNorm layers of frozen groups
            in eval mode, statistics fixed; "train" lets their statistics update; "keep-stats" keeps every BatchNorm
            layer's pretrained statistics, in trained groups too, their scale and shift still training).
    """

    class_weights: torch.Tensor  # a buffer

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_features: int,
        num_classes: int,
        *,
        groups: list[tuple[str, list[str]]],
        lrs: list[float],
        phases: list[Phase] | None = None,
        class_weights: torch.Tensor | None = None,
        settings: TrainConfig | None = None,
    ):
        super().__init__()
        settings = settings or TrainConfig()
        self.backbone = backbone
        self.head = torch.nn.Linear(num_features, num_classes)
        self.groups = [names for _, names in groups]
        self.group_labels = [label for label, _ in groups]
        self.lrs = list(lrs)
        self.phases = phases or [Phase(0, len(groups), "all")]
        self.weight_decay = settings.weight_decay
        self.label_smoothing = settings.label_smoothing
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(num_classes))
        self.schedule = settings.schedule
        self.bn = settings.bn
        self.phase = -1  # index into phases; -1 before training starts
        self.sweeping = False  # the LR finder trains every group
        self.freeze_by_lr = False  # under DDP: frozen groups keep requires_grad and get lr 0
        self._frozen_bn: list[torch.nn.Module] = []

    # -- forward and steps ---------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images.contiguous(memory_format=torch.channels_last)))

    def training_step(self, batch, batch_idx):
        images, labels, _ = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True
        )
        self.log(
            "train_accuracy",
            accuracy,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels, _ = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        self._val_sums += torch.stack(
            [
                (logits.argmax(1) == labels).sum().float(),
                loss.float(),
                torch.tensor(len(labels), dtype=torch.float32, device=loss.device),
            ]
        )
        self.log(
            "val_loss",
            loss / len(labels),
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,
        )
        self.log(
            "val_accuracy",
            (logits.argmax(1) == labels).float().mean(),
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,
        )

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, device=self.device)

    def on_validation_epoch_end(self) -> None:
        """Log `val_score`: accuracy first, lower loss only among epochs of equal accuracy.

        On a small validation set accuracy saturates early and ties; ModelCheckpoint keeps the first
        of tied epochs, an under-trained one. Measured on the quickstart target (10 val images):
        epochs 24-26 kept, 0.862 mean test accuracy over 3 seeds; with this tie-break 33-34, 0.887. The loss
        term, loss / (1 + loss) / (2 n), is below half of one image's accuracy step (1 / n).
        """
        correct, loss_sum, n = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        if n:
            self.log(
                "val_score", selection_score(correct, loss_sum, int(n)), on_step=False, on_epoch=True, sync_dist=False
            )

    # -- freezing --------------------------------------------------------------------------------

    def trainable_groups(self) -> list[bool]:
        """Per body group, whether it trains in the current phase (all of them during an LR sweep)."""
        if self.sweeping:
            return [True] * len(self.groups)
        top = self.phases[max(self.phase, 0)].trainable
        n = len(self.groups)
        # a group whose rate is 0 never trains (`--lrs 0,0,...`: partial fine-tuning, no backward pass through it)
        return [i >= n - top and self.lrs[i] > 0 for i in range(n)]

    def apply_phase(self, index: int) -> None:
        """Freeze and unfreeze groups for phase `index`; BatchNorm of frozen groups per the policy."""
        self.phase = index
        params = dict(self.backbone.named_parameters())
        modules = dict(self.backbone.named_modules())
        frozen_names: set[str] = set()
        for names, trains in zip(self.groups, self.trainable_groups()):
            for name in names:
                params[name].requires_grad_(trains or self.freeze_by_lr)
                if not trains:
                    frozen_names.add(name)
        self._frozen_bn = []
        if self.bn in ("frozen", "keep-stats"):
            for mname, module in modules.items():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    own = [f"{mname}.{p}" for p, _ in module.named_parameters(recurse=False)] or [f"{mname}.weight"]
                    if self.bn == "keep-stats" or all(p in frozen_names for p in own):
                        self._frozen_bn.append(module)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self._frozen_bn:
                module.eval()
        return self

    def setup(self, stage: str) -> None:
        self.freeze_by_lr = self.trainer.world_size > 1
        if self.phase < 0:
            self.apply_phase(phase_index(self.phases, self.trainer.current_epoch))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tlkit_phase"] = self.phase

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "tlkit_phase" in checkpoint:  # resume: rebuild the optimizer of the phase that was running
            self.apply_phase(checkpoint["tlkit_phase"])

    # -- optimisation -----------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: per layer group (and head) one with weight decay and one without.

        Every group carries its own explicit lr (0 while frozen), so any PyTorch scheduler honours it.
        """
        scale = self.phases[max(self.phase, 0)].lr_scale
        named = dict(self.backbone.named_parameters())
        layers = [
            (f"group{i}", [named[n] for n in names], trains)
            for i, (names, trains) in enumerate(zip(self.groups, self.trainable_groups()))
        ]
        layers.append(("head", list(self.head.parameters()), True))
        out = []
        for (name, params, trains), lr in zip(layers, self.lrs):
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            effective = lr * scale if trains else 0.0
            out.append({"params": decay, "lr": effective, "weight_decay": self.weight_decay, "name": name, "log": True})
            out.append(
                {"params": no_decay, "lr": effective, "weight_decay": 0.0, "name": f"{name}.no_decay", "log": False}
            )
        return out

    def configure_optimizers(self):
        groups = [g for g in self.parameter_groups() if g["params"]]
        optimizer = adamw(groups)
        epochs = self.trainer.max_epochs or 1
        per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max(1, epochs))
        index = max(self.phase, 0)
        steps = (phase_end(self.phases, index, epochs) - self.phases[index].start) * per_epoch
        if self.schedule == "constant" or steps < MIN_SCHEDULED_STEPS:
            return optimizer
        scheduler: torch.optim.lr_scheduler.LRScheduler
        if self.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.25
            )
        else:
            warmup = max(1, int(0.05 * steps))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, warmup, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def selection_score(correct: float, loss_sum: float, n: int) -> float:
    """Accuracy minus a tie-break that grows with the mean loss and stays below 1 / (2 n)."""
    loss = loss_sum / n
    return correct / n - loss / (1 + loss) / (2 * n)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW over `groups`, with PyTorch's fused kernel where the parameters' device has one (CPU, CUDA).

    On CPU the default is a Python loop over tensors: a resnet18 step took 100 ms that way, 77 ms with
    foreach and 12 ms fused (same updates, to float rounding).
    """
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = (
        bool(devices) and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    )
    return torch.optim.AdamW(groups, fused=fused or None)


class LatestCheckpoint(L.Callback):
    """Writes last.ckpt for --resume: at the end of every phase but the last, otherwise at most every
    `every_s` seconds. A resnet18 checkpoint with its optimizer state takes about 0.27 s to write; saved
    every epoch, the quickstart's 40 short epochs spent a quarter of their time writing them. Not at the
    end of training: the weights are in memory then, and the finished run is logged with its model
    (that last write was 4 % of `bench/finetune.py`'s tlkit side)."""

    # Not ModelCheckpoint(train_time_interval=...): it saves on its own clock only, not at phase boundaries, and
    # writes in place, where this writes beside and renames (a kill mid-write keeps the previous checkpoint).

    def __init__(self, path: Path, every_s: float | None = None):
        self.path = Path(path)
        self.every_s = CHECKPOINT_EVERY_S if every_s is None else every_s
        self._saved_at = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:  # an ImageClassifier
        done = trainer.current_epoch + 1
        if done >= (trainer.max_epochs or 0) or trainer.should_stop:
            return
        boundary = any(p.start == done for p in module.phases)
        due = time.monotonic() - self._saved_at >= self.every_s
        if trainer.strategy.broadcast(bool(boundary or due), src=0):  # every DDP rank decides alike
            self.save(trainer)
            self._saved_at = time.monotonic()

    def save(self, trainer: L.Trainer) -> None:
        """Write beside last.ckpt, then rename over it: a full disk or a kill mid-write keeps the previous one."""
        partial = self.path.with_name(f".{self.path.name}.partial")
        try:
            # the optimizer state too: --resume continues the schedule
            trainer.save_checkpoint(partial, weights_only=False)
            if trainer.is_global_zero:
                os.replace(partial, self.path)
        finally:
            if trainer.is_global_zero:
                partial.unlink(missing_ok=True)
        trainer.strategy.barrier()


class _WholeModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, each file written beside and renamed over the target: Lightning writes in place,
    so a full disk or a kill mid-write left a truncated best.ckpt where the previous best was."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = str(Path(filepath).with_name(f".{Path(filepath).name}.partial"))
        try:
            super()._save_checkpoint(trainer, partial)
            if trainer.is_global_zero:
                os.replace(partial, filepath)
        finally:
            if trainer.is_global_zero:
                Path(partial).unlink(missing_ok=True)
        self._last_checkpoint_saved = filepath
        trainer.strategy.barrier()


class PhaseCallback(L.Callback):
    """At each epoch start, switch to the strategy's phase for that epoch and rebuild the optimizer."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: Any) -> None:  # an ImageClassifier
        index = phase_index(module.phases, trainer.current_epoch)
        if index != module.phase:
            module.apply_phase(index)
            trainer.strategy.setup_optimizers(trainer)  # same groups, new lrs, a fresh schedule for the phase
        module.log("phase", float(index), on_step=False, on_epoch=True, sync_dist=True)


class MetricsCallback(L.Callback):
    """Sends Lightning's epoch metrics (step = epoch) and each layer group's lr (step = optimizer step) to
    an MLflow run, buffered and sent once per epoch (tracking.MetricsBuffer)."""

    # Not LearningRateMonitor: it names rates by optimizer and index (lr-AdamW/pg3) and logs through a Lightning
    # logger; these are named by layer group (lr.layer4) and share the buffered MLflow writer with the epoch metrics.

    def __init__(self, run_id: str | None = None, tracking_uri: str | None = None):
        from tlkit.core.tracking import MetricsBuffer

        self.buffer = MetricsBuffer(run_id, tracking_uri)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if group.get("log"):
                    self.buffer.add(f"lr.{group['name']}", float(group["lr"]), trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for key, value in trainer.callback_metrics.items():
            if value.numel() == 1:
                self.buffer.add(key, float(value), trainer.current_epoch)
        self.buffer.flush()


class _LastPhaseEarlyStopping(EarlyStopping):
    """Early stopping that only counts epochs of the last phase (a frozen warm-up is not a plateau)."""

    def __init__(self, start_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.start_epoch = start_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            super().on_validation_end(trainer, pl_module)


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

    With 40 training images a batch of 32 made one optimizer step an epoch (the last, partial batch is
    dropped); a fine-tune of 20 epochs was 20 steps. The default now keeps 8 steps an epoch where it can.
    Ten epochs of 8 steps fine-tuned a few hundred photos as well as 20 did (docs/real-photos.md), but 40 digits
    make 5 steps an epoch, and the quickstart's ImageNet fine-tune scored 0.818 in 20 epochs (100 steps), 0.749 in
    16 (80 steps) and 0.552 in 10: so at least 100 steps (13 epochs of 8 steps; 20 of 5).
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


def fit_linear_probe(module: ImageClassifier, features: FeatureSet, *, seed: int = 0) -> tuple[float, str]:
    """LP-FT's first step: fit the head to convergence on the frozen features (L-BFGS logistic regression).

    The features are the fine-tune's probe's own (`extract_features`, cached): no second pass over the images.
    Fitted on the raw features, so the head's weights stay on the scale of the features the fine-tune will move:
    folding a StandardScaler into the head instead (w / scale) gave features of tiny variance huge weights, and
    LP-FT of the digits resnet18 fell from 0.975 to 0.878 (strategies.yaml, seed 0). The regularisation is
    chosen on the val split when a test split reports, else by cross-validation on train (val is then the
    held-out split); the head is fitted on train alone, so val still judges epochs fairly. Returns the probe's
    selection accuracy and how C was chosen.
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
        probe = LogisticRegression(C=found.C, max_iter=3000, random_state=seed).fit(X, y)
    # one row per class, as every head converted from scikit-learn (two classes: -d/2 and d/2, the probe's odds)
    weight, bias = class_rows(probe.coef_, probe.intercept_, probe.classes_, module.head.out_features)
    with torch.no_grad():
        module.head.weight.copy_(torch.from_numpy(weight))
        module.head.bias.copy_(torch.from_numpy(bias))
    return found.score, found.how


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
    the head's temperature (calibrate.calibrate_logits; tune's trials skip it). val_every_epoch: score val after
    every epoch even where it chooses no epoch (a tune's trial: its pruner and its value read val's last score),
    instead of at most HELDOUT_CURVE_POINTS times.
    """

    callbacks: list[L.Callback] = field(default_factory=list)
    workdir: Path | None = None
    resume: bool = False
    progress: bool = True
    calibrated: bool = True
    val_every_epoch: bool = False


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
    devices, num_workers, image_cache_mb = compute.devices, compute.num_workers, compute.image_cache_mb
    check_data(manifest, settings)
    if settings.use_val == "train":
        manifest = manifest.with_val_as_train()  # as the baselines refit on train+val; the last epoch is kept
    has_val = bool(manifest.split("val"))
    selects = has_val and bool(manifest.split("test"))  # val may choose the epoch only when test reports
    L.seed_everything(settings.seed, workers=True, verbose=False)
    module = module or build_module(manifest, backbone, settings)
    precision = runtime.training_precision(compute.precision, module)
    L.seed_everything(settings.seed, workers=True, verbose=False)  # the precision probe may have drawn random numbers
    budget = default_image_cache_mb() if image_cache_mb is None else image_cache_mb
    loaders = _Loaders.build(
        manifest, backbone, settings, num_workers=num_workers, memory_mb=budget, cache=compute.cache_dir
    )
    fit = fit or FitOptions()
    resume = fit.resume
    probe = None
    if settings.strategy == "lp-ft" and not resume:
        from tlkit.features.extract import extract_features

        # the frozen features the fine-tune's probe has just extracted: read from the cache, not computed again
        features = extract_features(manifest, backbone, compute=compute, progress=fit.progress)
        probe = fit_linear_probe(module, features, seed=settings.seed)
    # a fit with no checkpoint folder of its own (a tune's trial, a library call) keeps them in a temporary one,
    # removed when it ends: nothing of a fit outlives it unless --resume needs it
    with _checkpoint_folder(fit.workdir) as workdir:
        extra = _callbacks(module, settings, workdir, selects=selects, resume=resume, more=fit.callbacks)
        trainer = runtime.build_trainer(
            devices=devices,
            precision=precision,
            progress=fit.progress,
            root_dir=workdir,
            max_epochs=settings.epochs,
            callbacks=extra,
            # the best-epoch ModelCheckpoint; without it Lightning would add one that saves every epoch
            enable_checkpointing=selects,
            check_val_every_n_epoch=1
            if selects or fit.val_every_epoch
            else math.ceil(settings.epochs / HELDOUT_CURVE_POINTS),
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        last = workdir / "last.ckpt"
        with runtime.quiet_lightning():
            # tlkit's own checkpoints hold tensors, numbers and strings only: read them with weights_only=True
            trainer.fit(
                module,
                loaders.train,
                loaders.val,
                ckpt_path=str(last) if resume else None,
                weights_only=True if resume else None,
            )
        epochs_run = trainer.current_epoch  # epochs completed, a resumed run's earlier ones included
        best_epoch = None
        if selects:  # else the module holds the last epoch's weights already
            state = torch.load(workdir / "best.ckpt", map_location="cpu", weights_only=True)
            module.load_state_dict(state["state_dict"])
            best_epoch = int(state["epoch"]) + 1  # counted from 1, as the progress lines and the curves count
    module.apply_phase(len(module.phases) - 1)
    result = _evaluate(
        module, manifest, loaders, settings, precision=precision, selects=selects, calibrated=fit.calibrated
    )
    result.best_epoch, result.epochs_run = best_epoch, epochs_run
    selection = {"epoch": "best val_score on the val split" if selects else "last (the schedule runs to its end)"}
    if probe is not None:
        selection["probe_C"] = probe[1]
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
    if probe is not None:
        result.settings["probe_selection_accuracy"] = probe[0]
    return result


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
        return cls(loader, val_loader, train_tf, eval_tf, num_workers, batch_size)


def _callbacks(
    module: ImageClassifier, settings: TrainConfig, workdir: Path, *, selects: bool, resume: bool, more: list
) -> list[L.Callback]:
    """The fit's callbacks: the best epoch (when val selects), last.ckpt for --resume, the phases, early stopping."""
    last = workdir / "last.ckpt"
    if resume and not last.exists():
        raise TlkitError(
            f"nothing to resume: {last} does not exist (the run saved no epoch yet, or ran on another machine)"
        )
    # The best epoch's weights only (a third of a checkpoint with AdamW's state): it is read for nothing else.
    best = _WholeModelCheckpoint(
        dirpath=workdir,
        filename="best",
        monitor=MONITOR,
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
        save_weights_only=True,
    )
    latest = LatestCheckpoint(last)  # Lightning's save_last refreshes it only with a new best
    extra: list[L.Callback] = [*([best] if selects else []), latest, PhaseCallback(), *more]
    if settings.patience is not None:
        extra.append(
            _LastPhaseEarlyStopping(module.phases[-1].start, monitor=MONITOR, mode="max", patience=settings.patience)
        )
    return extra


def _evaluate(
    module: ImageClassifier,
    manifest: Manifest,
    loaders: _Loaders,
    settings: TrainConfig,
    *,
    precision: str,
    selects: bool,
    calibrated: bool,
) -> TrainResult:
    """The trained module on the held-out split (and val, when it selected): metrics, and the head's temperature."""
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
    if calibrated:  # in float32, as every saved model is scored (network.LoadedModel)
        from tlkit.features.calibrate import calibrate_logits

        # scored at the training precision above; a second pass only when that was not float32
        heldout_logits = logits if precision == "32-true" else infer(module, eval_loader, precision="32-true")
        fit = (
            (infer(module, loaders.val, precision="32-true"), manifest.labels(manifest.split("val")))
            if selects
            else None
        )
        temperature, calibration, selection["temperature"] = calibrate_logits(
            heldout_logits, y_true, fit=fit, split=heldout, seed=settings.seed
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
    )
