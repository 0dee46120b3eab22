"""A saved model -> files that run without tlkit: ONNX, TorchScript or safetensors, plus a JSON sidecar.

The exported network takes normalised images and returns class scores: float32 (N, 3, H, W), RGB
scaled to [0, 1], then (x - mean) / std, after resizing the short side to size / crop_pct and a
centre crop. The sidecar (`<name>.json`) says all of that: classes, input size, mean, std,
interpolation, crop_pct, and whether softmax of the output is a probability.

Fine-tuned models and logistic-regression baselines become timm's own layout (the head folded into
the model's classifier), so the safetensors file loads with `timm.create_model(model, num_classes=N)`.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from tlkit import __version__
from tlkit.errors import TlkitError
from tlkit.network import LoadedModel, SklearnHead

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}


class _Scores(nn.Module):
    """Backbone + any head, from normalised input (for heads timm's classifier cannot hold)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _as_linear(head: nn.Module) -> nn.Linear | None:
    """The head as one Linear layer when it is one (a StandardScaler folds into the weights), else None."""
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, SklearnHead) and not head.l2:
        weight = head.linear.weight / head.scale
        bias = head.linear.bias - weight @ head.mean
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        return linear
    return None


def export_module(loaded: LoadedModel, *, timm_layout: bool = False) -> nn.Module:
    """Normalised images -> scores, as one module; timm's layout where the head allows it."""
    backbone = copy.deepcopy(loaded.network.backbone).eval()
    linear = _as_linear(loaded.network.head)
    if linear is None:
        if timm_layout:
            raise TlkitError("this SVM baseline L2-normalises features before its linear layer, which timm's classifier "
                             "cannot hold; export it as --format onnx or torchscript")
        return _Scores(backbone, copy.deepcopy(loaded.network.head)).eval()
    backbone.reset_classifier(len(loaded.classes))  # timm's contract: a fresh classifier of the right size
    classifier = backbone.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(linear.weight)
        classifier.bias.copy_(linear.bias)
    return backbone.eval()


def sidecar(loaded: LoadedModel, fmt: str, source: str) -> dict:
    config = loaded.bundle.data_config
    return {
        "format": fmt,
        "model": loaded.bundle.model_name,
        "classes": loaded.classes,
        "input_size": list(config["input_size"]),
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "interpolation": config.get("interpolation", "bilinear"),
        "crop_pct": config.get("crop_pct", 1.0),
        "preprocess": "RGB; resize the short side to input_size / crop_pct with `interpolation`; centre crop to input_size; "
                      "scale to [0, 1]; subtract mean, divide by std; float32 NCHW",
        "output": "logits: softmax gives class probabilities" if loaded.probabilities else "SVM decision scores (argmax is the class; not probabilities)",
        "softmax_is_probability": loaded.probabilities,
        "source": source,
        "tlkit_version": __version__,
    }


def export(loaded: LoadedModel, fmt: str, out: Path, *, source: str, check: bool = True) -> dict:
    """Write the network in `fmt` and its sidecar into `out`; returns paths and the check's max |difference|."""
    if fmt not in FORMATS:
        raise TlkitError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (loaded.bundle.model_name or "model").replace("/", "_")
    path = out / f"{stem}{SUFFIX[fmt]}"
    module = export_module(loaded, timm_layout=fmt == "safetensors")
    example = torch.rand(2, *loaded.bundle.data_config["input_size"])
    example = (example - loaded.network.mean) / loaded.network.std
    with torch.no_grad():
        expected = module(example).numpy()
    if fmt == "safetensors":
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
        difference = None
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; it still runs anywhere libtorch does
            traced = torch.jit.trace(module, example)
            traced.save(str(path))
            difference = float(np.abs(torch.jit.load(str(path))(example).detach().numpy() - expected).max()) if check else None
    else:
        difference = _export_onnx(module, example, path, expected, check)
    info = path.with_suffix(".json")
    info.write_text(json.dumps(sidecar(loaded, fmt, source), indent=1))
    return {"model": path, "sidecar": info, "max_abs_difference": difference}


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, expected: np.ndarray, check: bool) -> float | None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise TlkitError("ONNX export needs the onnx and onnxscript packages: pip install 'tlkit[export]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["scores"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", max=4096)}}, dynamo=True, external_data=False, verbose=False)
    if not check:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})[0]
    return float(np.abs(got - expected).max())
