"""A trained classifier <-> a folder: backbone weights, head, class names, preprocessing.

One self-contained format for every model tlkit trains or fits, logged to MLflow as the run's
`model/` artifact, so `predict`, and `--weights runs:/RUN_ID` in any later stage, need nothing
but the run:

    tlkit-model.json    kind, timm model name, data config, classes, how the weights came, the layers the head
                        reads, the head's normalisation and how its temperature was fitted
    backbone.safetensors  (none for a pixels baseline)
    head.safetensors    the head (tlkit.models.heads.LinearHead): linear weights, normalisation, temperature
    probe/              an ensemble's other network (`members`), a model folder of its own: the model's class
                        probabilities are the average of its and this folder's network's

Nothing in it is a pickle: a model folder from anywhere is read as tensors and JSON, and runs no code.
(tlkit 0.1 saved baselines as `estimator.joblib`, a pickle; such a folder is refused, see `load_head`.)

In a run, these files sit in `model/artifacts/bundle/`, and `model/` is also an MLflow pyfunc
model (see tracking.log_model), so `mlflow models serve -m runs:/RUN_ID/model` serves it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlkit import __version__
from tlkit.errors import TlkitError

if TYPE_CHECKING:
    import torch

    from tlkit.models.heads import LinearHead

BUNDLE_FILE = "tlkit-model.json"
ARTIFACT_PATH = "model"
PYFUNC_BUNDLE = Path("artifacts") / "bundle"  # where a pyfunc model folder keeps the bundle
PROBE_MEMBER = "probe"  # the subfolder of a fine-tune's ensemble that holds its frozen probe


@dataclass
class Bundle:
    """What a saved model is; the tensors and the estimator live beside it in the folder."""

    kind: str  # "pretrain" | "finetune" | "baseline"
    model_name: str | None  # timm name; None for a pixels baseline
    data_config: dict
    classes: list[str]
    features: str = "backbone"  # "backbone" | "pixels" (baselines only)
    layers: str = "last"  # "last" | "all": the backbone's layers its head reads (tlkit.models.multilayer)
    pixel_size: int | None = None
    weights: str = ""  # where the backbone weights came from before this run
    head: dict[str, Any] = field(default_factory=lambda: {"norm": "none"})  # norm, and how the temperature was fitted
    extra: dict[str, Any] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)  # subfolders of networks averaged with this one (an ensemble)
    tlkit_version: str = __version__


def save_bundle(
    folder: Path,
    bundle: Bundle,
    *,
    backbone: torch.nn.Module | None = None,
    head: LinearHead,
    members: dict[str, tuple[Bundle, torch.nn.Module | None, LinearHead]] | None = None,
) -> Path:
    """Write the model into `folder`; `bundle.head["norm"]` is taken from `head`. `members`: an ensemble's other
    networks by subfolder name, (bundle, backbone, head) each, written as model folders of their own."""
    from safetensors.torch import save_file

    from tlkit.models import heads

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (member, member_backbone, member_head) in (members or {}).items():
        save_bundle(folder / name, member, backbone=member_backbone, head=member_head)
    bundle.members = list(members or {})
    if backbone is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()},
            str(folder / "backbone.safetensors"),
        )
    save_file(heads.state(head), str(folder / "head.safetensors"))
    bundle.head = {**bundle.head, "norm": head.norm, "temperature": float(head.temperature)}
    data = asdict(bundle)
    if data["layers"] == "last":  # written only where it matters: tlkit 0.8 reads a last-layer folder of this one
        del data["layers"]
    (folder / BUNDLE_FILE).write_text(json.dumps(data, indent=1, default=list))
    return folder


def bundle_folder(folder: Path) -> Path:
    """The folder holding tlkit-model.json: `folder` itself, or the bundle inside a pyfunc model folder."""
    folder = Path(folder)
    return (
        folder / PYFUNC_BUNDLE
        if not (folder / BUNDLE_FILE).exists() and (folder / PYFUNC_BUNDLE / BUNDLE_FILE).exists()
        else folder
    )


def read_bundle(folder: Path) -> Bundle:
    path = Path(folder) / BUNDLE_FILE
    if not path.exists():
        raise TlkitError(f"{folder} holds no {BUNDLE_FILE}; pass a run of `tlkit pretrain`, `finetune` or `baseline`")
    try:
        data = json.loads(path.read_text())
        data["data_config"]["input_size"] = tuple(data["data_config"]["input_size"])
        return Bundle(**data)
    except (ValueError, KeyError, TypeError) as err:
        raise TlkitError(f"{path} is damaged ({err}); save the model again") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise TlkitError(
            f"{path.name} in {path.parent} is damaged ({str(err).splitlines()[0]}); save the model again"
        ) from None


def backbone_state(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / "backbone.safetensors"
    if not path.exists():
        raise TlkitError(
            f"the model folder {folder} lacks backbone.safetensors, which its model needs; it is incomplete: "
            "use the run's model as saved (runs:/RUN_ID), or save the model again"
        )
    return _tensors(path)


def load_head(folder: Path, saved: Bundle) -> LinearHead:
    """The model's head, from tensors. A pickled scikit-learn estimator (tlkit 0.1's baselines) is never loaded."""
    from tlkit.models import heads

    path = Path(folder) / "head.safetensors"
    if not path.exists():
        if (Path(folder) / "estimator.joblib").exists():
            raise TlkitError(
                f"{folder} holds estimator.joblib, a pickle from tlkit 0.1, which tlkit does not load (unpickling can "
                "run any code); fit the baseline again with this tlkit (`tlkit baseline DATA ...`, seconds from "
                "cached features) and use the new run"
            )
        raise TlkitError(f"{folder} holds no head.safetensors; the model folder is incomplete: save the model again")
    return heads.from_state(_tensors(path), saved.head.get("norm", "none"))


def fetch_bundle(ref: str, *, tracking_uri: str | None = None) -> tuple[Path, Bundle]:
    """A model reference -> (local folder, Bundle). `ref` is runs:/RUN_ID or a bundle folder."""
    from tlkit.core import tracking

    if ref.startswith(tracking.RUNS_PREFIX):
        run_id, path = tracking.parse_run_ref(ref)
        folder = tracking.download_artifacts(run_id, path or ARTIFACT_PATH, tracking_uri=tracking_uri)
    else:
        folder = Path(ref)
        if not folder.is_dir():
            raise TlkitError(
                f"model {ref!r} is neither runs:/RUN_ID nor a model folder; copy the run id from the command's output "
                "or `tlkit ui`"
            )
    folder = bundle_folder(folder)
    return folder, read_bundle(folder)
