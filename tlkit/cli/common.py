"""What several commands share: argument types, and their settings groups -> the settings models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from tlkit.cli.options import build
from tlkit.errors import TlkitError

DataArg = Annotated[
    str,
    typer.Argument(
        help="Image folder (class folders, or train/ val/ test/), CSV (path,label[,split]) or manifest .json."
    ),
]


Seed = Annotated[int, typer.Option(help="Seed of splits, initialisation and training.")]

ExtractLayers = Annotated[
    Literal["last", "all"],  # tlkit.config.Layers (the CLI is built without importing pydantic)
    typer.Option(
        help="Features to cache: last (the pooled last layer, what `baseline` reads), or all (every stage's average "
        "too, what `baseline --layers all` and a fine-tune's probe read on a CNN)."
    ),
]


NetworkRef = Annotated[
    str, typer.Argument(help="runs:/RUN_ID of a baseline, pretrain or finetune run (or a model folder).")
]


Weights = Annotated[
    str | None,
    typer.Option(help="Weights: a .safetensors / state-dict file, runs:/RUN_ID of a tlkit run, or pkg:NAME."),
]


Resume = Annotated[
    str | None, typer.Option(help="RUN_ID of an interrupted run: continue from its last checkpoint, same run.")
]


# the options of settings groups (tlkit.config's models, see options.py); the command gets each group as a dict
TRAINING: dict[str, Any] = dict(
    backbone="backbone", split="split", compute=("compute", ("-batch_size",)), tracking="tracking"
)


STORE: dict[str, Any] = dict(store=("tracking", ("tracking_uri",)))  # the store alone: no run of its own


EXTRACTING: dict[str, Any] = dict(
    backbone="backbone", split="split", compute=("compute", ("-image_cache_mb",)), tracking="tracking"
)


def require_files(items: list[str]) -> None:
    """A one-line error, without decoding anything, when the paths hold no file at all."""
    for item in items:
        path = Path(item).expanduser()
        if path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*"))):
            return
    raise TlkitError(
        f"no files among the {len(items)} path(s) given ({items[0]}: "
        f"{'empty folder' if Path(items[0]).is_dir() else 'does not exist'}); "
        "pass image files or folders"
    )


def parse_devices(value: str):
    if value == "auto":
        return value
    if value.isdigit():
        return int(value)
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise TlkitError(f"--devices must be auto, a count or a list like 0,1; got {value!r}") from None


def split_settings(values: dict, seed: int):
    return build("SplitConfig", values, seed=seed)


def backbone_settings(values: dict, seed: int):
    if values["model"] is None and not (values["weights"] or "").startswith(("runs:/", "pkg:")):
        raise TlkitError(
            "pass --model NAME (see `tlkit backbone list`), or --weights runs:/RUN_ID to reuse a run's backbone, or "
            "--weights pkg:NAME"
        )
    backbone = build("BackboneConfig", values, seed=seed)
    return backbone.model_copy(update={"pretrained": backbone.pretrained and backbone.weights is None})


def compute_settings(values: dict, **fixed):
    values = dict(values)
    return build("ComputeConfig", values, devices=parse_devices(str(values.pop("devices"))), **fixed)


def run_options(tracking: dict):
    """A command's tracking group -> the RunOptions its stage takes (the experiment is set by `use_tracking`)."""
    from tlkit.runs.stages import RunOptions

    return RunOptions(tracking_uri=tracking["tracking_uri"], run_name=tracking.get("run_name"))


def use_tracking(group: dict, model: str | None = None) -> None:
    """Point MLflow at a command's tracking group's store and experiment; runs about a saved model (`model`) default
    to that model's experiment."""
    from tlkit.core import tracking

    uri, experiment = group["tracking_uri"], group["experiment"]
    if experiment is None and model and model.startswith(tracking.RUNS_PREFIX):
        experiment = tracking.experiment_of(model, uri)
    tracking.configure(uri, experiment)
