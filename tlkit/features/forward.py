"""A frozen model over a DataLoader -> its outputs: `infer` (a module's outputs, in order) and `forward_loader`
(features for the cache: a plain loop on one CPU, Lightning's predict loop on GPUs or several devices).

On a machine without a GPU the loop is the plain one: Lightning's import and predict-loop set-up cost more than a
second of a small folder's extraction, for nothing one process on one device needs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from tlkit.core import lines, runtime


@torch.inference_mode()
def infer(module: torch.nn.Module, loader, *, precision: str = "32-true") -> np.ndarray:
    """Outputs of `module` for every item of `loader`, in order (autocast per `precision`)."""
    module.eval()
    device = next(module.parameters()).device
    out = []
    for images, _, _ in loader:
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device.type, precision):
            out.append(module(images).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def forward_loader(
    model: torch.nn.Module, num_features: int, loader, *, devices, precision: str, progress: bool
) -> np.ndarray:
    """Features of every item of `loader`, in dataset order, on `devices` (see the module's docstring)."""
    if runtime.may_have_gpu() or runtime.device_count(devices) > 1:
        from tlkit.features.forward_devices import forward_on_devices

        return forward_on_devices(model, num_features, loader, devices=devices, precision=precision, progress=progress)
    model = model.eval().to(memory_format=torch.channels_last)
    X = np.zeros((len(loader.dataset), num_features), dtype=np.float32)
    try:
        with torch.inference_mode():
            for images, _, index in _shown(loader, progress):
                with runtime.autocast("cpu", precision):
                    features = model(images.contiguous(memory_format=torch.channels_last))
                X[index.numpy()] = features.float().numpy()
    finally:
        model.to(memory_format=torch.contiguous_format)
    return X


def _shown(batches: Iterable, progress: bool) -> Iterator:
    """`batches`, with the progress Lightning's loop would show: a bar on a terminal, plain lines otherwise."""
    mode = runtime.progress_mode() if progress and runtime.progress_bars_on() else "off"
    total = len(batches)  # type: ignore[arg-type]  # a DataLoader
    if mode == "rich":
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            yield from bar.track(batches, total=total, description="features")
        return
    start = said = time.monotonic()
    for i, batch in enumerate(batches, start=1):
        yield batch
        now = time.monotonic()
        if mode == "plain" and (i == total or (i % max(1, total // 10) == 0 and now - said >= 1.0) or now - said >= 10):
            said, elapsed = now, now - start
            eta = lines.clock(elapsed / i * (total - i))
            lines.say(f"features: batch {i}/{total}  {lines.clock(elapsed)} elapsed, eta {eta}")
