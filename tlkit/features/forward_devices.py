"""A frozen model over a DataLoader on several devices (or a GPU) -> features, in Lightning's predict loop.

Imported only there: Lightning costs a second to import, and one CPU needs none of it (tlkit.features.forward).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from tlkit.core import runtime


class _Extractor(L.LightningModule):
    """Frozen backbone for Lightning's predict loop: channels-last, eval mode, inference mode."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval().to(memory_format=torch.channels_last)

    def predict_step(self, batch, batch_idx):
        images, _, index = batch
        features = self.model(images.contiguous(memory_format=torch.channels_last))
        return index.cpu(), features.float().cpu()


class _ShardWriter(BasePredictionWriter):
    """With several devices each process writes its shard; the main process joins them."""

    def __init__(self, folder: Path):
        super().__init__(write_interval="epoch")
        self.folder = folder

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        torch.save(predictions, self.folder / f"shard-{trainer.global_rank}.pt")


def forward_on_devices(
    model: torch.nn.Module, num_features: int, loader, *, devices, precision: str, progress: bool
) -> np.ndarray:
    """Features of every item of `loader`, in dataset order, from Lightning's predict loop on `devices`."""
    n = len(loader.dataset)
    with tempfile.TemporaryDirectory(prefix="tlkit-extract-") as tmp:
        # Several devices: spawned processes run only the predict loop and write shards to this
        # folder; this process joins them and does everything else (cache, tracking) once.
        trainer = runtime.build_trainer(
            devices=devices,
            precision=precision,
            progress=progress,
            root_dir=tmp,
            enable_checkpointing=False,
            inference_mode=True,
            callbacks=[_ShardWriter(Path(tmp))],
        )
        with runtime.quiet_lightning():
            trainer.predict(_Extractor(model), dataloaders=loader, return_predictions=False)
        X = np.zeros((n, num_features), dtype=np.float32)
        seen = np.zeros(n, dtype=bool)
        for shard in Path(tmp).glob("shard-*.pt"):
            for index, features in torch.load(shard, weights_only=True):
                X[index.numpy()] = features.numpy()  # the sampler's padding repeats a few images: same values
                seen[index.numpy()] = True
        if not seen.all():
            raise RuntimeError(f"feature extraction returned {seen.sum()} of {n} images")
    model.to(memory_format=torch.contiguous_format)
    return X
