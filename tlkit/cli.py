"""Command line -> one stage call each, a short summary, and one-line errors (exit code 1)."""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from tlkit.errors import TlkitError

app = typer.Typer(
    help="Transfer learning for small image datasets: timm backbones, sklearn baselines and Lightning fine-tuning, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Sample datasets that need no network.", no_args_is_help=True)
backbone_app = typer.Typer(help="Browse timm backbones.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(backbone_app, name="backbone")

console = Console()
errors = Console(stderr=True)


def command(func):
    """Run a command with tlkit's runtime settings; user errors become one line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from tlkit import runtime

        runtime.quiet()
        runtime.tune_allocator()
        try:
            return func(*args, **kwargs)
        except TlkitError as err:
            errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


# ----------------------------------------------------------------------------------------------
# Shared options


class Classifier(str, Enum):
    svm = "svm"
    logreg = "logreg"
    pixels = "pixels"


DataArg = Annotated[str, typer.Argument(help="Image folder (class folders, or train/ val/ test/), CSV (path,label[,split]) or manifest .json.")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="timm model name (`tlkit backbone list`).")]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Start from timm's hub weights (needs the network).")]
Weights = Annotated[Optional[str], typer.Option(help="Weights: a .safetensors / state-dict file, or runs:/RUN_ID of a tlkit run.")]
ImgSize = Annotated[Optional[int], typer.Option(help="Input side in pixels (default: the backbone's data config).")]
Val = Annotated[float, typer.Option(help="Fraction of each class for validation (when the data gives no splits).")]
Test = Annotated[float, typer.Option(help="Fraction of each class for test (when the data gives no splits).")]
Seed = Annotated[int, typer.Option(help="Seed of splits, initialisation and training.")]
Shots = Annotated[Optional[int], typer.Option(help="Label only N images per class (train + val); the rest become test.")]
Devices = Annotated[str, typer.Option(help="Lightning devices: auto, a count, or e.g. 0,1.")]
Precision = Annotated[str, typer.Option(help="auto (bf16-mixed where the hardware runs it natively), 32-true, bf16-mixed, 16-mixed.")]
BatchSize = Annotated[int, typer.Option(help="Images per batch.")]
Workers = Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: CPUs - 1).")]
TrackingUri = Annotated[Optional[str], typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: sqlite:///mlflow.db here).")]
Experiment = Annotated[Optional[str], typer.Option(envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment name.")]
CacheDir = Annotated[Optional[Path], typer.Option(envvar="TLKIT_CACHE", help="Feature cache folder (default .tlkit/cache).")]


def _devices(value: str):
    if value == "auto":
        return value
    if value.isdigit():
        return int(value)
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise TlkitError(f"--devices must be auto, a count or a list like 0,1; got {value!r}") from None


def _split(val: float, test: float, seed: int, shots: Optional[int]):
    from tlkit.config import SplitConfig

    try:
        return SplitConfig(val=val, test=test, seed=seed, shots=shots)
    except ValueError as err:
        raise TlkitError(f"bad split setting: {err.errors()[0]['loc'][0]} {err.errors()[0]['msg']}") from None


def _backbone(model, pretrained, weights, img_size, seed):
    from tlkit.config import BackboneConfig

    if model is None and not (weights or "").startswith("runs:/"):
        raise TlkitError("pass --model NAME (see `tlkit backbone list`), or --weights runs:/RUN_ID to reuse a run's backbone")
    return BackboneConfig(model=model, pretrained=pretrained and weights is None, weights=weights, img_size=img_size, seed=seed)


def _compute(devices, precision, batch_size, workers):
    from tlkit.config import ComputeConfig

    return ComputeConfig(devices=_devices(devices), precision=precision, batch_size=batch_size, num_workers=workers)


def _tracking(uri, experiment) -> None:
    from tlkit import tracking

    tracking.configure(uri, experiment)


def _metrics_table(title: str, metrics: dict[str, float]) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    return table


def _run_footer(run_id: str) -> None:
    console.print(f"MLflow run [bold]{run_id}[/]  (model: runs:/{run_id}; browse with `tlkit ui`)", highlight=False)


# ----------------------------------------------------------------------------------------------
# Commands


@data_app.command("digits")
@command
def data_digits(
    out: Annotated[Path, typer.Argument(help="Folder to write class folders of PNGs into.")],
    classes: Annotated[str, typer.Option(help="Digits to write, e.g. 0-4 or 5,6,7.")] = "0-9",
    per_class: Annotated[Optional[int], typer.Option(help="At most N images per class (random, seeded).")] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    seed: Seed = 0,
):
    """Write scikit-learn's bundled handwritten digits (1797 real images, 10 classes) as PNG folders."""
    from tlkit.sample_data import write_digits

    counts = write_digits(out, classes=classes, per_class=per_class, size=size, seed=seed)
    console.print(f"wrote {sum(counts.values())} images of digits {', '.join(counts)} to {out}")


@app.command("ingest")
@command
def ingest_command(
    data: DataArg,
    out: Annotated[Optional[Path], typer.Option(help="Manifest file to write (default: <folder>.manifest.json here).")] = None,
    val: Val = 0.15,
    test: Test = 0.15,
    seed: Seed = 0,
    shots: Shots = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
):
    """Check every image, make splits, write a manifest and print the dataset report."""
    from tlkit.ingest import format_report
    from tlkit.stages import run_ingest

    _tracking(tracking_uri, experiment)
    manifest, path, result = run_ingest(data, _split(val, test, seed, shots), out=out)
    console.print(format_report(manifest), highlight=False)
    console.print(f"\nmanifest written to {path}")
    _run_footer(result.run_id)


@backbone_app.command("list")
@command
def backbone_list(
    pattern: Annotated[str, typer.Argument(help="Wildcard pattern, e.g. 'resnet*' or 'vit'.")] = "",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Only models with pretrained weights.")] = False,
):
    """List timm backbone names."""
    from tlkit.backbone import list_backbones

    names = list_backbones(pattern, pretrained=pretrained)
    if not names:
        raise TlkitError(f"no timm model matches {pattern!r}; try a shorter pattern such as 'resnet'")
    console.print("\n".join(names), highlight=False)
    errors.print(f"{len(names)} model(s)")


@backbone_app.command("info")
@command
def backbone_info_command(name: Annotated[str, typer.Argument(help="timm model name.")], img_size: ImgSize = None):
    """Feature size, parameters, preprocessing, layer groups and pretrained tags of a backbone."""
    from tlkit.backbone import backbone_info

    info = backbone_info(name, img_size=img_size)
    cfg = info["data_config"]
    console.print(f"[bold]{info['name']}[/]  features {info['num_features']}  parameters {info['num_params']:,}", highlight=False)
    console.print(
        f"input {cfg['input_size']}  mean {cfg['mean']}  std {cfg['std']}  interpolation {cfg['interpolation']}  crop_pct {cfg.get('crop_pct')}",
        highlight=False,
    )
    table = Table(title="layer groups (input side first; a new head follows)")
    table.add_column("#", justify="right")
    table.add_column("group")
    table.add_column("parameters", justify="right")
    for i, (label, count) in enumerate(info["layer_groups"]):
        table.add_row(str(i), label, f"{count:,}")
    console.print(table)
    tags = info["pretrained_tags"]
    console.print(f"pretrained tags: {', '.join(tags) if tags else 'none'}", highlight=False)


@app.command("extract")
@command
def extract_command(
    data: DataArg,
    model: Model = None,
    pretrained: Pretrained = True,
    weights: Weights = None,
    img_size: ImgSize = None,
    val: Val = 0.15,
    test: Test = 0.15,
    seed: Seed = 0,
    shots: Shots = None,
    devices: Devices = "auto",
    precision: Precision = "auto",
    batch_size: BatchSize = 64,
    workers: Workers = None,
    cache_dir: CacheDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
):
    """Run the frozen backbone over every image and cache the features."""
    from tlkit.stages import run_extract

    _tracking(tracking_uri, experiment)
    features, result = run_extract(
        data,
        _backbone(model, pretrained, weights, img_size, seed),
        split=_split(val, test, seed, shots),
        compute=_compute(devices, precision, batch_size, workers),
        cache=cache_dir,
        tracking_uri=tracking_uri,
    )
    how = "read from cache" if features.cached else "computed"
    n = len(features.X)
    console.print(f"{n} x {features.X.shape[1]} features {how} in {result.details['seconds']:.2f} s ({n / max(result.details['seconds'], 1e-9):.0f} images/s), key {features.key}")
    _run_footer(result.run_id)


@app.command("baseline")
@command
def baseline_command(
    data: DataArg,
    model: Model = None,
    classifier: Annotated[Classifier, typer.Option(help="svm (L2-normalised features), logreg (L-BFGS), or pixels (svm on raw pixels).")] = Classifier.svm,
    pretrained: Pretrained = True,
    weights: Weights = None,
    img_size: ImgSize = None,
    pixel_size: Annotated[int, typer.Option(help="Side of the downscaled image for --classifier pixels.")] = 32,
    val: Val = 0.15,
    test: Test = 0.15,
    seed: Seed = 0,
    shots: Shots = None,
    devices: Devices = "auto",
    precision: Precision = "auto",
    batch_size: BatchSize = 64,
    workers: Workers = None,
    cache_dir: CacheDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
):
    """Fit a linear classifier on frozen features (C chosen on val) and report held-out metrics."""
    from tlkit.config import BackboneConfig, BaselineConfig
    from tlkit.stages import run_baseline

    _tracking(tracking_uri, experiment)
    pixels = classifier is Classifier.pixels
    backbone = BackboneConfig() if pixels else _backbone(model, pretrained, weights, img_size, seed)
    result = run_baseline(
        data,
        backbone,
        BaselineConfig(classifier=classifier.value, pixel_size=pixel_size, seed=seed),
        split=_split(val, test, seed, shots),
        compute=_compute(devices, precision, batch_size, workers),
        cache=cache_dir,
        tracking_uri=tracking_uri,
    )
    title = f"{result.details['model']} + {'svm' if pixels else classifier.value} (C={result.details['C']:g})"
    console.print(_metrics_table(title, result.metrics))
    _run_footer(result.run_id)


def _train(kind: str, data, model, pretrained, weights, img_size, epochs, lr, batch_size, weight_decay, label_smoothing, augment, hflip, val, test, seed, shots, devices, precision, workers, tracking_uri, experiment):
    from tlkit.config import TrainConfig
    from tlkit.stages import run_train

    _tracking(tracking_uri, experiment)
    train = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, label_smoothing=label_smoothing, augment=augment, hflip=hflip, seed=seed)
    result = run_train(
        kind,
        data,
        _backbone(model, pretrained, weights, img_size, seed),
        train,
        split=_split(val, test, seed, shots),
        compute=_compute(devices, precision, batch_size, workers),
        tracking_uri=tracking_uri,
    )
    console.print(_metrics_table(f"{kind}: best epoch {result.details['best_epoch']}", result.metrics))
    _run_footer(result.run_id)


