"""A saved model -> one differentiable torch module from [0, 1] pixels to class scores.

Explanations, attacks and exports need the whole path from pixels to scores in torch: the
normalisation, the backbone, and the head. A fine-tuned run has a torch head already; a baseline
on backbone features has an sklearn pipeline, which is linear after a normalisation, so it becomes
an equivalent torch head (the scores are the same: `tests/test_network.py`). A pixels baseline has
no network, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlkit import augment, bundle
from tlkit.backbone import create_model, feature_width, load_state
from tlkit.errors import TlkitError
from tlkit.images import load_rgb


class SklearnHead(nn.Module):
    """Normalizer(l2) or StandardScaler, then a linear model: an sklearn linear pipeline in torch."""

    def __init__(self, estimator, n_classes: int):
        super().__init__()
        steps = dict(estimator.named_steps) if hasattr(estimator, "named_steps") else {"model": estimator}
        final = list(steps.values())[-1]
        coef, intercept = np.atleast_2d(final.coef_), np.atleast_1d(final.intercept_)
        if coef.shape[0] == 1:  # binary: sklearn keeps one row, for the second class; softmax([0, d]) = sigmoid(d)
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
        weight = np.zeros((n_classes, coef.shape[1]), dtype=np.float32)
        bias = np.zeros(n_classes, dtype=np.float32)
        weight[final.classes_], bias[final.classes_] = coef, intercept
        self.linear = nn.Linear(coef.shape[1], n_classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(weight))
            self.linear.bias.copy_(torch.from_numpy(bias))
        first = list(steps.values())[0]
        self.l2 = type(first).__name__ == "Normalizer"
        scaler = first if hasattr(first, "scale_") else None
        mean = scaler.mean_ if scaler is not None and scaler.mean_ is not None else np.zeros(coef.shape[1])
        scale = scaler.scale_ if scaler is not None and scaler.scale_ is not None else np.ones(coef.shape[1])
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(x, dim=1) if self.l2 else (x - self.mean) / self.scale
        return self.linear(x)


class Network(nn.Module):
    """[0, 1] RGB images (N, 3, H, W) at the model's input size -> class scores (logits, or SVM scores)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean, std):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (N, C, h, w) or tokens (N, T, C), before pooling."""
        return self.backbone.forward_features(self.normalise(x))

    def scores_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_head(features, pre_logits=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores_from_features(self.features(x))


@dataclass
class LoadedModel:
    network: Network
    bundle: bundle.Bundle
    probabilities: bool  # softmax of the scores is a probability (False for an SVM)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    def pixels(self, paths: list[Path]) -> torch.Tensor:
        """Image files -> (N, 3, H, W) float in [0, 1], resized and cropped as in evaluation."""
        side = augment.eval_side(self.bundle.data_config)
        return images_to_tensor([load_rgb(p, side) for p in paths], self.bundle.data_config)

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores, dim=1) if self.probabilities else scores

    @torch.no_grad()
    def tta_probs(self, images: torch.Tensor, *, flip: bool = True, crop: float = 0.875) -> torch.Tensor:
        """Probabilities (SVM: scores) averaged over views: the image, its mirror image (if `flip`), and
        four corner crops of `crop` of each side, resized back to the input size."""
        height, width = images.shape[-2:]
        h, w = max(1, round(height * crop)), max(1, round(width * crop))
        views = [images, *([images.flip(-1)] if flip else [])]
        for top, left in ((0, 0), (0, width - w), (height - h, 0), (height - h, width - w)):
            patch = images[..., top : top + h, left : left + w]
            views.append(torch.nn.functional.interpolate(patch, size=(height, width), mode="bilinear", align_corners=False))
        return torch.stack([self.probs(self.network(v)) for v in views]).mean(0)


def images_to_tensor(images: list[np.ndarray], data_config: dict) -> torch.Tensor:
    sized = [augment.eval_pixels(data_config, image) for image in images]
    return torch.from_numpy(np.stack(sized)).permute(0, 3, 1, 2).float().div(255.0)


def load_network(ref: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """runs:/RUN_ID (or a model folder) of a pretrain, finetune or backbone baseline -> LoadedModel, eval mode."""
    folder, saved = bundle.fetch_bundle(ref, tracking_uri=tracking_uri)
    if saved.features != "backbone":
        raise TlkitError(f"{ref} is a pixels baseline: it has no network to explain, attack or export; use a finetune run or a backbone baseline")
    backbone = create_model(saved.model_name, img_size=int(saved.data_config["input_size"][-1]))
    load_state(backbone, bundle.backbone_state(folder), source=ref, name=saved.model_name)
    n_classes = len(saved.classes)
    probabilities = True
    if saved.kind == "baseline":
        estimator = bundle.load_estimator(folder)
        head = SklearnHead(estimator, n_classes)
        probabilities = hasattr(estimator, "predict_proba")
    else:
        head = nn.Linear(feature_width(backbone), n_classes)
        head.load_state_dict(bundle.head_state(folder))
    network = Network(backbone, head, saved.data_config["mean"], saved.data_config["std"]).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)  # gradients flow to the input only
    return LoadedModel(network, saved, probabilities)
