"""Robustness: accuracy under the fast gradient sign attack (Goodfellow et al. 2015).

The attack works in pixel space before normalisation: x' = clip(x + eps * sign(grad_x loss), 0, 1),
so eps is a fraction of the pixel range (8/255 ≈ 0.031 is a common budget).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tlkit.errors import TlkitError
from tlkit.models.network import Ensemble, Network


def fgsm(network: Network | Ensemble, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Adversarial copies of `images` (in [0, 1]) for one step of size eps along the loss gradient's sign."""
    if eps < 0 or eps > 1:
        raise TlkitError(f"--eps is a fraction of the pixel range, between 0 and 1 (e.g. 0.03 or 8/255); got {eps}")
    x = images.clone().requires_grad_(True)
    F.cross_entropy(network(x), labels).backward()
    grad = x.grad
    assert grad is not None  # x requires grad and the loss depends on it
    return (images + eps * grad.sign()).clamp(0, 1).detach()


def fgsm_accuracy(
    network: Network | Ensemble,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps_values: list[float],
    *,
    batch_size: int = 64,
) -> tuple[dict[float, float], dict[float, torch.Tensor]]:
    """Accuracy at each eps (eps 0 is the clean accuracy), and the adversarial images of the first batch."""
    accuracy, examples = {}, {}
    for eps in eps_values:
        correct = 0
        for start in range(0, len(images), batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            adversarial = fgsm(network, x, y, eps) if eps > 0 else x
            with torch.no_grad():
                correct += int((network(adversarial).argmax(1) == y).sum())
            if start == 0:
                examples[eps] = adversarial
        accuracy[eps] = correct / max(len(images), 1)
    return accuracy, examples


def parse_eps(values: list[str]) -> list[float]:
    """'0.03', '8/255' or comma lists of them -> sorted floats."""
    parsed = set()
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            try:
                number = float(part.split("/")[0]) / float(part.split("/")[1]) if "/" in part else float(part)
            except (ValueError, ZeroDivisionError):
                raise TlkitError(f"--eps {part!r} is not a number; write e.g. --eps 0.01 --eps 8/255") from None
            parsed.add(number)
    return sorted(parsed)


def to_image(x: torch.Tensor) -> np.ndarray:
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
