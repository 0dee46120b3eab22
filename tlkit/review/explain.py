"""Where does the network look? Saliency, Grad-CAM and occlusion maps, and first-layer filters.

Every method takes a `Network` (pixels in [0, 1] -> class scores) and images (N, 3, H, W), and
returns one (H, W) map per image, larger where the class score depends more on that place.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from tlkit.config import ExplainMethod
from tlkit.core.files import printable
from tlkit.core.metrics import plt
from tlkit.errors import TlkitError
from tlkit.models.network import Ensemble, Network, members_of

METHODS: tuple[str, ...] = get_args(ExplainMethod)


SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_NOISE = 0.15  # of the [0, 1] pixel range: Smilkov et al. found 10-20 % gives the clearest maps
CAM_MIN_SIDE = 6  # Grad-CAM on the deepest stage whose map has at least this many cells a side


def saliency(
    network: Network | Ensemble,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    samples: int = SMOOTHGRAD_SAMPLES,
    noise: float = SMOOTHGRAD_NOISE,
    seed: int = 0,
) -> np.ndarray:
    """SmoothGrad (Smilkov et al. 2017): |d score_target / d pixel| averaged over `samples` copies of the image with
    Gaussian noise, max over colour channels, then blurred a little. A single gradient (Simonyan et al. 2014) is
    speckled noise on photos; averaging keeps what is there in every copy. Scores are logits, not softmax."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(images.shape[0], *images.shape[-2:])
    for _ in range(samples):
        x = (images + noise * torch.randn(images.shape, generator=generator)).requires_grad_(True)
        network(x).gather(1, targets[:, None]).sum().backward()
        assert x.grad is not None  # x requires grad and the scores depend on it
        total += x.grad.abs().amax(dim=1)
    return _blur(total / samples, sigma=max(images.shape[-2:]) / 150).numpy()


