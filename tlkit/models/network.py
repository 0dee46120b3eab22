"""A saved model -> one torch module from [0, 1] pixels to calibrated class logits, and the images it reads.

Every model tlkit saves loads here, and every path that scores images goes through it: `predict`,
`evaluate`, the served model, explanations, attacks and exports. Preprocessing, precision (float32)
and the head are the same on every path, so one image gets one answer wherever it is asked.

- a fine-tune, or a baseline on backbone features: the timm backbone, then its `LinearHead`;
- a baseline on every stage's features (`--layers all`): the timm backbone read by `MultiLayer`, then its head;
- a pixels baseline: the image itself, resized to `pixel_size` squared and flattened, then its head;
- an ensemble (a fine-tune and its frozen probe, tlkit.train.choice): the networks of the model folder and of its
  member folders, their calibrated probabilities averaged (`Ensemble`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from torch import nn

from tlkit.data import recipe
from tlkit.data.images import load_rgb
from tlkit.errors import TlkitError
from tlkit.models import bundle
from tlkit.models.backbone import create_model, load_state
from tlkit.models.heads import LinearHead
from tlkit.models.multilayer import LAYERS, MultiLayer

ImageSource = str | os.PathLike | IO[bytes]


class Pixels(nn.Module):
    """A pixels baseline's 'backbone': the image is its own feature map; pooled features are its pixels in
    (height, width, channel) order, as `features.pixels_of` lays them out."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Network(nn.Module):
    """[0, 1] RGB images (N, 3, H, W) at the model's input size -> calibrated logits (softmax: probabilities)."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor
    head: Any  # a LinearHead (models/heads.py)
    backbone: Any  # a timm model (forward_features, forward_head: timm's contract), or Pixels

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


class Ensemble(nn.Module):
    """Networks of one input whose calibrated class probabilities are averaged with equal weights: [0, 1] images ->
    the log of the mean probabilities, so that softmax of its output is that mean, as for one Network."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def mean(self) -> torch.Tensor:
        return members_of(self)[0].mean

    @property
    def std(self) -> torch.Tensor:
        return members_of(self)[0].std

    @staticmethod
    def combine(scores: Sequence[torch.Tensor]) -> torch.Tensor:
        """The members' calibrated logits -> the log of their mean probabilities."""
        probs = torch.stack([torch.softmax(s.float(), dim=1) for s in scores]).mean(0)
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine([member(x) for member in self.members])


def members_of(network: nn.Module) -> list[Network]:
    """The networks a model runs: an ensemble's members, or the network itself."""
    return cast(list[Network], list(network.members) if isinstance(network, Ensemble) else [network])


