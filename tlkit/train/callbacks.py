"""The Lightning callbacks of a fine-tune: checkpoints written atomically, phase changes, early stopping that
counts the last phase only, metrics and learning rates sent to the MLflow run."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from tlkit.train.strategies import phase_index

CHECKPOINT_EVERY_S = 30.0  # last.ckpt (for --resume) at most this often, besides phase ends


class LatestCheckpoint(L.Callback):
    """Writes last.ckpt for --resume: at the end of every phase but the last, otherwise at most every
    `every_s` seconds. A resnet18 checkpoint with its optimizer state takes about 0.27 s to write; saved
    every epoch, the quickstart's 40 short epochs would spend a quarter of their time writing them. Not at
    the end of training: the weights are in memory then, and the finished run is logged with its model
    (a write there would be 4 % of `bench/finetune.py`'s tlkit side)."""

    # Not ModelCheckpoint(train_time_interval=...): it saves on its own clock only, not at phase boundaries, and
    # writes in place, where this writes beside and renames (a kill mid-write keeps the previous checkpoint).

    def __init__(self, path: Path, every_s: float | None = None, *, at_end: bool = False):
        """`at_end`: also when training ends (a fit that another fit follows in the same run: a refit)."""
        self.path = Path(path)
        self.every_s = CHECKPOINT_EVERY_S if every_s is None else every_s
        self.at_end = at_end
        self._saved_at = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:  # an ImageClassifier
        done = trainer.current_epoch + 1
        if done >= (trainer.max_epochs or 0) or trainer.should_stop:
            if self.at_end:
                self.save(trainer)
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


class WholeModelCheckpoint(ModelCheckpoint):
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


class LastPhaseEarlyStopping(EarlyStopping):
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
