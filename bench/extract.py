"""Feature-extraction throughput: tlkit (image files -> cache) vs the bare timm forward pass.

Both sides use the same model, input size, batch size and precision. The upper bound is the
frozen model alone on tensors that are already decoded, resized and normalised in memory, so the
ratio shows what decoding, the DataLoader, Lightning's predict loop and the cache write cost.

With --photos the files are photo-sized JPEGs of mixed sizes (0.3-5 MP, bench/photos.py), with --folder
the real photos of an image folder, and a third side runs: decode + forward done the simplest fast way by hand (PIL's
draft decode, resize,
centre crop, normalise, forward; the resize with the interpolation the model's data config names), the bound
for a loop that decodes the files itself.

    python bench/extract.py                       # resnet18, 224 px, 512 JPEGs of 256 px, median of 3
    python bench/extract.py --photos --n 160      # real-size photos
    python bench/extract.py --folder ../shared/datasets/hymenoptera --batch 32   # real photos from a folder (all of
    them)
    python bench/extract.py --model resnet50 --n 256
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tlkit.config import ComputeConfig
from tlkit.core import runtime
from tlkit.data import augment
from tlkit.data.images import load_rgb
from tlkit.data.ingest import ingest
from tlkit.features.extract import extract_features
from tlkit.models.backbone import create_backbone


def write_images(root: Path, n: int, size: int) -> None:
    """Photo-like JPEGs (smooth colour fields plus noise) in 4 class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin(6 * xx + phase[c]) * np.cos(4 * yy - phase[c]) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor], precision: str) -> float:
    """Seconds for the frozen model alone over pre-decoded batches (after one warm-up batch)."""
    model = model.eval().to(memory_format=torch.channels_last)
    autocast = precision.startswith("bf16")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(batches[0])
        start = time.perf_counter()
        for batch in batches:
            model(batch).float()
        return time.perf_counter() - start


def bare_decode_forward(
    model: torch.nn.Module, paths: list[Path], data_config: dict, batch: int, precision: str
) -> float:
    """Seconds for files -> features by hand: draft decode, resize the short side, centre crop, normalise, forward."""
    from PIL import Image

    size = data_config["input_size"][-1]
    side = int(size / data_config["crop_pct"])
    resample = Image.Resampling.BICUBIC if data_config.get("interpolation") == "bicubic" else Image.Resampling.BILINEAR
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1) * 255
    model = model.eval().to(memory_format=torch.channels_last)
    autocast = precision.startswith("bf16")
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, len(paths), batch):
            arrays = []
            for path in paths[i : i + batch]:
                with Image.open(path) as image:
                    image.draft("RGB", (side, side))
                    image = image.convert("RGB")
                    scale = side / min(image.size)
                    image = image.resize(
                        (max(side, round(image.width * scale)), max(side, round(image.height * scale))), resample
                    )
                    left, top = (image.width - size) // 2, (image.height - size) // 2
                    arrays.append(np.asarray(image.crop((left, top, left + size, top + size))))
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().sub_(mean).div_(std)
            model(x.contiguous(memory_format=torch.channels_last)).float()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--image-size", type=int, default=256, help="side of the JPEGs on disk")
    parser.add_argument("--n", type=int, default=512, help="number of images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--photos", action="store_true", help="photo-sized JPEGs of mixed sizes (0.3-5 MP) instead of --image-size ones"
    )
    parser.add_argument(
        "--folder", type=Path, default=None, help="real photos: every image of this folder (--n is then their number)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternate the sides this many times; medians (and minimums) count"
    )
    args = parser.parse_args()

    runtime.quiet()
    runtime.tune_allocator()
    precision = runtime.resolve_precision(args.precision)
    tmp = Path(tempfile.mkdtemp(prefix="tlkit-bench-"))
    try:
        if args.folder is not None:
            what = f"real photos of {args.folder}"
        elif args.photos:
            sys.path.insert(0, str(Path(__file__).parent))
            from photos import write_photos

            write_photos(tmp / "images", args.n)
            what = "photo JPEGs of 0.3-5 MP"
        else:
            write_images(tmp / "images", args.n, args.image_size)
            what = f"JPEGs of {args.image_size} px"
        manifest = ingest(args.folder if args.folder is not None else tmp / "images", val=0, test=0, cache=False)
        args.n = len(manifest.records)
        backbone = create_backbone(args.model, img_size=args.size)
        paths = [manifest.abspath(r) for r in manifest.records]
        print(
            f"{args.model} at {args.size} px, {args.n} {what}, batch {args.batch}, "
            f"precision {precision}, {torch.get_num_threads()} threads"
        )

        # Warm-up: the first Lightning/oneDNN call pays one-off costs that a real run pays once too.
        def compute(cache: str) -> ComputeConfig:
            return ComputeConfig(
                batch_size=args.batch, num_workers=args.workers, precision=precision, cache_dir=str(tmp / cache)
            )

        extract_features(manifest, backbone, compute=compute("warm"), use_cache=False, progress=False)
        transform = augment.eval_transform(backbone.data_config)
        side = augment.decode_side(transform)
        tensors = torch.stack([augment.apply(transform, load_rgb(path, side)) for path in paths])
        batches = [
            tensors[i : i + args.batch].contiguous(memory_format=torch.channels_last)
            for i in range(0, len(tensors), args.batch)
        ]
        # Interleave the sides and compare medians: single runs on a shared 2-core machine were seen
        # to vary by 30% or more.
        tlkit_times, bare_times, by_hand_times = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            extract_features(manifest, backbone, compute=compute("cache"), use_cache=False, progress=False)
            tlkit_times.append(time.perf_counter() - start)
            bare_times.append(bare_forward(backbone.model, batches, precision))
            if args.photos or args.folder is not None:
                by_hand_times.append(
                    bare_decode_forward(backbone.model, paths, backbone.data_config, args.batch, precision)
                )
        start = time.perf_counter()
        cached = extract_features(manifest, backbone, compute=compute("cache"), progress=False)
        cached_s = time.perf_counter() - start
        assert cached.cached
        print(
            "tlkit runs (s):",
            " ".join(f"{t:.2f}" for t in tlkit_times),
            "  bare forward runs (s):",
            " ".join(f"{t:.2f}" for t in bare_times),
            *(
                ["  by-hand decode + forward runs (s):", " ".join(f"{t:.2f}" for t in by_hand_times)]
                if by_hand_times
                else []
            ),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tlkit_rate, bare_rate = args.n / statistics.median(tlkit_times), args.n / statistics.median(bare_times)
    print(f"bare timm forward (pre-decoded tensors): {bare_rate:8.1f} images/s (median)")
    if by_hand_times:
        hand_rate = args.n / statistics.median(by_hand_times)
        print(f"by-hand decode + forward (files):        {hand_rate:8.1f} images/s (median)")
    print(f"tlkit extract (files -> cache):          {tlkit_rate:8.1f} images/s (median)")
    print(
        f"ratio tlkit / bare forward:              {tlkit_rate / bare_rate:8.2f} median, "
        f"{min(bare_times) / min(tlkit_times):.2f} best vs best"
    )
    if by_hand_times:
        print(f"ratio tlkit / by-hand decode + forward:  {tlkit_rate / hand_rate:8.2f} median")
    print(f"second, cached call:                     {cached_s * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
