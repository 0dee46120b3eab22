"""Module + training data -> loss-vs-learning-rate curve and a suggested head learning rate.

One sweep of a common factor over every layer group while keeping their ratios (the discriminative
spread), all groups trainable, exponentially from `min_lr` to `max_lr` (Smith 2017; fastai's and
Lightning's finders set every group to the same rate, which loses the spread). The weights are
restored afterwards.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F

from tlkit.core import runtime
from tlkit.errors import TlkitError
from tlkit.train.module import adamw


@dataclass
class LRFindResult:
    """Head learning rates tried, their smoothed losses, and the suggestion."""

    lrs: np.ndarray
    losses: np.ndarray
    suggestion: float

    def figure(self):
        from tlkit.core.metrics import plt

        figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
        axis.plot(self.lrs, self.losses)
        axis.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"suggested head lr {self.suggestion:.2g}")
        axis.set_xscale("log")
        axis.set_xlabel("head learning rate (earlier groups keep their ratios)")
        axis.set_ylabel("training loss (smoothed)")
        axis.legend()
        figure.tight_layout()
        return figure


def _suggest(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The rate of steepest descent before the loss minimum, a decade below the minimum if flat."""
    lowest = int(np.argmin(losses))
    skip = max(1, len(losses) // 10)
    if lowest - skip < 3:
        return float(lrs[lowest] / 10)
    slope = np.gradient(losses[skip:lowest], np.log(lrs[skip:lowest]))
    return float(lrs[skip + int(np.argmin(slope))])


def find_lr(
    module, loader, *, min_lr: float = 1e-6, max_lr: float = 1.0, steps: int = 100, precision: str = "32-true"
) -> LRFindResult:
    """Sweep the head learning rate from `min_lr` to `max_lr` over `steps` batches (loader repeats).

    Args:
        module: an ImageClassifier; its `lrs` give the ratios between groups.
        loader: training batches of (images, labels, index).
        min_lr, max_lr: range of the head's learning rate.
        steps: batches in the sweep; it stops early when the loss diverges.
        precision: autocast as in training.
    """
    if not 0 < min_lr < max_lr:
        raise TlkitError(f"the LR range must satisfy 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    saved = copy.deepcopy(module.state_dict())
    phase = module.phase
    module.sweeping = True  # every group trains in the sweep, whatever the strategy
    module.apply_phase(max(phase, 0))
    groups = [g for g in module.parameter_groups() if g["params"]]
    head_lr = module.lrs[-1]
    ratios = [g["lr"] / head_lr for g in groups]
    optimizer = adamw(groups)
    device = next(module.parameters()).device
    factors = np.geomspace(min_lr, max_lr, steps)
    lrs, losses, average, best = [], [], 0.0, float("inf")
    module.train()
    batches = iter(loader)
    try:
        for step, lr in enumerate(factors):
            try:
                images, labels, _ = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, labels, _ = next(batches)
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio
            with runtime.autocast(device.type, precision):
                loss = F.cross_entropy(module(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            average = 0.98 * average + 0.02 * float(loss.detach())
            smoothed = average / (1 - 0.98 ** (step + 1))
            if not np.isfinite(smoothed) or (step > 10 and smoothed > 4 * best):
                break
            best = min(best, smoothed)
            lrs.append(lr)
            losses.append(smoothed)
    finally:
        module.sweeping = False
        module.load_state_dict(saved)
        module.apply_phase(max(phase, 0))
    if len(lrs) < 5:
        raise TlkitError(
            f"the LR sweep diverged at once, from its smallest rate ({min_lr:g}); check the images and labels, "
            "or pass a small --lr instead of auto"
        )
    lrs_a, losses_a = np.array(lrs), np.array(losses)
    return LRFindResult(lrs_a, losses_a, _suggest(lrs_a, losses_a))
