"""The Lightning module of a fine-tune: a timm backbone in layer groups, a new linear head, one learning rate a group.

Every parameter group exists from the first step; a phase change (strategies.plan_phases) builds a new optimizer
and schedule over the same groups (adding groups mid-fit breaks schedulers and DDP).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from tlkit.config import TrainConfig
from tlkit.train.strategies import Phase, phase_end, phase_index

MONITOR = "val_score"  # val accuracy, ties broken by lower val loss (see ImageClassifier.on_validation_epoch_end)
MIN_SCHEDULED_STEPS = 8  # a phase of fewer optimizer steps runs at a constant rate: no warm-up or decay to fit in


class ImageClassifier(L.LightningModule):
    """A timm backbone (num_classes=0), split into layer groups, followed by a new linear head.

    Args:
        backbone: the timm model returning pooled features.
        num_features: width of those features.
        num_classes: number of target classes.
        groups: (label, parameter names) of each body group, input side first (`layer_groups`, `merge_groups`).
        lrs: learning rate of each body group, then of the head (see `strategies.group_lrs`).
        phases: which groups train when (see `strategies.plan_phases`); default: all, always.
        class_weights: per-class loss weights, for imbalanced data.
        settings: the recipe's loss and optimiser settings, read here: `weight_decay` (AdamW's, never on biases and
            norm parameters), `label_smoothing` (training loss only), `schedule` (onecycle, cosine with 5% linear
            warm-up, or constant; restarted every phase) and `bn` ("frozen" keeps BatchNorm layers of frozen groups
            in eval mode, statistics fixed; "train" lets their statistics update; "keep-stats" keeps every BatchNorm
            layer's pretrained statistics, in trained groups too, their scale and shift still training).
    """

    class_weights: torch.Tensor  # a buffer

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_features: int,
        num_classes: int,
        *,
        groups: list[tuple[str, list[str]]],
        lrs: list[float],
        phases: list[Phase] | None = None,
        class_weights: torch.Tensor | None = None,
        settings: TrainConfig | None = None,
    ):
        super().__init__()
        settings = settings or TrainConfig()
        self.backbone = backbone
        self.head = torch.nn.Linear(num_features, num_classes)
        self.groups = [names for _, names in groups]
        self.group_labels = [label for label, _ in groups]
        self.lrs = list(lrs)
        self.phases = phases or [Phase(0, len(groups), "all")]
        self.weight_decay = settings.weight_decay
        self.label_smoothing = settings.label_smoothing
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(num_classes))
        self.schedule = settings.schedule
        self.bn = settings.bn
        self.phase = -1  # index into phases; -1 before training starts
        self.sweeping = False  # the LR finder trains every group
        self.freeze_by_lr = False  # under DDP: frozen groups keep requires_grad and get lr 0
        self._frozen_bn: list[torch.nn.Module] = []

    # -- forward and steps ---------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images.contiguous(memory_format=torch.channels_last)))

    def training_step(self, batch, batch_idx):
        images, labels, _ = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True
        )
        self.log(
            "train_accuracy",
            accuracy,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels, _ = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        self._val_sums += torch.stack(
            [
                (logits.argmax(1) == labels).sum().float(),
                loss.float(),
                torch.tensor(len(labels), dtype=torch.float32, device=loss.device),
            ]
        )
        self.log(
            "val_loss",
            loss / len(labels),
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,
        )
        self.log(
            "val_accuracy",
            (logits.argmax(1) == labels).float().mean(),
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,
        )

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, device=self.device)

    def on_validation_epoch_end(self) -> None:
        """Log `val_score`: accuracy first, lower loss only among epochs of equal accuracy.

        On a small validation set accuracy saturates early and ties; ModelCheckpoint keeps the first
        of tied epochs, an under-trained one. Measured on the quickstart target (10 val images):
        epochs 24-26 kept, 0.862 mean test accuracy over 3 seeds; with this tie-break 33-34, 0.887. The loss
        term, loss / (1 + loss) / (2 n), is below half of one image's accuracy step (1 / n).
        """
        correct, loss_sum, n = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        if n:
            self.log(
                "val_score", selection_score(correct, loss_sum, int(n)), on_step=False, on_epoch=True, sync_dist=False
            )

    # -- freezing --------------------------------------------------------------------------------

    def trainable_groups(self) -> list[bool]:
        """Per body group, whether it trains in the current phase (all of them during an LR sweep)."""
        if self.sweeping:
            return [True] * len(self.groups)
        top = self.phases[max(self.phase, 0)].trainable
        n = len(self.groups)
        # a group whose rate is 0 never trains (`--lrs 0,0,...`: partial fine-tuning, no backward pass through it)
        return [i >= n - top and self.lrs[i] > 0 for i in range(n)]

    def apply_phase(self, index: int) -> None:
        """Freeze and unfreeze groups for phase `index`; BatchNorm of frozen groups per the policy."""
        self.phase = index
        params = dict(self.backbone.named_parameters())
        modules = dict(self.backbone.named_modules())
        frozen_names: set[str] = set()
        for names, trains in zip(self.groups, self.trainable_groups()):
            for name in names:
                params[name].requires_grad_(trains or self.freeze_by_lr)
                if not trains:
                    frozen_names.add(name)
        self._frozen_bn = []
        if self.bn in ("frozen", "keep-stats"):
            for mname, module in modules.items():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    own = [f"{mname}.{p}" for p, _ in module.named_parameters(recurse=False)] or [f"{mname}.weight"]
                    if self.bn == "keep-stats" or all(p in frozen_names for p in own):
                        self._frozen_bn.append(module)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self._frozen_bn:
                module.eval()
        return self

    def setup(self, stage: str) -> None:
        self.freeze_by_lr = self.trainer.world_size > 1
        if self.phase < 0:
            self.apply_phase(phase_index(self.phases, self.trainer.current_epoch))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tlkit_phase"] = self.phase

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "tlkit_phase" in checkpoint:  # resume: rebuild the optimizer of the phase that was running
            self.apply_phase(checkpoint["tlkit_phase"])

    # -- optimisation -----------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: per layer group (and head) one with weight decay and one without.

        Every group carries its own explicit lr (0 while frozen), so any PyTorch scheduler honours it.
        """
        scale = self.phases[max(self.phase, 0)].lr_scale
        named = dict(self.backbone.named_parameters())
        layers = [
            (f"group{i}", [named[n] for n in names], trains)
            for i, (names, trains) in enumerate(zip(self.groups, self.trainable_groups()))
        ]
        layers.append(("head", list(self.head.parameters()), True))
        out = []
        for (name, params, trains), lr in zip(layers, self.lrs):
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            effective = lr * scale if trains else 0.0
            out.append({"params": decay, "lr": effective, "weight_decay": self.weight_decay, "name": name, "log": True})
            out.append(
                {"params": no_decay, "lr": effective, "weight_decay": 0.0, "name": f"{name}.no_decay", "log": False}
            )
        return out

    def configure_optimizers(self):
        groups = [g for g in self.parameter_groups() if g["params"]]
        optimizer = adamw(groups)
        epochs = self.trainer.max_epochs or 1
        per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max(1, epochs))
        index = max(self.phase, 0)
        steps = (phase_end(self.phases, index, epochs) - self.phases[index].start) * per_epoch
        if self.schedule == "constant" or steps < MIN_SCHEDULED_STEPS:
            return optimizer
        scheduler: torch.optim.lr_scheduler.LRScheduler
        if self.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.25
            )
        else:
            warmup = max(1, int(0.05 * steps))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, warmup, steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def selection_score(correct: float, loss_sum: float, n: int) -> float:
    """Accuracy minus a tie-break that grows with the mean loss and stays below 1 / (2 n)."""
    loss = loss_sum / n
    return correct / n - loss / (1 + loss) / (2 * n)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW over `groups`, with PyTorch's fused kernel where the parameters' device has one (CPU, CUDA).

    On CPU the default is a Python loop over tensors: a resnet18 step took 100 ms that way, 77 ms with
    foreach and 12 ms fused (same updates, to float rounding).
    """
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = (
        bool(devices) and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    )
    return torch.optim.AdamW(groups, fused=fused or None)