@dataclass
class LoadedModel:
    network: Network | Ensemble
    bundle: bundle.Bundle

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def is_pixels(self) -> bool:
        return self.bundle.features == "pixels"

    @property
    def recipe(self) -> dict:
        """From an image file to the network's input, step by step (tlkit.data.recipe; an export's sidecar holds it)."""
        pixel_size = int(self.bundle.pixel_size or 0) if self.is_pixels else None
        return recipe.preprocessing(self.bundle.data_config, pixel_size=pixel_size)

    @property
    def decode_side(self) -> int | None:
        """The shorter side images are decoded at (JPEGs at reduced size), as in training; None: whole."""
        return None if self.is_pixels else recipe.eval_side(self.bundle.data_config)

    def decode(self, source: ImageSource, *, formats: tuple[str, ...] | None = None) -> np.ndarray:
        """An image file (or an open file of image bytes) -> HxWx3 uint8, decoded as the model's training data was."""
        return load_rgb(source, self.decode_side, formats=formats)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """A decoded image -> HxWx3 uint8 at the model's input size: resize and centre crop (a pixels baseline:
        resized to its square, as `features.pixels_of`)."""
        return recipe.prepare(image, self.recipe)

    def pixels(self, images: Sequence[ImageSource | np.ndarray | Any]) -> torch.Tensor:
        """Image files, open files of image bytes, PIL images or decoded HxWx3 uint8 arrays -> (N, 3, H, W) float in
        [0, 1], as the network reads them (an image given decoded is reduced as a decoded file is)."""
        from concurrent.futures import ThreadPoolExecutor

        from tlkit.core.runtime import cpu_share

        steps = self.recipe

        def one(item):
            return recipe.prepare(recipe.decoded(item, steps), steps)

        if len(images) > 1:  # Pillow decodes without the GIL
            with ThreadPoolExecutor(max_workers=min(8, cpu_share())) as pool:
                prepared = list(pool.map(one, images))
        else:
            prepared = [one(item) for item in images]
        return torch.from_numpy(np.stack(prepared)).permute(0, 3, 1, 2).float().div(255.0)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    @torch.inference_mode()
    def predict_proba(self, images: Sequence[ImageSource | np.ndarray | Any], *, batch_size: int = 64) -> np.ndarray:
        """(n_images, n_classes) calibrated class probabilities, in float32 on the CPU."""
        out = [
            self.probs(self.network(self.pixels(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict(self, images: Sequence[ImageSource | np.ndarray | Any]) -> list[str]:
        """The most probable class of each image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(axis=1)]

    @torch.no_grad()
    def tta_probs(self, images: torch.Tensor, *, flip: bool = True, crop: float = 0.875) -> torch.Tensor:
        """Probabilities averaged over views: the image, its mirror image (if `flip`), and four corner crops
        of `crop` of each side, resized back to the input size."""
        height, width = images.shape[-2:]
        h, w = max(1, round(height * crop)), max(1, round(width * crop))
        views = [images, *([images.flip(-1)] if flip else [])]
        for top, left in ((0, 0), (0, width - w), (height - h, 0), (height - h, width - w)):
            patch = images[..., top : top + h, left : left + w]
            views.append(
                torch.nn.functional.interpolate(patch, size=(height, width), mode="bilinear", align_corners=False)
            )
        return torch.stack([self.probs(self.network(v)) for v in views]).mean(0)


def load_model(ref: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """runs:/RUN_ID (or a model folder) of any baseline, pretrain or finetune -> LoadedModel, eval mode, float32, CPU.

    Reads tensors and JSON only (bundle.load_head refuses pickles)."""
    folder, saved = bundle.fetch_bundle(ref, tracking_uri=tracking_uri)
    network: Network | Ensemble = _network(folder, saved, ref)
    if saved.members:
        members = [network]
        for name in saved.members:
            member = bundle.read_bundle(Path(folder) / name)
            if member.classes != saved.classes or member.data_config != saved.data_config:
                raise TlkitError(
                    f"{Path(folder).name}/{name} names other classes or another input than its ensemble; the model "
                    "folder is damaged: save the model again"
                )
            members.append(_network(Path(folder) / name, member, ref))
        network = Ensemble(members).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)  # gradients flow to the input only
    return LoadedModel(network, saved)


def _network(folder: Path, saved: bundle.Bundle, ref: str) -> Network:
    """One model folder's network, eval mode, float32, CPU."""
    head: LinearHead = bundle.load_head(folder, saved)
    if saved.features == "pixels":
        backbone: nn.Module = Pixels()
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        name = str(saved.model_name)  # a folder that is not a pixels baseline names its backbone (bundle.read)
        backbone = create_model(name, img_size=int(saved.data_config["input_size"][-1]))
        load_state(backbone, bundle.backbone_state(folder), source=ref, name=name)
        if saved.layers not in LAYERS:
            raise TlkitError(
                f"{Path(folder).name}: its head reads layers {saved.layers!r}, which this tlkit does not know; the "
                "model folder is from a newer tlkit: upgrade tlkit"
            )
        if saved.layers == "all":
            backbone = MultiLayer(backbone, name)
        mean, std = saved.data_config["mean"], saved.data_config["std"]
    expected = head.linear.in_features
    network = Network(backbone, head, mean, std).eval()
    blank = torch.zeros(1, *saved.data_config["input_size"])
    with torch.no_grad():
        width = network.backbone.forward_head(network.features(blank), pre_logits=True).shape[1]
    if width != expected or head.linear.out_features != len(saved.classes):
        raise TlkitError(
            f"{Path(folder).name}: the head expects {expected} features and {head.linear.out_features} classes, the "
            f"model gives {width} and names {len(saved.classes)}; the model folder is damaged: save the model again"
        )
    return network
