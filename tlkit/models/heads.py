"""Features -> calibrated class logits: the one head every saved tlkit model has.

A fine-tune's linear layer and a fitted scikit-learn linear classifier (SVM, logistic regression,
on backbone features or raw pixels) both become a `LinearHead`: an optional normalisation, a linear
layer and a temperature. softmax of its output is the model's class probabilities, for two classes as
for ten, so predict, evaluate, the served model and every export give the same numbers. It is saved
as tensors (safetensors) and a name, never as a pickle.

Two classes: scikit-learn keeps one decision value d for the second class. The head gives the classes
the logits (-d/2, d/2): softmax of those is sigmoid(d), scikit-learn's own binary probability, and each
class has a score of its own to explain (a zero row would give class 0 no gradient at all).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tlkit.errors import TlkitError

NORMS = ("none", "l2", "standard")


class LinearHead(nn.Module):
    """x -> linear(normalise(x)) / temperature.

    Args:
        weight: (n_classes, n_features); bias: (n_classes,).
        norm: "none", "l2" (unit-length features: the SVM's) or "standard" ((x - mean) / scale: logistic regression's).
        temperature: divides the logits (calibrate.fit_temperature); 1 leaves them as trained.
    """

    mean: torch.Tensor  # buffers (nn.Module's attribute typing cannot tell them from submodules)
    scale: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, weight, bias, *, norm: str = "none", mean=None, scale=None, temperature: float = 1.0):
        super().__init__()
        if norm not in NORMS:
            raise TlkitError(f"unknown head normalisation {norm!r}; the model folder is damaged or from a newer tlkit")
        weight = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
        n_classes, n_features = weight.shape
        self.norm = norm
        self.linear = nn.Linear(n_features, n_classes)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(torch.as_tensor(np.asarray(bias), dtype=torch.float32))
        self.register_buffer(
            "mean", torch.as_tensor(np.zeros(n_features) if mean is None else np.asarray(mean), dtype=torch.float32)
        )
        self.register_buffer(
            "scale", torch.as_tensor(np.ones(n_features) if scale is None else np.asarray(scale), dtype=torch.float32)
        )
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's own scores, before calibration."""
        if self.norm == "l2":
            x = nn.functional.normalize(x, dim=1)
        elif self.norm == "standard":
            x = (x - self.mean) / self.scale
        return self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x) / self.temperature

    def as_linear(self) -> nn.Linear | None:
        """The whole head, temperature included, as one Linear layer (None for "l2", which is not linear)."""
        if self.norm == "l2":
            return None
        weight = self.linear.weight / self.scale
        bias = self.linear.bias - weight @ self.mean
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight / self.temperature)
            linear.bias.copy_(bias / self.temperature)
        return linear

    def numpy_logits(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.logits(torch.as_tensor(np.asarray(X), dtype=torch.float32)).numpy()


def from_linear(linear: nn.Linear, *, temperature: float = 1.0) -> LinearHead:
    """A fine-tune's nn.Linear head."""
    return LinearHead(linear.weight.detach().cpu().numpy(), linear.bias.detach().cpu().numpy(), temperature=temperature)


def from_sklearn(estimator, n_classes: int, *, temperature: float = 1.0) -> LinearHead:
    """A fitted scikit-learn linear model, or a Pipeline of a Normalizer(l2) or StandardScaler and one."""
    steps = list(estimator.named_steps.values()) if hasattr(estimator, "named_steps") else [estimator]
    final, first = steps[-1], steps[0]
    weight, bias = class_rows(np.atleast_2d(final.coef_), np.atleast_1d(final.intercept_), final.classes_, n_classes)
    norm, mean, scale = "none", None, None
    if len(steps) > 1 and type(first).__name__ == "Normalizer":
        norm = "l2"
    elif len(steps) > 1 and hasattr(first, "scale_"):
        norm = "standard"
        mean = first.mean_ if first.mean_ is not None else None
        scale = first.scale_ if first.scale_ is not None else None
    return LinearHead(weight, bias, norm=norm, mean=mean, scale=scale, temperature=temperature)


def class_rows(
    coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's coef_/intercept_ -> one row per class of the dataset (binary: -d/2 and d/2; absent classes: 0)."""
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((n_classes, coef.shape[1]), dtype=np.float32)
    bias = np.zeros(n_classes, dtype=np.float32)
    weight[classes], bias[classes] = coef, intercept
    return weight, bias


def state(head: LinearHead) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}


def from_state(tensors: dict[str, torch.Tensor], norm: str = "none") -> LinearHead:
    """A head from its saved tensors; a fine-tune saved before heads existed holds an nn.Linear's weight and bias."""
    if "weight" in tensors and "linear.weight" not in tensors:
        tensors = {"linear.weight": tensors["weight"], "linear.bias": tensors["bias"]}
    try:
        weight = tensors["linear.weight"]
        head = LinearHead(
            weight.numpy(),
            tensors["linear.bias"].numpy(),
            norm=norm,
            mean=tensors["mean"].numpy() if "mean" in tensors else None,
            scale=tensors["scale"].numpy() if "scale" in tensors else None,
            temperature=float(tensors["temperature"]) if "temperature" in tensors else 1.0,
        )
    except (KeyError, RuntimeError, ValueError) as err:
        raise TlkitError(
            f"the head's tensors are not a tlkit head ({err}); the model folder is damaged: save the model again"
        ) from None
    return head
