"""Training throughput: tlkit's fine-tuning (Lightning module, callbacks, checkpoints) vs a plain loop.

Same model, input size, batch size, precision, optimizer groups and one-cycle schedule, on the same
decoded tensors in memory, so the ratio shows what tlkit's machinery costs per step: Lightning's
loop, the phase and metrics callbacks, the resume checkpoint.

    python bench/finetune.py                     # resnet18, 128 px, 512 images, batch 32, 3 epochs, 5 interleaved
    rounds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tlkit.core import runtime
from tlkit.models.backbone import create_backbone, layer_groups, merge_groups
from tlkit.train.callbacks import LatestCheckpoint, MetricsCallback, PhaseCallback
from tlkit.train.module import ImageClassifier
from tlkit.train.strategies import group_lrs, plan_phases


def make_module(backbone, classes: int, lr: float) -> ImageClassifier:
    groups = merge_groups(layer_groups(backbone.model), 4)
    module = ImageClassifier(
        copy.deepcopy(backbone.model),
        backbone.num_features,
        classes,
        groups=groups,
        lrs=group_lrs(lr, len(groups), lr_mult=3.0),
        phases=plan_phases("full", epochs=1, n_groups=len(groups)),
    )
    return module.to(memory_format=torch.channels_last)


def plain_loop(module: ImageClassifier, loader: DataLoader, epochs: int, precision: str) -> float:
    """The same steps by hand: AdamW (fused, as tlkit's) over the same groups, one-cycle per step, bf16 autocast."""
    module.apply_phase(0)
    groups = [g for g in module.parameter_groups() if g["params"]]
    optimizer = torch.optim.AdamW(groups, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=epochs * len(loader), pct_start=0.25
    )
    autocast = precision.startswith("bf16")
    module.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for images, labels, _ in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(module(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return time.perf_counter() - start


def tlkit_fit(module: ImageClassifier, loader: DataLoader, epochs: int, precision: str) -> float:
    """The Trainer exactly as finetune.train_classifier builds it for data without a selecting val split
    (runtime.build_trainer; no best-epoch checkpoint; the resume checkpoint, phase and metrics callbacks).
    Lightning's default ModelCheckpoint stays off, as in tlkit: it would save a full checkpoint every epoch that
    tlkit never writes (about 5 % of this side)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = runtime.build_trainer(
            devices=1,
            precision=precision,
            progress=False,
            root_dir=tmp,
            max_epochs=epochs,
            callbacks=[LatestCheckpoint(f"{tmp}/last.ckpt"), PhaseCallback(), MetricsCallback()],
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        start = time.perf_counter()
        trainer.fit(module, loader)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternate the two sides this many times; medians and minimums count"
    )
    args = parser.parse_args()

    runtime.quiet()
    runtime.tune_allocator()
    precision = runtime.resolve_precision(args.precision, "cpu")
    torch.manual_seed(0)
    images = torch.randn(args.n, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.n,))
    loader = DataLoader(
        TensorDataset(images, labels, torch.arange(args.n)), batch_size=args.batch, shuffle=True, drop_last=True
    )
    backbone = create_backbone(args.model, img_size=args.size)
    print(
        f"{args.model} at {args.size} px, {args.n} images in memory, batch {args.batch}, {args.epochs} epochs, "
        f"precision {precision}, {torch.get_num_threads()} threads"
    )

    plain_loop(make_module(backbone, 10, 1e-3), loader, 1, precision)  # warm-up: oneDNN picks its kernels once
    # Alternate the sides and compare medians (and minimums): on a shared 2-core machine single runs
    # were seen to vary by 30%, more than the difference being measured.
    tlkit_times, plain_times = [], []
    for _ in range(args.repeats):
        tlkit_times.append(tlkit_fit(make_module(backbone, 10, 1e-3), loader, args.epochs, precision))
        plain_times.append(plain_loop(make_module(backbone, 10, 1e-3), loader, args.epochs, precision))
    tlkit_s, plain_s = statistics.median(tlkit_times), statistics.median(plain_times)
    print(
        "tlkit runs (s):",
        " ".join(f"{t:.2f}" for t in tlkit_times),
        "  plain runs (s):",
        " ".join(f"{t:.2f}" for t in plain_times),
    )
    seen = args.epochs * len(loader) * args.batch
    print(f"plain PyTorch loop:   {seen / plain_s:8.1f} images/s (median)")
    print(f"tlkit (Lightning):    {seen / tlkit_s:8.1f} images/s (median)")
    print(
        f"ratio tlkit / plain:  {plain_s / tlkit_s:8.2f} median, {min(plain_times) / min(tlkit_times):.2f} best vs best"
    )


if __name__ == "__main__":
    main()