Epochs = Annotated[int, typer.Option(help="Training epochs.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay (not on biases and norms).")]
LabelSmoothing = Annotated[float, typer.Option(help="Cross-entropy label smoothing.")]
Augment = Annotated[str, typer.Option(help="none, light, medium, heavy, or an albumentations YAML file.")]
HFlip = Annotated[bool, typer.Option("--hflip/--no-hflip", help="Allow horizontal flips in augmentation.")]


@app.command("pretrain")
@command
def pretrain_command(
    data: DataArg,
    model: Model = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Start from timm's hub weights.")] = False,
    weights: Weights = None,
    img_size: ImgSize = None,
    epochs: Epochs = 15,
    lr: Lr = 2e-3,
    batch_size: BatchSize = 32,
    weight_decay: WeightDecay = 0.05,
    label_smoothing: LabelSmoothing = 0.0,
    augment: Augment = "light",
    hflip: HFlip = True,
    val: Val = 0.15,
    test: Test = 0.15,
    seed: Seed = 0,
    shots: Shots = None,
    devices: Devices = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
):
    """Train a backbone end to end on a source dataset; reuse it later with --weights runs:/RUN_ID."""
    _train("pretrain", data, model, pretrained, weights, img_size, epochs, lr, batch_size, weight_decay, label_smoothing, augment, hflip, val, test, seed, shots, devices, precision, workers, tracking_uri, experiment)


