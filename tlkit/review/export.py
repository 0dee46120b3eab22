"""A saved model -> files that run without tlkit: ONNX, TorchScript or safetensors, plus a JSON sidecar.

The exported network takes normalised images: float32 (N, 3, H, W), RGB scaled to [0, 1], then
(x - mean) / std, after resizing the short side to size / crop_pct and a centre crop (a pixels
baseline: resized to its square). ONNX and TorchScript return the model's calibrated class
probabilities (N, n_classes), the numbers `tlkit predict` gives; the export fails if they differ from
PyTorch's by more than TOLERANCE on a test batch. The sidecar (`<name>.json`) says all of that.

Fine-tuned models and logistic-regression baselines also export as timm's own layout (safetensors:
the head and its temperature folded into the model's classifier), which loads with
`timm.create_model(model, num_classes=N)` and returns logits whose softmax is the probabilities.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from tlkit import __version__
from tlkit.config import ExportFormat
from tlkit.core.files import replacing, write_bytes
from tlkit.errors import TlkitError
from tlkit.models.network import Ensemble, LoadedModel, members_of

FORMATS: tuple[str, ...] = get_args(ExportFormat)
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
TOLERANCE = 1e-4  # largest difference allowed between the exported model's probabilities and PyTorch's


class _Logits(nn.Module):
    """Backbone + head, from normalised input (for heads timm's classifier cannot hold)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class _Probabilities(nn.Module):
    def __init__(self, logits: nn.Module):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def export_module(loaded: LoadedModel, *, timm_layout: bool = False) -> nn.Module:
    """Normalised images -> calibrated logits, as one module; timm's layout where the head allows it. An ensemble:
    its members' logits, combined as `Ensemble` combines them (the log of the mean probabilities)."""
    if isinstance(loaded.network, Ensemble):
        if timm_layout:
            raise TlkitError(
                "this model is an ensemble of two networks (the fine-tune and its frozen probe), which one timm "
                "model cannot hold; export it as --format onnx or torchscript"
            )
        return Ensemble(
            [_Logits(copy.deepcopy(m.backbone), copy.deepcopy(m.head)) for m in members_of(loaded.network)]
        ).eval()
    backbone: Any = copy.deepcopy(loaded.network.backbone).eval()  # timm's contract: reset_classifier, get_classifier
    linear = loaded.network.head.as_linear()
    if timm_layout and loaded.is_pixels:
        raise TlkitError(
            "a pixels baseline has no timm model to hold its weights; export it as --format onnx or torchscript"
        )
    if timm_layout and loaded.bundle.layers != "last":
        raise TlkitError(
            "this probe reads every stage of its backbone, not only the last layer that timm's classifier sits on; "
            "export it as --format onnx or torchscript"
        )
    if linear is None or not timm_layout:
        if timm_layout:
            raise TlkitError(
                "this SVM baseline L2-normalises features before its linear layer, which timm's classifier "
                "cannot hold; export it as --format onnx or torchscript"
            )
        return _Logits(backbone, copy.deepcopy(loaded.network.head)).eval()
    backbone.reset_classifier(len(loaded.classes))  # timm's contract: a fresh classifier of the right size
    classifier = backbone.get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(linear.weight)
        classifier.bias.copy_(linear.bias)
    return backbone.eval()


def sidecar(loaded: LoadedModel, fmt: str, source: str) -> dict:
    config = loaded.bundle.data_config
    pixels = loaded.is_pixels
    temperatures = [float(m.head.temperature) for m in members_of(loaded.network)]
    return {
        "format": fmt,
        "model": loaded.bundle.model_name or f"pixels-{loaded.bundle.pixel_size}",
        "classes": loaded.classes,
        "input_size": list(config["input_size"]),
        "mean": [0.0, 0.0, 0.0] if pixels else list(config["mean"]),
        "std": [1.0, 1.0, 1.0] if pixels else list(config["std"]),
        "interpolation": "bilinear" if pixels else config.get("interpolation", "bilinear"),
        "crop_pct": 1.0 if pixels else config.get("crop_pct", 1.0),
        "preprocess": (
            "RGB; resize to input_size, aspect not kept (Pillow bilinear); scale to [0, 1]; float32 NCHW"
            if pixels
            else "RGB; resize the short side to input_size / crop_pct with `interpolation`; centre crop to input_size; "
            "scale to [0, 1]; subtract mean, divide by std; float32 NCHW"
        ),
        "output": (
            "logits: softmax gives the calibrated class probabilities"
            if fmt == "safetensors"
            else "calibrated class probabilities (N, n_classes), the same as `tlkit predict`"
        ),
        # every step from an image file to `input`, with the library that does it (tlkit.data.recipe):
        # examples/onnx_predict.py reproduces `tlkit predict` from it with Pillow, NumPy, OpenCV and onnxruntime
        "preprocessing": loaded.recipe,
        # an ensemble's: one per member, in the order of the bundle (the fine-tune, then its probe)
        "temperature": temperatures[0] if len(temperatures) == 1 else temperatures,
        "source": source,
        "tlkit_version": __version__,
    }


def export(loaded: LoadedModel, fmt: str, out: Path, *, source: str, check: bool = True, force: bool = False) -> dict:
    """Write the network in `fmt` and its sidecar into `out`; returns paths and the check's max |difference|.

    An existing model file is replaced only with `force`."""
    if fmt not in FORMATS:
        raise TlkitError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (loaded.bundle.model_name or f"pixels-{loaded.bundle.pixel_size}").replace("/", "_")
    path = out / f"{stem}{SUFFIX[fmt]}"
    if path.exists() and not force:
        raise TlkitError(
            f"{path} exists; pass --force (in a pipeline, force: true) to overwrite it, or choose another --out"
        )
    module = export_module(loaded, timm_layout=fmt == "safetensors")
    if fmt != "safetensors":
        module = _Probabilities(module).eval()
    example = torch.rand(2, *loaded.bundle.data_config["input_size"])
    example = (example - loaded.network.mean) / loaded.network.std
    with torch.no_grad():
        expected = module(example).numpy()
    # written beside, renamed once written and checked: a crash or a failed check leaves the old file whole
    with replacing(path) as partial:
        if fmt == "safetensors":
            config = loaded.bundle.data_config  # the preprocessing travels with the weights: --weights FILE reads it
            preprocessing = {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in config.items()
                if k in ("mean", "std", "interpolation", "crop_pct")
            }
            save_file(
                {k: v.detach().contiguous() for k, v in module.state_dict().items()},
                str(partial),
                metadata={"tlkit.preprocessing": json.dumps(preprocessing)},
            )
            difference = None
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                # torch.jit is deprecated in favour of torch.export; it still runs anywhere libtorch does
                warnings.simplefilter("ignore")
                torch.jit.trace(module, example).save(str(partial))
                difference = (
                    float(np.abs(torch.jit.load(str(partial))(example).detach().numpy() - expected).max())
                    if check
                    else None
                )
        else:
            difference = _export_onnx(module, example=example, path=partial, expected=expected, check=check)
        if difference is not None and difference > TOLERANCE:
            raise TlkitError(
                f"the {fmt} export's probabilities differ from PyTorch's by {difference:.1e} (> {TOLERANCE:g}) on a "
                "test batch; nothing was written: report it with the model name and the versions of torch and "
                "onnxruntime"
            )
    info = path.with_suffix(".json")
    write_bytes(info, json.dumps(sidecar(loaded, fmt, source), indent=1).encode())
    return {"model": path, "sidecar": info, "max_abs_difference": difference}


def _export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, expected: np.ndarray, check: bool
) -> float | None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise TlkitError("ONNX export needs the onnx and onnxscript packages: pip install 'tlkit[export]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", max=4096)}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if not check:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})[0]
    return float(np.abs(got - expected).max())