def _blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of (N, H, W) maps, separable, edges replicated."""
    if sigma < 0.5:
        return maps
    radius = int(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def _as_grid(features: torch.Tensor, network: Network) -> torch.Tensor:
    """(N, C, h, w) stays; transformer tokens (N, T, C) lose their class/prefix tokens and become (N, C, h, w)."""
    if features.ndim == 4:
        return features
    if features.ndim != 3:
        raise TlkitError(
            f"Grad-CAM needs a feature map or tokens; {type(network.backbone).__name__} gives shape "
            f"{tuple(features.shape)}"
        )
    prefix = int(getattr(network.backbone, "num_prefix_tokens", 0))
    tokens = features[:, prefix:]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise TlkitError(
            f"cannot arrange {tokens.shape[1]} tokens of {type(network.backbone).__name__} in a square grid for "
            "Grad-CAM"
        )
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _cam_stage(network: Network, side: int) -> torch.nn.Module | None:
    """The backbone stage Grad-CAM reads: the deepest one (timm's `feature_info`) whose map is at least
    CAM_MIN_SIDE cells a side. At 224 px that is a CNN's last stage (7 x 7 at stride 32), whose maps, upsampled
    bicubically, sat on the object more often than the stride-16 stage's spotty ones on the hymenoptera photos;
    at 96 px it is the stride-16 stage (6 x 6) rather than a 3 x 3 blob. None for a backbone with a single
    resolution (a vision transformer): its last block's tokens are used."""
    info = getattr(network.backbone, "feature_info", None) or []
    stages = [e for e in info if isinstance(e, dict) and e.get("module") and e.get("reduction")]
    if len({e["reduction"] for e in stages}) < 2:
        return None
    fine = [e for e in stages if side // e["reduction"] >= CAM_MIN_SIDE]
    return network.backbone.get_submodule((fine or stages[:1])[-1]["module"])


def gradcam(network: Network | Ensemble, images: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017): ReLU of a stage's feature channels weighted by their mean gradient,
    upsampled smoothly (bicubic) to the image size. The stage is `_cam_stage`'s; a transformer's last block's
    tokens are arranged in their grid. An ensemble's map is the sum of its members' maps, each from the gradient of
    the ensemble's own score."""
    members = members_of(network)
    side = min(images.shape[-2:])
    stages = [_cam_stage(member, side) for member in members]
    kept: list[torch.Tensor] = []
    if all(stage is not None for stage in stages):

        def keep(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                output.retain_grad()
                kept.append(output)

        handles = [stage.register_forward_hook(keep) for stage in stages if stage is not None]
        try:
            scores = network(images.clone().requires_grad_(True))  # a graph even when every weight is frozen
            scores.gather(1, targets[:, None]).sum().backward()
        finally:
            for handle in handles:
                handle.remove()
    if len(kept) == len(members):
        maps = [(grid, grid.grad) for grid in kept]
    else:
        features = [member.features(images).detach().requires_grad_(True) for member in members]
        member_scores = [member.scores_from_features(f) for member, f in zip(members, features)]
        scores = member_scores[0] if len(members) == 1 else Ensemble.combine(member_scores)
        scores.gather(1, targets[:, None]).sum().backward()
        maps = []
        for member, f in zip(members, features):
            assert f.grad is not None  # the features require grad and the scores depend on them
            maps.append((_as_grid(f, member), _as_grid(f.grad, member)))
    cam = torch.zeros(images.shape[0], 1, *images.shape[-2:])
    for grid, grads in maps:
        assert grads is not None  # retain_grad above
        weights = grads.mean(dim=(2, 3), keepdim=True)
        one = F.relu((weights * grid).sum(dim=1, keepdim=True))
        cam += F.interpolate(one, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp_min(0)
    return cam[:, 0].detach().numpy()


@torch.no_grad()
def occlusion(
    network: Network | Ensemble,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    patch: int = 8,
    stride: int = 4,
    batch_size: int = 64,
) -> np.ndarray:
    """Occlusion sensitivity (Zeiler & Fergus 2014): the drop of the target's probability when a grey
    patch covers each place, averaged over the patches that cover a pixel. Batched."""
    n, _, height, width = images.shape
    if patch < 1 or stride < 1 or patch > min(height, width):
        raise TlkitError(
            f"--patch must be between 1 and the input size {min(height, width)}, and --stride at least 1; got "
            f"{patch}, {stride}"
        )

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(network(x), dim=1).gather(1, t[:, None])[:, 0]

    tops = list(range(0, height - patch + 1, stride))
    lefts = list(range(0, width - patch + 1, stride))
    if tops[-1] != height - patch:
        tops.append(height - patch)
    if lefts[-1] != width - patch:
        lefts.append(width - patch)
    places = [(top, left) for top in tops for left in lefts]
    maps = np.zeros((n, height, width))
    for i in range(n):
        base = score(images[i : i + 1], targets[i : i + 1]).item()
        drop, count = np.zeros((height, width)), np.zeros((height, width))
        for start in range(0, len(places), batch_size):
            chunk = places[start : start + batch_size]
            batch = images[i : i + 1].repeat(len(chunk), 1, 1, 1)
            for j, (top, left) in enumerate(chunk):
                batch[j, :, top : top + patch, left : left + patch] = 0.5
            values = score(batch, targets[i].repeat(len(chunk))).numpy()
            for (top, left), value in zip(chunk, values):
                drop[top : top + patch, left : left + patch] += base - value
                count[top : top + patch, left : left + patch] += 1
        maps[i] = drop / np.maximum(count, 1)
    return maps


def explain(
    network: Network | Ensemble, images: torch.Tensor, targets: torch.Tensor, method: str, **options
) -> np.ndarray:
    if method == "saliency":
        return saliency(network, images, targets)
    if method == "gradcam":
        return gradcam(network, images, targets)
    if method == "occlusion":
        return occlusion(network, images, targets, **options)
    raise TlkitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


TITLES = {"saliency": "SmoothGrad saliency", "gradcam": "Grad-CAM", "occlusion": "occlusion: probability drop"}


def normalised(heat: np.ndarray) -> np.ndarray:
    """The map's positive part in [0, 1], scaled by its 99.5th percentile: a few extreme pixels do not wash out the
    rest."""
    positive = np.clip(heat, 0, None)
    scale = float(np.percentile(positive, 99.5)) or float(positive.max()) or 1.0
    return np.clip(positive / scale, 0, 1)


def _overlay(axis, image: np.ndarray, heat: np.ndarray) -> None:
    """The map over the image in a colour map, opaque where it is high and clear where it is low: the image stays
    visible."""
    from matplotlib import colormaps

    level = normalised(heat)
    colours = colormaps["turbo"](level)
    colours[..., 3] = 0.7 * level**0.8
    axis.imshow(image)
    axis.imshow(colours, interpolation="bilinear")


def explanation_figure(image: np.ndarray, heat: np.ndarray, title: str, method: str):
    """The image, its map, and the map over the image, side by side."""
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.4), dpi=100)
    axes[0].imshow(image)
    axes[0].set_title(printable(title), fontsize=9)
    if method == "occlusion":  # signed: covering a place can also raise the probability
        limit = float(np.abs(heat).max()) or 1.0
        shown = axes[1].imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit)
    else:
        shown = axes[1].imshow(normalised(heat), cmap="turbo", vmin=0, vmax=1)
    axes[1].set_title(TITLES[method], fontsize=9)
    figure.colorbar(shown, ax=axes[1], fraction=0.046)
    _overlay(axes[2], image, heat)
    axes[2].set_title("overlay", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    return figure


def grid_columns(n: int, most: int = 4) -> int:
    """Pairs per row for `n` explanations: as many as fit (at most `most`), leaving the fewest empty places."""
    if n <= most:
        return max(n, 1)
    return min(range(most, 2, -1), key=lambda c: (-n % c, -c))


def overview_figure(images: list[np.ndarray], heats: list[np.ndarray], titles: list[str], method: str):
    """Many explanations on one page: each image beside its map over the image, in a grid without empty columns."""
    columns = grid_columns(len(images))
    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(
        rows, 2 * columns, figsize=(2 * columns * 1.6, rows * 1.8 + 0.2), dpi=110, squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for k, (image, heat, title) in enumerate(zip(images, heats, titles)):
        left, right = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
        left.imshow(image)
        left.set_title(printable(title), fontsize=6)
        _overlay(right, image, heat)
        right.set_title(TITLES[method], fontsize=6)
    figure.tight_layout(pad=0.3, w_pad=0.2, h_pad=0.4)
    return figure


def first_conv_filters(model: torch.nn.Module) -> torch.Tensor:
    """Weights (out, 3, k, k) of the first convolution that reads the RGB image."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            return module.weight.detach().float().cpu()
    raise TlkitError(f"{type(model).__name__} has no convolution over the 3 input channels to draw")


def filters_figure(weights: torch.Tensor, title: str, *, max_filters: int = 64):
    """Each filter scaled to [0, 1] on its own and shown as a small RGB image, in a grid."""
    weights = weights[:max_filters]
    columns = int(np.ceil(np.sqrt(len(weights))))
    rows = int(np.ceil(len(weights) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9 + 0.4), dpi=120, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, w in zip(axes.flat, weights):
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)
        axis.imshow(w.permute(1, 2, 0).numpy(), interpolation="nearest")
    figure.suptitle(printable(title), fontsize=9)
    figure.tight_layout()
    return figure