@app.command("finetune")
@command
def finetune_command(
    data: DataArg,
    model: Model = None,
    pretrained: Pretrained = True,
    weights: Weights = None,
    img_size: ImgSize = None,
    epochs: Epochs = 20,
    lr: Lr = 1e-3,
    batch_size: BatchSize = 32,
    weight_decay: WeightDecay = 0.05,
    label_smoothing: LabelSmoothing = 0.0,
    augment: Augment = "light",
    hflip: HFlip = True,
    val: Val = 0.15,
    test: Test = 0.15,
    seed: Seed = 0,
    shots: Shots = None,
    devices: Devices = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
):
    """Fine-tune a backbone with a new head on the target classes (whole network trainable)."""
    _train("finetune", data, model, pretrained, weights, img_size, epochs, lr, batch_size, weight_decay, label_smoothing, augment, hflip, val, test, seed, shots, devices, precision, workers, tracking_uri, experiment)


@app.command("predict")
@command
def predict_command(
    model: Annotated[str, typer.Argument(help="runs:/RUN_ID of a baseline, pretrain or finetune run (or a model folder).")],
    images: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    top_k: Annotated[int, typer.Option(help="Classes to show per image.")] = 1,
    out: Annotated[Optional[Path], typer.Option(help="Write the predictions to this CSV.")] = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
):
    """Class names and probabilities (SVM: decision scores) for images, preprocessed as in training."""
    from tlkit.stages import run_predict

    _tracking(tracking_uri, experiment)
    rows, skipped, result = run_predict(model, images, top_k=top_k, out=out, tracking_uri=tracking_uri)
    score = "probability" if "probability" in rows[0] else "score"
    table = Table()
    for column in ("image", "rank", "class", score):
        table.add_column(column, justify="right" if column in ("rank", score) else "left")
    shown = rows[: 50 * top_k]
    for row in shown:
        table.add_row(row["image"], str(row["rank"]), row["class"], f"{row[score]:.4f}")
    console.print(table)
    if len(rows) > len(shown):
        console.print(f"... {len(rows) - len(shown)} more row(s){'' if out else '; pass --out FILE.csv for all'}")
    for path, why in skipped:
        errors.print(f"skipped {path}: {why}", highlight=False)
    if out:
        console.print(f"predictions written to {out}")


@app.command("run")
@command
def run_command(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file, e.g. pipelines/quickstart.yaml.")],
    tracking_uri: TrackingUri = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default: the pipeline's).")] = None,
):
    """Run a pipeline file's stages in order, as MLflow runs nested under one pipeline run."""
    from tlkit.pipeline import print_summary, run_pipeline

    summary = run_pipeline(pipeline, tracking_uri=tracking_uri, experiment=experiment, console=console)
    print_summary(summary, console)


@app.command("ui")
@command
def ui_command(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[str, typer.Option(help="Address to listen on; keep 127.0.0.1 unless you mean to share it.")] = "127.0.0.1",
    tracking_uri: TrackingUri = None,
):
    """Open the MLflow UI on the project's store (Ctrl-C stops it)."""
    from tlkit import tracking

    console.print(f"MLflow UI on http://{host}:{port}  (store: {tracking.resolve_tracking_uri(tracking_uri)})", highlight=False)
    raise typer.Exit(tracking.serve_ui(host=host, port=port, tracking_uri=tracking_uri))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
