"""Manifest + Backbone -> trained classifier (Lightning): the best epoch's weights and its metrics.

Used by `tlkit pretrain` (train a backbone on a source task) and `tlkit finetune` (transfer it to
the target task with a new head). The module owns its parameter groups, so transfer strategies
(discriminative learning rates, freezing schedules) change `configure_optimizers` alone.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from tlkit import augment, runtime
from tlkit.backbone import Backbone
from tlkit.data import ImageDataset, make_loader
from tlkit.errors import TlkitError
from tlkit.evaluate import classification_metrics
from tlkit.ingest import Manifest
from tlkit.predict import infer

MONITOR = "val_accuracy"
MIN_SCHEDULED_STEPS = 8


class ImageClassifier(L.LightningModule):
    """A timm backbone (num_classes=0) followed by a new linear head.

    Args:
        backbone: the timm model returning pooled features.
        num_features: width of those features.
        num_classes: number of target classes.
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay (never applied to biases and norm parameters).
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(self, backbone: torch.nn.Module, num_features: int, num_classes: int, *, lr: float = 1e-3, weight_decay: float = 0.05, label_smoothing: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(num_features, num_classes)
        self.lr = lr
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images.contiguous(memory_format=torch.channels_last)))

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, labels, _ = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log(f"{stage}_accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: weight decay on weights only, every group with its own explicit lr."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        return [
            {"params": decay, "lr": self.lr, "weight_decay": self.weight_decay},
            {"params": no_decay, "lr": self.lr, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        groups = self.parameter_groups()
        optimizer = torch.optim.AdamW(groups)
        total_steps = int(self.trainer.estimated_stepping_batches)
        if total_steps < MIN_SCHEDULED_STEPS:  # one-cycle needs a few steps per phase; tiny runs keep lr fixed
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in groups],  # per group: schedulers ignore anything but explicit lrs
            total_steps=total_steps,
            pct_start=0.25,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@dataclass
class TrainResult:
    """The trained module (best epoch's weights loaded) and how it did."""

    module: ImageClassifier
    best_epoch: int | None
    best_val_accuracy: float | None
    metrics: dict[str, float]
    eval_split: str
    y_true: np.ndarray
    y_pred: np.ndarray
    epochs_run: int
    settings: dict = field(default_factory=dict)


def _dataset(manifest: Manifest, split: str, transform) -> ImageDataset:
    records = manifest.split(split)
    return ImageDataset([manifest.abspath(r) for r in records], manifest.labels(records), lambda img: augment.apply(transform, img))


def train_classifier(
    manifest: Manifest,
    backbone: Backbone,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.0,
    augment_preset: str = "light",
    hflip: bool = True,
    seed: int = 0,
    devices: int | str = "auto",
    precision: str = "auto",
    num_workers: int | None = None,
    callbacks: list[L.Callback] | None = None,
    workdir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train backbone + new head on the manifest's train split; keep the best epoch by val accuracy.

    Every parameter is trainable. Returns the module with the best epoch's weights and its
    metrics on the held-out split (test, else val).
    """
    if epochs < 1:
        raise TlkitError(f"--epochs must be at least 1, got {epochs}")
    if not manifest.split("train"):
        raise TlkitError("the training split is empty; ingest with smaller --val/--test or give a train/ folder")
    L.seed_everything(seed, workers=True, verbose=False)
    precision = runtime.resolve_precision(precision)
    train_tf = augment.resolve_train_transform(backbone.data_config, augment_preset, hflip=hflip)
    eval_tf = augment.eval_transform(backbone.data_config)
    module = ImageClassifier(backbone.model, backbone.num_features, len(manifest.classes), lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing)
    module = module.to(memory_format=torch.channels_last)

    train_loader = make_loader(_dataset(manifest, "train", train_tf), batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=seed)
    has_val = bool(manifest.split("val"))
    val_loader = make_loader(_dataset(manifest, "val", eval_tf), batch_size=batch_size * 2, num_workers=num_workers) if has_val else None

    workdir = Path(workdir or tempfile.mkdtemp(prefix="tlkit-train-"))
    checkpoint = ModelCheckpoint(dirpath=workdir, filename="best", monitor=MONITOR if has_val else None, mode="max", save_top_k=1)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=devices,
        precision=precision,
        logger=False,
        callbacks=[checkpoint, *(callbacks or [])],
        default_root_dir=workdir,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_loader, val_loader)

    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    best_epoch = int(best["epoch"]) if has_val else None
    best_score = checkpoint.best_model_score
    eval_split = manifest.eval_split
    eval_loader = make_loader(_dataset(manifest, eval_split, eval_tf), batch_size=batch_size * 2, num_workers=num_workers)
    y_true = manifest.labels(manifest.split(eval_split))
    y_pred = infer(module, eval_loader, precision=precision).argmax(1)
    metrics = classification_metrics(y_true, y_pred, manifest.classes, prefix="test_")
    return TrainResult(
        module=module,
        best_epoch=best_epoch,
        best_val_accuracy=float(best_score) if best_score is not None else None,
        metrics=metrics,
        eval_split=eval_split,
        y_true=y_true,
        y_pred=y_pred,
        epochs_run=trainer.current_epoch,
        settings={"precision": precision, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                  "label_smoothing": label_smoothing, "augment": augment_preset, "hflip": hflip, "seed": seed, "strategy": "full"},
    )
