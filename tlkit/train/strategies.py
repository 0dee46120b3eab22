"""Strategy name + epochs + layer groups -> training phases and per-group learning rates.

Pure functions: what trains when, and how fast. The LightningModule (train/module.py) applies them. They take
settings as `tlkit.config.TrainConfig` validates them (the strategy names, ranges and freeze_epochs below epochs
are its rules); what depends on the backbone (its number of layer groups) is checked here.

Recipes:
- linear-probe:    body frozen, head trained.
- full:            everything trainable from the start.
- freeze-unfreeze: head only for `freeze_epochs`, then everything with discriminative learning rates
                   and a fresh schedule at half the head rate (fastai's `fine_tune`).
- gradual:         unfreeze one group more, from the top, every `unfreeze_every` epochs (ULMFiT).
- lp-ft:           the head first fitted to convergence on the frozen features (L-BFGS logistic
                   regression on the probe's cached features), then everything fine-tuned from that head
                   (Kumar et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

from tlkit.config import STRATEGIES
from tlkit.errors import TlkitError


@dataclass(frozen=True)
class Phase:
    """From epoch `start` on, the top `trainable` body groups (and the head) train at `lr_scale` x their rate."""

    start: int
    trainable: int
    name: str
    lr_scale: float = 1.0


def default_freeze_epochs(epochs: int) -> int:
    """freeze-unfreeze without --freeze-epochs: one head-only epoch, none when there is a single epoch
    (it then trains everything; fastai's fine_tune(1) would add a second epoch instead)."""
    return 1 if epochs > 1 else 0


def plan_phases(
    strategy: str, *, epochs: int, n_groups: int, freeze_epochs: int | None = None, unfreeze_every: int = 1
) -> list[Phase]:
    """The phases of `strategy` over `epochs` epochs for a body of `n_groups` layer groups."""
    if strategy not in STRATEGIES:
        raise TlkitError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "linear-probe":
        return [Phase(0, 0, "head")]
    if strategy in ("full", "lp-ft"):
        return [Phase(0, n_groups, "all")]
    if strategy == "freeze-unfreeze":
        if freeze_epochs is None:
            freeze_epochs = default_freeze_epochs(epochs)
            if freeze_epochs == 0:
                return [Phase(0, n_groups, "all", lr_scale=0.5)]
        return [Phase(0, 0, "head"), Phase(freeze_epochs, n_groups, "all", lr_scale=0.5)]
    phases = [Phase(k * unfreeze_every, k, "head" if k == 0 else f"top {k}") for k in range(n_groups + 1)]
    return [p for p in phases if p.start < epochs]


def phase_index(phases: list[Phase], epoch: int) -> int:
    return max(i for i, p in enumerate(phases) if p.start <= epoch)


def phase_end(phases: list[Phase], index: int, epochs: int) -> int:
    """First epoch after phase `index`."""
    return phases[index + 1].start if index + 1 < len(phases) else epochs


def group_lrs(
    lr: float, n_groups: int, *, lr_mult: float = 3.0, lrs: list[float] | None = None, frozen: int = 0
) -> list[float]:
    """Learning rates of the body groups (input side first) followed by the head.

    Each earlier group gets `lr_mult` x less than the next later one (a geometric spread), unless
    `lrs` gives all n_groups + 1 rates explicitly. The first `frozen` groups get 0: they never train.
    """
    if frozen and frozen >= n_groups:
        raise TlkitError(
            f"--frozen-groups {frozen} leaves none of the {n_groups} layer groups to train; lower it, or use "
            "--strategy linear-probe to train the head alone"
        )
    rates = _group_lrs(lr, n_groups, lr_mult=lr_mult, lrs=lrs)
    return [0.0 if i < frozen else rate for i, rate in enumerate(rates)]


def _group_lrs(lr: float, n_groups: int, *, lr_mult: float, lrs: list[float] | None) -> list[float]:
    if lrs is not None:
        if len(lrs) != n_groups + 1:
            raise TlkitError(
                f"--lrs needs {n_groups + 1} values ({n_groups} layer groups, input side first, then the head), got "
                f"{len(lrs)}"
            )
        if any(v < 0 for v in lrs):
            raise TlkitError("--lrs values must be >= 0")
        return [float(v) for v in lrs]
    return [lr / lr_mult ** (n_groups - i) for i in range(n_groups)] + [lr]
