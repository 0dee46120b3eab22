"""Settings of every stage, and pipeline files -> validated pydantic models (a typo is an error)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tlkit.errors import TlkitError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SplitConfig(Settings):
    """How ingest makes the splits that the data does not give."""

    val: float = Field(0.15, ge=0, lt=1, description="fraction of each class for validation")
    test: float = Field(0.15, ge=0, lt=1, description="fraction of each class for test")
    seed: int = Field(0, description="seed of the splits")
    shots: int | None = Field(None, ge=1, description="label only this many images per class; the rest is test")


class BackboneConfig(Settings):
    """Which timm model, with which weights."""

    model: str | None = Field(None, description="timm model name")
    pretrained: bool = Field(False, description="timm hub weights (needs the network)")
    weights: str | None = Field(None, description="weights file, runs:/RUN_ID, or (in a pipeline) an earlier stage's id")
    img_size: int | None = Field(None, ge=8, description="input side in pixels (default: the model's)")
    seed: int = Field(0, description="seed of a random initialisation")


class ComputeConfig(Settings):
    """Where and how tensors are computed."""

    devices: int | str = "auto"
    precision: str = "auto"
    batch_size: int = Field(64, ge=1)
    num_workers: int | None = Field(None, ge=0)


class TrainConfig(Settings):
    """Training settings shared by pretrain and finetune."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float | Literal["auto"] = Field(1e-3, description="head learning rate, or auto (LR finder)")
    lr_mult: float = Field(3.0, ge=1, description="each earlier layer group learns this many times slower")
    lrs: list[float] | None = Field(None, description="explicit rates: body groups (input side first), then head")
    groups: int | None = Field(4, ge=1, description="merge the backbone's layer groups into this many (null: timm's own)")
    strategy: Literal["freeze-unfreeze", "linear-probe", "full", "gradual", "lp-ft"] = "freeze-unfreeze"
    freeze_epochs: int = Field(1, ge=1, description="freeze-unfreeze: head-only epochs")
    unfreeze_every: int = Field(1, ge=1, description="gradual: epochs between unfreezing groups")
    bn: Literal["frozen", "train"] = Field("frozen", description="BatchNorm of frozen groups: eval mode, or updating statistics")
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    balance: Literal["none", "weights", "sampler"] = "none"
    patience: int | None = Field(None, ge=1, description="early stopping: epochs without val improvement (last phase)")
    augment: str = "light"
    hflip: bool = True
    seed: int = 0


class BaselineConfig(Settings):
    classifier: Literal["svm", "logreg", "pixels"] = "svm"
    pixel_size: int = Field(32, ge=2, description="side of the downscaled image for the pixels baseline")
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Pipeline files


class DigitsConfig(Settings):
    """Write scikit-learn's digits to the dataset's path before the pipeline runs."""

    classes: str = "0-9"
    per_class: int | None = Field(None, ge=1)
    size: int = Field(32, ge=8)
    seed: int = 0


class DatasetConfig(SplitConfig):
    path: str
    digits: DigitsConfig | None = None


class _Stage(Settings):
    id: str = Field(description="name of the stage: the run's name, and how later stages refer to it")
    data: str = Field(description="a dataset name from `datasets`")
    model: str | None = None
    pretrained: bool | None = None
    weights: str | None = None
    img_size: int | None = None


class PretrainStage(_Stage):
    stage: Literal["pretrain"]
    train: TrainConfig = TrainConfig(strategy="full")

    @model_validator(mode="after")
    def _train_everything(self) -> PretrainStage:
        if "strategy" not in self.train.model_fields_set:  # nothing to keep frozen when training from scratch
            self.train.strategy = "full"
        return self


class FinetuneStage(_Stage):
    stage: Literal["finetune"]
    train: TrainConfig = TrainConfig()


class BaselineStage(_Stage):
    stage: Literal["baseline"]
    baseline: BaselineConfig = BaselineConfig()


class ExtractStage(_Stage):
    stage: Literal["extract"]


Stage = Annotated[Union[PretrainStage, FinetuneStage, BaselineStage, ExtractStage], Field(discriminator="stage")]


class PipelineConfig(Settings):
    name: str
    experiment: str | None = None
    datasets: dict[str, DatasetConfig]
    backbone: BackboneConfig = BackboneConfig()
    compute: ComputeConfig = ComputeConfig()
    stages: list[Stage]

    @model_validator(mode="after")
    def _check_references(self) -> PipelineConfig:
        seen: dict[str, str] = {}
        for i, stage in enumerate(self.stages):
            where = f"stages.{i} ({stage.id})"
            if stage.data not in self.datasets:
                raise ValueError(f"{where}: data {stage.data!r} is not one of the datasets: {', '.join(self.datasets)}")
            if stage.id in seen:
                raise ValueError(f"{where}: id {stage.id!r} is used twice")
            weights = stage.weights
            if weights and not weights.startswith("runs:/") and not Path(weights).suffix and weights not in seen:
                raise ValueError(f"{where}: weights {weights!r} is neither an earlier stage id, a runs:/ URI nor a file")
            seen[stage.id] = stage.stage
        return self


def _explain(error: ValidationError, model: type[BaseModel]) -> str:
    first = error.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        known: set[str] = set()
        for cls in (PipelineConfig, DatasetConfig, DigitsConfig, BackboneConfig, ComputeConfig, TrainConfig, BaselineConfig,
                    PretrainStage, FinetuneStage, BaselineStage):
            known |= set(cls.model_fields)
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {path!r}{hint}"
    return f"{path}: {first['msg']}" if path else first["msg"]


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file; every problem is a one-line TlkitError."""
    path = Path(path)
    if not path.exists():
        raise TlkitError(f"pipeline file {path} does not exist; see pipelines/ for ready ones")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TlkitError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise TlkitError(f"{path} must be a YAML mapping with name, datasets and stages")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise TlkitError(f"{path}: {_explain(err, PipelineConfig)}") from None
