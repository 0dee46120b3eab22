"""Where does the network look? Saliency, Grad-CAM and occlusion maps, and first-layer filters.

Every method takes a `Network` (pixels in [0, 1] -> class scores) and images (N, 3, H, W), and
returns one (H, W) map per image, larger where the class score depends more on that place.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tlkit.errors import TlkitError
from tlkit.evaluate import plt
from tlkit.network import Network

METHODS = ("saliency", "gradcam", "occlusion")


def saliency(network: Network, images: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """|d score_target / d pixel|, max over colour channels (Simonyan et al. 2014). Scores are logits, not softmax."""
    x = images.clone().requires_grad_(True)
    scores = network(x)
    scores.gather(1, targets[:, None]).sum().backward()
    return x.grad.abs().amax(dim=1).numpy()


def _as_grid(features: torch.Tensor, network: Network) -> torch.Tensor:
    """(N, C, h, w) stays; transformer tokens (N, T, C) lose their class/prefix tokens and become (N, C, h, w)."""
    if features.ndim == 4:
        return features
    if features.ndim != 3:
        raise TlkitError(f"Grad-CAM needs a feature map or tokens; {type(network.backbone).__name__} gives shape {tuple(features.shape)}")
    prefix = int(getattr(network.backbone, "num_prefix_tokens", 0))
    tokens = features[:, prefix:]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise TlkitError(f"cannot arrange {tokens.shape[1]} tokens of {type(network.backbone).__name__} in a square grid for Grad-CAM")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def gradcam(network: Network, images: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) on the backbone's last feature map (a CNN's last stage, a
    transformer's last block): ReLU of the feature channels weighted by their mean gradient,
    upsampled to the image size."""
    features = network.features(images).detach().requires_grad_(True)
    scores = network.scores_from_features(features)
    scores.gather(1, targets[:, None]).sum().backward()
    grid, grads = _as_grid(features, network), _as_grid(features.grad, network)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * grid).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return cam[:, 0].detach().numpy()


@torch.no_grad()
def occlusion(network: Network, images: torch.Tensor, targets: torch.Tensor, *, patch: int = 8, stride: int = 4,
              batch_size: int = 64) -> np.ndarray:
    """Occlusion sensitivity (Zeiler & Fergus 2014): the drop of the target's probability when a grey
    patch covers each place, averaged over the patches that cover a pixel. Batched."""
    n, _, height, width = images.shape
    if patch < 1 or stride < 1 or patch > min(height, width):
        raise TlkitError(f"--patch must be between 1 and the input size {min(height, width)}, and --stride at least 1; got {patch}, {stride}")

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


def explain(network: Network, images: torch.Tensor, targets: torch.Tensor, method: str, **options) -> np.ndarray:
    if method == "saliency":
        return saliency(network, images, targets)
    if method == "gradcam":
        return gradcam(network, images, targets)
    if method == "occlusion":
        return occlusion(network, images, targets, **options)
    raise TlkitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def explanation_figure(image: np.ndarray, heat: np.ndarray, title: str, method: str):
    """The image, its map, and the map over the image, side by side."""
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.4), dpi=100)
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=9)
    cmap = "RdBu_r" if method == "occlusion" else "inferno"
    limit = float(np.abs(heat).max()) or 1.0
    shown = axes[1].imshow(heat, cmap=cmap, vmin=-limit if method == "occlusion" else 0, vmax=limit)
    axes[1].set_title({"saliency": "saliency |d score / d pixel|", "gradcam": "Grad-CAM",
                       "occlusion": "occlusion: probability drop"}[method], fontsize=9)
    figure.colorbar(shown, ax=axes[1], fraction=0.046)
    axes[2].imshow(image)
    axes[2].imshow(np.clip(heat, 0, None), cmap="inferno", alpha=0.55, vmin=0, vmax=limit)
    axes[2].set_title("overlay", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    return figure


def overview_figure(images: list[np.ndarray], heats: list[np.ndarray], titles: list[str], method: str, *, columns: int = 4):
    """Many explanations on one page: each image beside its map over the image, `columns` pairs a row."""
    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.5, rows * 1.75 + 0.4), dpi=100, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for k, (image, heat, title) in enumerate(zip(images, heats, titles)):
        left, right = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
        left.imshow(image)
        left.set_title(title, fontsize=6)
        right.imshow(image)
        right.imshow(np.clip(heat, 0, None), cmap="inferno", alpha=0.6, vmin=0, vmax=float(np.abs(heat).max()) or 1.0)
        right.set_title(method, fontsize=6)
    figure.tight_layout()
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
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure
