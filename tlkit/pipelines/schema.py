"""A pipeline file -> its validated schema: datasets, stages, sweep, seeds, jobs (a typo is a one-line error).

The stages nest the settings models of tlkit.config, so a pipeline file and the CLI share every default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from tlkit.config import (
    EXTRACT_LAYERS,
    PRETRAIN_FROM,
    BackboneConfig,
    BaselineConfig,
    ComputeConfig,
    EvaluateConfig,
    ExportConfig,
    Layers,
    PretrainConfig,
    Settings,
    SplitConfig,
    TrainConfig,
    TuneConfig,
)
from tlkit.errors import TlkitError


class DigitsConfig(Settings):
    """Write scikit-learn's digits to the dataset's path before the pipeline runs."""

    classes: str = "0-9"
    per_class: int | None = Field(None, ge=1)
    size: int = Field(32, ge=8)
    seed: int = 0


class PhotosConfig(Settings):
    """Write crops of real sample photos (see `tlkit data photos`) to the dataset's path before the pipeline runs.

    The crops are drawn with the dataset's seed, so `seeds:` varies the data too; put `{seed}` in the
    dataset's path to keep one folder per seed.
    """

    crop: int = Field(64, ge=8)
    train: int = Field(12, ge=1)
    val: int = Field(8, ge=0)
    test: int = Field(20, ge=1)
    grey: bool = True


class DatasetConfig(SplitConfig):
    path: str
    digits: DigitsConfig | None = None
    photos: PhotosConfig | None = None

    @model_validator(mode="after")
    def _one_generator(self) -> DatasetConfig:
        if self.digits is not None and self.photos is not None:
            raise ValueError("a dataset is written by digits or by photos, not both")
        return self

    @property
    def folder(self) -> str:
        """`path` with `{seed}` filled in."""
        return self.path.replace("{seed}", str(self.seed))


class ModelStage(Settings):
    id: str = Field(description="name of the stage: the run's name, and how later stages refer to it")
    data: str = Field(description="a dataset name from `datasets`")
    model: str | None = Field(None, description="this stage's timm model (default: the pipeline's backbone)")
    pretrained: bool | None = Field(None, description="this stage's hub-weights choice (default: the backbone's)")
    weights: str | None = Field(None, description="this stage's weights: a file, runs:/RUN_ID or an earlier stage's id")
    img_size: int | None = Field(None, ge=8, description="this stage's input side in pixels")


class PretrainStage(ModelStage):
    stage: Literal["pretrain"]
    pretrained: bool | None = Field(False, description=PRETRAIN_FROM)  # as `tlkit pretrain`, whatever `backbone` says
    train: PretrainConfig = PretrainConfig()


class FinetuneStage(ModelStage):
    stage: Literal["finetune"]
    train: TrainConfig = TrainConfig()


class BaselineStage(ModelStage):
    stage: Literal["baseline"]
    baseline: BaselineConfig = BaselineConfig()


class TuneStage(ModelStage, TuneConfig):
    """Search fine-tuning recipes (as `tlkit tune`); the best recipe, retrained, is the stage's model."""

    stage: Literal["tune"]
    train: TrainConfig = TrainConfig()  # settings the space does not name; its seed seeds the study


class ExtractStage(ModelStage):
    """Cache the frozen features of every image (as `tlkit extract`)."""

    stage: Literal["extract"]
    layers: Layers = Field("last", description=EXTRACT_LAYERS)


class EvaluateStage(EvaluateConfig):
    """Score an earlier stage's model (or a runs:/ model) on a dataset's split."""

    id: str
    stage: Literal["evaluate"]
    model: str = Field(description="an earlier stage's id, or runs:/RUN_ID")
    data: str = Field(description="a dataset name from `datasets`")


class PredictStage(Settings):
    """Classify image files with an earlier stage's model (or a runs:/ model)."""

    id: str
    stage: Literal["predict"]
    model: str = Field(description="an earlier stage's id, or runs:/RUN_ID")
    images: list[str] = Field(min_length=1, description="image files or folders")
    top_k: int = Field(1, ge=1)


class ExportStage(ExportConfig):
    """Write an earlier stage's network (or a runs:/ model) to run without tlkit, with its JSON sidecar (as `tlkit
    export`)."""

    id: str
    stage: Literal["export"]
    model: str = Field(description="an earlier stage's id, or runs:/RUN_ID")
    out: str = Field("export", description="folder, relative to where you run tlkit; {seed} becomes the seed")


AnyStage = (
    PretrainStage
    | FinetuneStage
    | TuneStage
    | BaselineStage
    | ExtractStage
    | EvaluateStage
    | PredictStage
    | ExportStage
)


Stage = Annotated[AnyStage, Field(discriminator="stage")]


MODEL_STAGES = ("pretrain", "finetune", "tune", "baseline")  # stages whose run saves a model that later stages may use


class RayConfig(Settings):
    """Where a pipeline's points run with `tlkit run --ray` (see tlkit.pipelines.cluster)."""

    address: str | None = Field(None, description="auto, HOST:6379 or ray://HOST:10001; `tlkit run --ray` overrides it")
    num_cpus: float = Field(1, gt=0, description="CPU cores a point asks for (its torch threads)")
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs a point asks for (default: 1 for a point that trains, when the cluster has GPUs and devices "
        "is not cpu)",
    )
    max_retries: int = Field(3, ge=0, description="times a point is run again when its node or worker process is lost")


class PipelineConfig(Settings):
    name: str
    experiment: str | None = None
    datasets: dict[str, DatasetConfig]
    backbone: BackboneConfig = BackboneConfig()
    compute: ComputeConfig = ComputeConfig()
    stages: list[Stage]
    sweep: dict[str, list] | None = Field(None, description="dotted setting -> values; every combination runs")
    seeds: list[int] | None = Field(None, min_length=1, description="run every grid point once per seed")
    jobs: int = Field(
        1,
        ge=1,
        description="points (grid point, seed) run at once, each in its own process with its share of the cores",
    )
    ray: RayConfig | None = Field(None, description="run the points as tasks on a Ray cluster (see `tlkit run --ray`)")

    @model_validator(mode="after")
    def _check_references(self) -> PipelineConfig:
        seen: dict[str, str] = {}
        for i, stage in enumerate(self.stages):
            where = f"stages.{i} ({stage.id})"
            data = getattr(stage, "data", None)
            if data is not None and data not in self.datasets:
                raise ValueError(f"{where}: data {data!r} is not one of the datasets: {', '.join(self.datasets)}")
            if stage.id in seen:
                raise ValueError(f"{where}: id {stage.id!r} is used twice")
            if isinstance(stage, (EvaluateStage, PredictStage, ExportStage)):
                ref = stage.model
                if not ref.startswith("runs:/") and seen.get(ref) not in MODEL_STAGES:
                    raise ValueError(
                        f"{where}: model {ref!r} is neither an earlier pretrain, finetune, tune or baseline stage id "
                        "nor a runs:/ URI"
                    )
            else:
                weights = stage.weights
                if (
                    weights
                    and not weights.startswith(("runs:/", "pkg:"))
                    and not Path(weights).suffix
                    and weights not in seen
                ):
                    raise ValueError(
                        f"{where}: weights {weights!r} is neither an earlier stage id, a runs:/ URI, a pkg:NAME "
                        "weight package nor a file"
                    )
            seen[stage.id] = stage.stage
        for key, values in (self.sweep or {}).items():
            if not values:
                raise ValueError(f"sweep.{key}: give at least one value")
        return self


def _sections(model: type[BaseModel]) -> dict[str, set[type[BaseModel]]]:
    """Every settings model the schema of `model` nests, by the key it sits under (`train`: TrainConfig,
    PretrainConfig; `datasets`: DatasetConfig; ...), found by walking the fields' types."""
    import typing

    found: dict[str, set[type[BaseModel]]] = {}
    todo: list[type[BaseModel]] = [model]
    seen: set[type[BaseModel]] = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for key, field in current.model_fields.items():
            kinds = [field.annotation]
            while kinds:
                kind = kinds.pop()
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    found.setdefault(key, set()).add(kind)
                    todo.append(kind)
                else:
                    kinds += list(typing.get_args(kind))
    return found


def _explain(error: ValidationError, model: type[BaseModel]) -> str:
    """The first problem, in one line; an unknown key gets the closest known key of its section as a hint."""
    first = error.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    if first["type"] != "extra_forbidden":
        return f"{path}: {first['msg']}" if path else first["msg"]
    key, loc = str(first["loc"][-1]), first["loc"]
    sections = _sections(model)
    # the section the key sits in: suggest only its own keys (past list indexes, dataset names, a stage's tag)
    parent = next((p for p in reversed(loc[:-1]) if isinstance(p, str) and p in sections), None)
    models = sections.get(parent, set()) if parent else set()
    if not models:
        models = {model, *(m for group in sections.values() for m in group)}
    known = sorted({name for m in models for name in m.model_fields})
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {path!r}{hint}"


def read_pipeline(path: str | Path) -> dict:
    """A pipeline file's YAML as a plain mapping (not yet validated)."""
    path = Path(path)
    if not path.exists():
        raise TlkitError(f"pipeline file {path} does not exist; see pipelines/ for ready ones")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TlkitError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise TlkitError(f"{path} must be a YAML mapping with name, datasets and stages")
    return raw


def validate_pipeline(raw: dict, where: str) -> PipelineConfig:
    """Validate a pipeline mapping; `where` (the file, a grid point) starts the one-line error."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise TlkitError(f"{where}: {_explain(err, PipelineConfig)}") from None


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file; every problem is a one-line TlkitError."""
    return validate_pipeline(read_pipeline(path), str(path))
