"""Epoch time of a fine-tune on photo-sized JPEGs: decoding every epoch vs decoding once.

Three ways through the same tlkit fine-tune (same model, data, seed, settings), interleaved:
  full     every epoch decodes every JPEG whole, then crops (tlkit before the decoded-image cache)
  reduced  every epoch decodes at the size the transforms read (PIL draft), no cache
  tlkit    decoded once at that size before the first epoch, kept in memory (the default)
and the bound: the same steps (forward + backward + optimizer on the train batches, forward on the
val batches) on tensors already decoded and augmented in memory, by hand.

    python bench/epochs.py                      # resnet18, 224 px, 64 photos of 0.3-5 MP, 4 epochs
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from photos import write_photos  # noqa: E402

from tlkit.config import ComputeConfig, TrainConfig  # noqa: E402
from tlkit.core import runtime  # noqa: E402
from tlkit.data import augment
from tlkit.data.ingest import ingest  # noqa: E402
from tlkit.models.backbone import create_backbone  # noqa: E402
from tlkit.train import finetune
from tlkit.train.module import adamw


class EpochTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation
        self.seconds.append(time.perf_counter() - self._start)


def tlkit_epochs(manifest, backbone, settings, precision, way: str) -> list[float]:
    timer = EpochTimer()
    patches = []
    if way in ("full", "reduced"):
        patches.append(mock.patch.object(finetune, "decode_split", lambda *a, **k: None))
    if way == "full":
        patches.append(mock.patch.object(augment, "decode_side", lambda transform: None))
    for patch in patches:
        patch.start()
    try:
        compute = ComputeConfig(precision=precision)
        finetune.train_classifier(
            manifest, backbone, settings, compute=compute, fit=finetune.FitOptions(callbacks=[timer], progress=False)
        )
    finally:
        for patch in reversed(patches):
            patch.stop()
    return timer.seconds


def plain_epoch(manifest, backbone, settings, precision) -> float:
    """One epoch's steps on pre-decoded, pre-augmented tensors: the compute alone."""
    module = finetune.build_module(manifest, backbone, settings).to(memory_format=torch.channels_last)
    module.apply_phase(len(module.phases) - 1)
    loader, _ = finetune.train_loader(manifest, backbone, settings, num_workers=0, memory_mb=1e9)
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y, _ in loader]
    val = finetune._dataset(manifest, "val", augment.eval_transform(backbone.data_config))
    val_batch = torch.stack([val[i][0] for i in range(len(val))]).contiguous(memory_format=torch.channels_last)
    optimizer = adamw([g for g in module.parameter_groups() if g["params"]])
    autocast = precision.startswith("bf16")
    start = time.perf_counter()
    module.train()
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    module.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, len(val_batch), settings.batch_size * 2):
            module(val_batch[i : i + settings.batch_size * 2])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=64, help="photos (a quarter go to val)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    runtime.quiet()
    runtime.tune_allocator()
    precision = runtime.resolve_precision("auto")
    tmp = Path(tempfile.mkdtemp(prefix="tlkit-bench-epochs-"))
    try:
        write_photos(tmp / "images", args.n)
        manifest = ingest(tmp / "images", val=0.25, test=0, cache=False)
        backbone = create_backbone(args.model, img_size=args.size)
        settings = TrainConfig(epochs=args.epochs, strategy="full", batch_size=args.batch, augment="light")
        print(
            f"{args.model} at {args.size} px, {len(manifest.split('train'))} train + {len(manifest.split('val'))} val "
            "photos of 0.3-5 MP, "
            f"batch {args.batch}, {args.epochs} epochs, precision {precision}, {torch.get_num_threads()} threads"
        )
        plain_epoch(manifest, backbone, settings, precision)  # warm-up
        runs: dict[str, list[list[float]]] = {"full": [], "reduced": [], "tlkit": []}
        plain: list[float] = []
        for _ in range(args.repeats):
            for way in runs:
                runs[way].append(tlkit_epochs(manifest, backbone, settings, precision, way))
            plain.append(plain_epoch(manifest, backbone, settings, precision))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bound = statistics.median(plain)
    print(f"plain steps on decoded tensors: {bound:.2f} s per epoch (median of {' '.join(f'{t:.2f}' for t in plain)})")
    for way, epochs in runs.items():
        first = statistics.median(e[0] for e in epochs)
        later = statistics.median(t for e in epochs for t in e[1:])
        print(
            f"{way:8s} epoch 1 {first:6.2f} s   epochs 2-{args.epochs} {later:6.2f} s   = {later / bound:4.2f} x the "
            "plain steps"
        )


if __name__ == "__main__":
    main()
