"""A frozen backbone read at every stage: the features of a multi-layer probe (`--layers all`).

Head2Toe (Evci et al., ICML 2022) feeds a linear probe with features pooled from every layer of the frozen backbone,
not only the last: on VTAB-1k that matches full fine-tuning on average, and beats it away from ImageNet, where a
task needs the backbone's lower-level features more than its ImageNet classes. tlkit takes its pooling and
per-layer normalisation without its group-lasso feature selection: each stage that timm lists in `feature_info`
(strides 2 to 32 for a CNN) is averaged over its positions and scaled to unit length, and so are the last layer's
pooled features; the vectors are concatenated (EfficientNet-Lite0: 16 + 24 + 40 + 112 + 320 + 1280 = 1792
features). On the six sets of the transfer suite its SVM scored 0.847 on the mean against the last layer's 0.818,
most on chest X-rays (0.747 against 0.680) and flowers17 (0.861 against 0.817); on the ants-and-bees photos,
ImageNet's own kind of image, 0.915 against 0.935 (bench/multilayer_probe.py, docs/baselines.md).

`MultiLayer` keeps timm's contract that `Network` reads (`forward_features`, then `forward_head(..., pre_logits=True)`;
`forward` is the two): its feature map is the last stage's, with the earlier stages' averages appended as channels of
constant value, which `forward_head` takes apart again, so every path that scores images (predict, the served model,
Grad-CAM, the ONNX and TorchScript exports) runs it as it runs a plain backbone.
"""

from __future__ import annotations

from typing import Any, get_args

import torch
from torch import nn
from torch.nn import functional as F

from tlkit.config import Layers
from tlkit.errors import TlkitError
from tlkit.models.backbone import create_model, feature_width

LAYERS: tuple[str, ...] = get_args(Layers)


def stage_widths(model: nn.Module) -> list[int]:
    """Channels of each stage timm's `feature_info` lists; [] where a model has no stages to read."""
    info = getattr(model, "feature_info", None) or []
    return [int(e["num_chs"]) for e in info if isinstance(e, dict) and "num_chs" in e]


def has_stages(model: nn.Module) -> bool:
    """Whether `model` has stages of different resolutions that timm's `forward_intermediates` returns (a CNN; not a
    vision transformer, whose blocks all have one resolution)."""
    info = getattr(model, "feature_info", None) or []
    reductions = {e.get("reduction") for e in info if isinstance(e, dict)}
    return hasattr(model, "forward_intermediates") and len(reductions) >= 2


def check_multilayer(model: nn.Module, name: str) -> None:
    """A clear error for a backbone whose stages cannot be read (see `has_stages`)."""
    if not has_stages(model):
        raise TlkitError(
            f"{name} has no stages of different resolutions to read, which a multi-layer probe needs (a CNN's); use "
            "--layers last"
        )


def check_stages_of(name: str) -> None:
    """`check_multilayer` from the model's name alone, before anything is loaded or a run starts: the architecture is
    built on the meta device (no memory, no weights; a tenth of a second)."""
    with torch.device("meta"):
        model = create_model(name)
    check_multilayer(model, name)


class MultiLayer(nn.Module):
    """A timm CNN (num_classes=0) -> each stage's average and the last layer's pooled features, each of unit length,
    concatenated (N, num_features)."""

    model: Any  # the timm model (forward_intermediates, forward_head: timm's contract)

    def __init__(self, model: nn.Module, name: str = "the backbone"):
        super().__init__()
        check_multilayer(model, name)
        self.model = model
        self.widths = stage_widths(model)
        self.map_width = int(getattr(model, "num_features"))  # noqa: B009  channels of timm's forward_features
        self.num_features = sum(self.widths) + feature_width(model)
        # Grad-CAM finds the stages here (timm's `feature_info`, module names as this module holds them)
        self.feature_info = [{**e, "module": f"model.{e['module']}"} for e in getattr(model, "feature_info")]  # noqa: B009

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (N, C, h, w), with every stage's average appended as channels of constant value."""
        final, stages = self.model.forward_intermediates(x)
        averages = torch.cat([s.mean(dim=(2, 3)) for s in stages], dim=1)
        return torch.cat([final, averages[:, :, None, None].expand(-1, -1, *final.shape[-2:])], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        last = self.model.forward_head(x[:, : self.map_width], pre_logits=True)
        averages = x[:, self.map_width :, 0, 0].split(self.widths, dim=1)
        return torch.cat([*(F.normalize(a, dim=1) for a in averages), F.normalize(last, dim=1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
