"""A trained classifier <-> a folder: backbone weights, head, class names, preprocessing.

One self-contained format for every model tlkit trains or fits, logged to MLflow as the run's
`model/` artifact, so `predict`, and `--weights runs:/RUN_ID` in any later stage, need nothing
but the run:

    model/tlkit-model.json    kind, timm model name, data config, classes, how the weights came
    model/backbone.safetensors
    model/head.safetensors    a torch linear head (kind "finetune" / "pretrain"), or
    model/estimator.joblib    a fitted sklearn pipeline (kind "baseline")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tlkit import __version__
from tlkit.errors import TlkitError

BUNDLE_FILE = "tlkit-model.json"
ARTIFACT_PATH = "model"


@dataclass
class Bundle:
    """What a saved model is; the tensors and the estimator live beside it in the folder."""

    kind: str  # "pretrain" | "finetune" | "baseline"
    model_name: str | None  # timm name; None for a pixels baseline
    data_config: dict
    classes: list[str]
    features: str = "backbone"  # "backbone" | "pixels" (baselines only)
    pixel_size: int | None = None
    weights: str = ""  # where the backbone weights came from before this run
    extra: dict[str, Any] = field(default_factory=dict)
    tlkit_version: str = __version__


def save_bundle(
    folder: Path,
    bundle: Bundle,
    *,
    backbone: torch.nn.Module | None = None,
    head: torch.nn.Module | None = None,
    estimator: Any = None,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if backbone is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}, str(folder / "backbone.safetensors"))
    if head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))
    if estimator is not None:
        import joblib

        joblib.dump(estimator, folder / "estimator.joblib")
    (folder / BUNDLE_FILE).write_text(json.dumps(asdict(bundle), indent=1, default=list))
    return folder


def read_bundle(folder: Path) -> Bundle:
    path = Path(folder) / BUNDLE_FILE
    if not path.exists():
        raise TlkitError(f"{folder} holds no {BUNDLE_FILE}; pass a run of `tlkit pretrain`, `finetune` or `baseline`")
    data = json.loads(path.read_text())
    data["data_config"]["input_size"] = tuple(data["data_config"]["input_size"])
    return Bundle(**data)


def backbone_state(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / "backbone.safetensors"
    if not path.exists():
        raise TlkitError(f"{folder} holds no backbone weights (a pixels baseline has none); use a run that trained or used a backbone")
    return load_file(str(path))


def head_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "head.safetensors"))


def load_estimator(folder: Path):
    import joblib

    # joblib is pickle: only load estimators from runs you trust (your own tracking store).
    return joblib.load(Path(folder) / "estimator.joblib")


def fetch_bundle(ref: str, *, tracking_uri: str | None = None) -> tuple[Path, Bundle]:
    """A model reference -> (local folder, Bundle). `ref` is runs:/RUN_ID or a bundle folder."""
    from tlkit import tracking

    if ref.startswith(tracking.RUNS_PREFIX):
        run_id, path = tracking.parse_run_ref(ref)
        folder = tracking.download_artifacts(run_id, path or ARTIFACT_PATH, tracking_uri=tracking_uri)
    else:
        folder = Path(ref)
        if not folder.is_dir():
            raise TlkitError(f"model {ref!r} is neither runs:/RUN_ID nor a model folder; copy the run id from the command's output or `tlkit ui`")
    return folder, read_bundle(folder)
