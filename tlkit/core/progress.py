"""Lightning loops -> plain progress lines, for output that is not a terminal (a file, a pipe, CI, nohup).

One line per training epoch (elapsed, ETA, the epoch's metrics) and a few per extraction, written to
stdout and flushed as they happen, with no control characters: `tail -f` and CI logs show a long run
as it goes. Terminals get Lightning's rich bars instead (runtime.progress_mode).
"""

from __future__ import annotations

import time

import lightning as L

from tlkit.core.lines import clock, say

SHOWN = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


class PlainProgress(L.Callback):
    """`epoch 3/20  0:41 elapsed, eta 3:52  train_loss 0.412  val_accuracy 0.913`; extraction every ~10 %."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self._start = 0.0
        self._said = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start = time.monotonic()
        self._first_epoch = trainer.current_epoch  # a resumed run starts later

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        done, total = trainer.current_epoch + 1, trainer.max_epochs or 0
        elapsed = time.monotonic() - self._start
        per_epoch = elapsed / max(1, done - self._first_epoch)
        metrics = trainer.callback_metrics
        values = "  ".join(f"{k} {float(metrics[k]):.4f}" for k in SHOWN if k in metrics)
        say(
            f"epoch {done}/{total}  {clock(elapsed)} elapsed, "
            f"eta {clock(per_epoch * (total - done))}  {values}".rstrip()
        )

    def on_predict_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start = self._said = time.monotonic()

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = trainer.num_predict_batches[dataloader_idx] if trainer.num_predict_batches else 0
        now = time.monotonic()
        step = max(1, int(total) // 10) if total else 0
        if (
            trainer.is_global_zero
            and total
            and (
                batch_idx + 1 == total
                or ((batch_idx + 1) % step == 0 and now - self._said >= 1.0)
                or now - self._said >= self.every_s
            )
        ):
            self._said = now
            elapsed = now - self._start
            eta = elapsed / (batch_idx + 1) * (total - batch_idx - 1)
            say(f"features: batch {batch_idx + 1}/{int(total)}  {clock(elapsed)} elapsed, eta {clock(eta)}")
