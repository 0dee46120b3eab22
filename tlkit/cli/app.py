"""The Typer app: command line -> one stage call each, a short summary, and one-line errors (exit code 1)."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shlex
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tlkit.cli.options import build, settings
from tlkit.core import signals
from tlkit.core.files import printable
from tlkit.errors import TlkitError

_STARTED = time.monotonic()  # about when the process started (heavy imports come later, inside the commands)


class _OneLineUsageErrors(typer.core.TyperGroup):
    """A bad option or argument is one line on stderr (exit code 2), like every other error, not a boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            sys.exit(1)
        except typer.TyperException as err:  # Typer's (vendored) click usage errors: bad values, unknown options
            context = getattr(err, "ctx", None)
            where = f"; see `{context.command_path} --help`" if context is not None else ""
            _error_line(err.format_message().replace("Value error, ", "").rstrip(".") + where)
            sys.exit(getattr(err, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="Transfer learning for small image datasets: timm backbones, sklearn baselines and Lightning fine-tuning, "
    "tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Sample datasets that need no network.", no_args_is_help=True)
backbone_app = typer.Typer(help="Browse timm backbones.", no_args_is_help=True)
augment_app = typer.Typer(help="Look at augmentations before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(backbone_app, name="backbone")
app.add_typer(augment_app, name="augment")

# No markup: messages carry paths, user text and brackets ("pip install 'tlkit[export]'"), printed as they are.
# Piped to a file or CI, rich would cut tables at 80 columns: lay them out at their own width instead.
console = Console(markup=False, width=None if sys.stdout.isatty() else 240)
errors = Console(stderr=True, markup=False, width=None if sys.stderr.isatty() else 240)


class _WarningLine(logging.Handler):
    """tlkit's warnings about the user's data, as `warning: ...` lines on stderr, printed literally."""

    def emit(self, record: logging.LogRecord) -> None:
        message = printable(record.getMessage())
        errors.print(Text("warning: ", style="yellow") + Text(message), highlight=False, soft_wrap=True)


def command(func):
    """Run a command with tlkit's runtime settings; user errors become one line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from tlkit.core import runtime

        runtime.quiet()
        tlkit_log = logging.getLogger("tlkit")
        if not any(isinstance(h, _WarningLine) for h in tlkit_log.handlers):
            tlkit_log.addHandler(_WarningLine())
            tlkit_log.propagate = False
        runtime.tune_allocator()
        if Path(sys.argv[0]).name in (
            "tlkit",
            "__main__.py",
        ):  # the command line, recorded on its runs (tracking.reap_dead_runs)
            os.environ["TLKIT_COMMAND"] = shlex.join(["tlkit", *sys.argv[1:]])
        stopping = contextlib.ExitStack()
        terminated = stopping.enter_context(signals.terminating_as_interrupt())  # SIGTERM does what Ctrl-C does
        try:
            runtime.progress_mode()  # a bad TLKIT_PROGRESS is said before any work
            if "tracking_uri" in kwargs:  # a damaged store is said before MLflow (1.5 s) and the rest load
                from tlkit.core.files import check_sqlite_store

                check_sqlite_store(kwargs["tracking_uri"])
            return func(*args, **kwargs)
        except TlkitError as err:
            _error_line(str(err))
            raise typer.Exit(1) from None
        except Exception as err:  # noqa: BLE001  the failures of a machine or a store, not of tlkit: one line too
            message = _known_failure(err)
            if message is None:
                raise
            _error_line(message)
            raise typer.Exit(1) from None
        except (KeyboardInterrupt, SystemExit) as stop:  # Lightning ends a fit interrupted by Ctrl-C with SystemExit
            if isinstance(stop, SystemExit) and not _killed_runs():
                raise
            errors.print(_interrupted_message(), highlight=False, soft_wrap=True)
            raise typer.Exit(128 + (terminated[0] if terminated else signal.SIGINT)) from None
        finally:
            stopping.close()

    return wrapper


def _some_files(items: list[str]) -> None:
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


def _error_line(message: str) -> None:
    text = printable(" ".join(message.split()))  # a file name in it may hold bytes that are not UTF-8
    errors.print(Text("error: ", style="bold red") + Text(text), highlight=False, soft_wrap=True)


def _known_failure(err: BaseException) -> str | None:
    """One line for the failures that come from the machine or the tracking store (a full disk, a damaged or
    read-only database), wherever in the chain of exceptions they sit; None for anything else (a bug: its traceback)."""
    from tlkit.core.files import disk_full_message, is_disk_full

    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain).lower()
    tracking = sys.modules.get("tlkit.core.tracking")
    store = tracking.resolve_tracking_uri() if tracking else "the tracking store"
    resume = _resume_hint()
    for e in chain:
        if isinstance(e, OSError) and is_disk_full(e):
            return disk_full_message(e) + resume
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename:
            return (
                f"cannot write {e.filename} ({e.strerror}); run tlkit in a folder you can write, or point its output "
                "(--out, --tracking-uri, TLKIT_CACHE) elsewhere"
            )
    if "database or disk is full" in text:
        return f"no space left for the tracking store {store}; free some space and run the command again" + resume
    if "database disk image is malformed" in text or "file is not a database" in text:
        return (
            f"the tracking store {store} is damaged (database disk image is malformed); restore it from a backup, or "
            "start a new "
            "store with --tracking-uri sqlite:///new.db (or move the damaged file away)"
        )
    if "attempt to write a readonly database" in text or "readonly database" in text:
        return (
            f"the tracking store {store} is read-only; run tlkit where you can write, or pass --tracking-uri for a "
            "store you can write"
        )
    return None


def _resume_hint() -> str:
    tracking = sys.modules.get("tlkit.core.tracking")
    failed = list(tracking.FAILED) if tracking else []
    unrecorded = list(tracking.UNRECORDED) if tracking else []
    argv = sys.argv[1:]
    if (failed or unrecorded) and argv and argv[0] in ("finetune", "pretrain"):
        run_id = (failed or unrecorded)[-1]
        again = argv if "--resume" in argv else [*argv, "--resume", run_id]
        state = (
            "is marked FAILED"
            if failed
            else "could not be marked FAILED (the store could not write; the next tlkit command marks it KILLED)"
        )
        return f"; run {run_id} {state} and continues from its last checkpoint with: {shlex.join(['tlkit', *again])}"
    return ""


def _killed_runs() -> list[str]:
    tracking = sys.modules.get("tlkit.core.tracking")  # not imported: no run was started
    return list(tracking.KILLED) if tracking else []


def _interrupted_message() -> str:
    """One line: which run was marked KILLED and the exact command that continues it."""
    killed = _killed_runs()
    if not killed:
        return "interrupted before any MLflow run started; nothing to resume"
    run_id, argv = killed[-1], sys.argv[1:]  # the outermost run
    command = argv[0] if argv else ""
    if command in ("finetune", "pretrain"):
        if "--resume" in argv:  # resuming again: keep the id that was given
            return (
                f"interrupted: run {run_id} is marked KILLED in MLflow; continue it with: "
                f"{shlex.join(['tlkit', *argv])}"
            )
        return (
            f"interrupted: run {run_id} is marked KILLED in MLflow; continue it with: "
            f"{shlex.join(['tlkit', *argv, '--resume', run_id])}"
        )
    if command == "tune":
        return (
            f"interrupted: study run {run_id} and its open trial are marked KILLED; the same command resumes the "
            f"study: {shlex.join(['tlkit', *argv])}"
        )
    if command == "run":  # without --fresh, which would recompute the stages that did finish
        again = [a for a in argv if a != "--fresh"]
        return (
            f"interrupted: pipeline run {run_id} and its open runs are marked KILLED; run the same command again and "
            f"finished stages are reused: {shlex.join(['tlkit', *again])}"
        )
    return f"interrupted: run {run_id} is marked KILLED in MLflow"


# ----------------------------------------------------------------------------------------------
# Shared options


class Classifier(str, Enum):
    svm = "svm"
    logreg = "logreg"
    pixels = "pixels"


DataArg = Annotated[
    str,
    typer.Argument(
        help="Image folder (class folders, or train/ val/ test/), CSV (path,label[,split]) or manifest .json."
    ),
]
Seed = Annotated[int, typer.Option(help="Seed of splits, initialisation and training.")]
TrackingUri = Annotated[
    str | None,
    typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: sqlite:///mlflow.db here)."),
]
Experiment = Annotated[str | None, typer.Option(envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment name.")]
ModelExperiment = Annotated[
    str | None, typer.Option(envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment (default: the model run's).")
]
NetworkRef = Annotated[
    str, typer.Argument(help="runs:/RUN_ID of a baseline, pretrain or finetune run (or a model folder).")
]
Weights = Annotated[
    str | None,
    typer.Option(help="Weights: a .safetensors / state-dict file, runs:/RUN_ID of a tlkit run, or pkg:NAME."),
]
RunName = Annotated[
    str | None, typer.Option(help="Name of the MLflow run (default: what it is, e.g. 'efficientnet_lite0 + svm').")
]
# the options of settings groups (tlkit.config's models, see options.py); the command gets each group as a dict
TRAINING: dict[str, Any] = dict(
    backbone="backbone", split="split", compute=("compute", ("-batch_size",)), tracking="tracking"
)
EXTRACTING: dict[str, Any] = dict(
    backbone="backbone", split="split", compute=("compute", ("-image_cache_mb",)), tracking="tracking"
)


def _devices(value: str):
    if value == "auto":
        return value
    if value.isdigit():
        return int(value)
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise TlkitError(f"--devices must be auto, a count or a list like 0,1; got {value!r}") from None


def _split(values: dict, seed: int):
    return build("SplitConfig", values, seed=seed)


def _backbone(values: dict, seed: int):
    if values["model"] is None and not (values["weights"] or "").startswith(("runs:/", "pkg:")):
        raise TlkitError(
            "pass --model NAME (see `tlkit backbone list`), or --weights runs:/RUN_ID to reuse a run's backbone, or "
            "--weights pkg:NAME"
        )
    backbone = build("BackboneConfig", values, seed=seed)
    return backbone.model_copy(update={"pretrained": backbone.pretrained and backbone.weights is None})


def _compute(values: dict, **fixed):
    values = dict(values)
    return build("ComputeConfig", values, devices=_devices(str(values.pop("devices"))), **fixed)


def _run(tracking: dict):
    """A command's tracking group -> the RunOptions its stage takes (the experiment is set by `_tracking`)."""
    from tlkit.runs.stages import RunOptions

    return RunOptions(tracking_uri=tracking["tracking_uri"], run_name=tracking.get("run_name"))


def _tracking(uri, experiment: str | None = None, model: str | None = None) -> None:
    """Point MLflow at the store; runs about a saved model (`model`) default to that model's experiment."""
    from tlkit.core import tracking

    if isinstance(uri, dict):  # a command's tracking group
        uri, experiment = uri["tracking_uri"], uri["experiment"]

    if experiment is None and model and model.startswith(tracking.RUNS_PREFIX):
        experiment = tracking.experiment_of(model, uri)
    tracking.configure(uri, experiment)


def _metrics_table(title: str, metrics: dict[str, float], heldout: str = "test") -> Table:
    """The held-out figures (heldout_* metrics; `heldout` says which split they are on)."""
    caption = f"held out: the {heldout} split, which chose nothing"
    # as wide as its title and caption: rich wraps them to the table's width, mid-phrase
    table = Table(
        title=title,
        show_header=True,
        caption=caption,
        title_justify="left",
        min_width=max(len(title), len(caption)) + 2,
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("heldout_accuracy", "heldout_balanced_accuracy", "heldout_macro_f1", "heldout_ece"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    return table


_PRECISION_NAMES = {
    "32-true": "fp32",
    "bf16-mixed": "bf16 mixed",
    "16-mixed": "fp16 mixed",
    "bf16-true": "bf16",
    "64-true": "fp64",
}


def _run_footer(run_id: str, *, model: bool = True) -> None:
    saved = f"model: runs:/{run_id}; " if model else ""
    console.print(
        Text("MLflow run ") + Text(run_id, style="bold") + Text(f"  ({saved}browse with `tlkit ui`)"), highlight=False
    )


# ----------------------------------------------------------------------------------------------
# Commands


@data_app.command("digits")
@command
def data_digits(
    out: Annotated[Path, typer.Argument(help="Folder to write class folders of PNGs into.")],
    classes: Annotated[str, typer.Option(help="Digits to write, e.g. 0-4 or 5,6,7.")] = "0-9",
    per_class: Annotated[int | None, typer.Option(help="At most N images per class (random, seeded).")] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    seed: Seed = 0,
):
    """Write scikit-learn's bundled handwritten digits (1797 real images, 10 classes) as PNG folders."""
    from tlkit.data.samples import write_digits

    counts = write_digits(out, classes=classes, per_class=per_class, size=size, seed=seed)
    console.print(f"wrote {sum(counts.values())} images of digits {', '.join(counts)} to {out}")


@data_app.command("photos")
@command
def data_photos(
    out: Annotated[Path, typer.Argument(help="Folder to write train/ val/ test/ class folders of PNG crops into.")],
    crop: Annotated[int, typer.Option(help="Side of each square crop, in the photo's own pixels.")] = 64,
    train: Annotated[int, typer.Option(help="Crops per class for train.")] = 12,
    val: Annotated[int, typer.Option(help="Crops per class for val.")] = 8,
    test: Annotated[int, typer.Option(help="Crops per class for test.")] = 20,
    grey: Annotated[
        bool, typer.Option("--grey/--colour", help="Greyscale, so colour alone does not name the photo.")
    ] = True,
    seed: Seed = 0,
):
    """Write crops of real photos (scikit-image's samples) as 8 texture classes, split by photo region."""
    from tlkit.data.samples import write_photos

    written = write_photos(out, crop=crop, counts=(train, val, test), grey=grey, seed=seed)
    sizes = ", ".join(f"{split} {sum(n.values())}" for split, n in written.items())
    console.print(
        f"wrote {len(written['train'])} classes ({', '.join(written['train'])}) to {out}: {sizes}", highlight=False
    )


@augment_app.command("preview")
@command
@settings(backbone=("backbone", ("model", "weights", "img_size")), train=("finetune", ("augment", "hflip")))
def augment_preview(
    data: DataArg,
    backbone: dict,
    train: dict,
    n: Annotated[int, typer.Option(min=1, help="Images in the grid.")] = 16,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("train_batch.png"),
):
    """Draw a grid of augmented training images as the model would see them (no run is logged)."""
    from tlkit.core.files import save_figure
    from tlkit.core.metrics import close
    from tlkit.models.backbone import preview_data_config
    from tlkit.runs.stages import load_data
    from tlkit.train.finetune import train_batch_figure

    manifest = load_data(data)
    config = preview_data_config(backbone["model"], backbone["weights"], backbone["img_size"])
    augment = train["augment"]
    title = f"augment {Path(augment).name} at {config['input_size'][-1]} px"
    figure = train_batch_figure(manifest, config, augment, hflip=train["hflip"], n=n, seed=seed, title=title)
    save_figure(figure, out)
    close(figure)
    console.print(f"{n} augmented training images drawn to {out}", highlight=False)


@app.command("ingest")
@command
@settings(split="split", tracking="tracking")
def ingest_command(
    data: DataArg,
    split: dict,
    tracking: dict,
    out: Annotated[
        Path | None, typer.Option(help="Manifest file to write (default: <folder>.manifest.json here).")
    ] = None,
    seed: Seed = 0,
):
    """Check every image, make splits, write a manifest and print the dataset report."""
    from tlkit.data.ingest import format_report
    from tlkit.runs.stages import run_ingest

    _tracking(tracking)
    manifest, path, result = run_ingest(data, _split(split, seed), out=out, run_name=tracking["run_name"])
    console.print(format_report(manifest), highlight=False)
    console.print(f"\nmanifest written to {path}")
    _run_footer(result.run_id, model=False)


@backbone_app.command("list")
@command
def backbone_list(
    pattern: Annotated[str, typer.Argument(help="Wildcard pattern, e.g. 'resnet*' or 'vit'.")] = "",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Only models with pretrained weights.")] = False,
):
    """List timm backbone names."""
    from tlkit.models.backbone import list_backbones

    names = list_backbones(pattern, pretrained=pretrained)
    if not names:
        raise TlkitError(f"no timm model matches {pattern!r}; try a shorter pattern such as 'resnet'")
    console.print("\n".join(names), highlight=False)
    errors.print(f"{len(names)} model(s)")


@backbone_app.command("filters")
@command
def backbone_filters_command(
    model: Annotated[str, typer.Argument(help="timm model name, or runs:/RUN_ID of a tlkit run.")],
    pretrained: Annotated[
        bool, typer.Option("--pretrained/--no-pretrained", help="timm's hub weights (needs the network).")
    ] = False,
    weights: Weights = None,
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: MODEL-filters.png).")] = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
):
    """Draw the first convolution's filters as an image grid (edge and colour detectors, once trained)."""
    from tlkit.runs.evaluate import run_filters

    _tracking(tracking_uri, experiment)
    result = run_filters(
        model,
        pretrained=pretrained,
        weights=weights,
        out=out,
        run=_run({"tracking_uri": tracking_uri, "run_name": None}),
    )
    shape = result.details["shape"]
    console.print(
        f"{shape[0]} filters of {shape[2]}x{shape[3]} ({result.details['weights']}) drawn to {result.files[0]}",
        highlight=False,
    )


@backbone_app.command("info")
@command
def backbone_info_command(
    name: Annotated[str, typer.Argument(help="timm model name.")],
    img_size: Annotated[int | None, typer.Option(help="Input side in pixels (default: the model's).")] = None,
    groups: Annotated[
        int | None, typer.Option(help="Merge the layer groups into N (as --groups does in finetune).")
    ] = None,
):
    """Feature size, parameters, preprocessing, layer groups and pretrained tags of a backbone."""
    from tlkit.models.backbone import backbone_info

    info = backbone_info(name, img_size=img_size, groups=groups)
    cfg = info["data_config"]
    console.print(
        Text(info["name"], style="bold")
        + Text(f"  features {info['num_features']}  parameters {info['num_params']:,}"),
        highlight=False,
    )
    console.print(
        f"input {cfg['input_size']}  mean {cfg['mean']}  std {cfg['std']}  interpolation {cfg['interpolation']}  "
        f"crop_pct {cfg.get('crop_pct')}",
        highlight=False,
    )
    table = Table(title="layer groups (input side first; the new head follows and learns fastest)")
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
@settings(**EXTRACTING)
def extract_command(
    data: DataArg,
    backbone: dict,
    split: dict,
    compute: dict,
    tracking: dict,
    seed: Seed = 0,
):
    """Run the frozen backbone over every image and cache the features."""
    from tlkit.runs.stages import run_extract

    _tracking(tracking)
    features, result = run_extract(
        data, _backbone(backbone, seed), split=_split(split, seed), compute=_compute(compute), run=_run(tracking)
    )
    how = "read from cache" if features.cached else "computed"
    n, seconds = len(features.X), result.details["seconds"]
    console.print(
        f"{n} x {features.X.shape[1]} features {how} in {seconds:.2f} s ({n / max(seconds, 1e-9):.0f} images/s), "
        f"key {features.key}"
    )
    _run_footer(result.run_id, model=False)


@app.command("baseline")
@command
@settings(baseline="baseline", **EXTRACTING)
def baseline_command(
    data: DataArg,
    baseline: dict,
    backbone: dict,
    split: dict,
    compute: dict,
    tracking: dict,
    seed: Seed = 0,
):
    """Fit a linear classifier on frozen features (C chosen on val) and report held-out metrics."""
    from tlkit.config import BackboneConfig
    from tlkit.runs.stages import run_baseline

    settings = build("BaselineConfig", baseline, seed=seed)
    pixels = settings.classifier == "pixels"
    backbone_config = BackboneConfig() if pixels else _backbone(backbone, seed)
    _tracking(tracking)
    result = run_baseline(
        data,
        backbone_config,
        settings,
        split=_split(split, seed),
        compute=_compute(compute),
        run=_run(tracking),
    )
    title = f"{result.details['model']} + {'svm' if pixels else settings.classifier} (C={result.details['C']:g})"
    console.print(_metrics_table(title, result.metrics, result.details["heldout_split"]))
    console.print(f"C chosen by: {result.details['selection']}", highlight=False)
    _run_footer(result.run_id)


Resume = Annotated[
    str | None, typer.Option(help="RUN_ID of an interrupted run: continue from its last checkpoint, same run.")
]


def _train(kind: str, data: str, options: dict, *, seed: int, resume: str | None, probe: bool = False) -> None:
    """pretrain / finetune; `options`: the command's settings groups (train, backbone, split, compute, tracking)."""
    from tlkit.runs.stages import run_train

    train = build("PretrainConfig" if kind == "pretrain" else "TrainConfig", options["train"], seed=seed)
    backbone, split = _backbone(options["backbone"], seed), _split(options["split"], seed)
    compute = _compute(options["compute"], batch_size=train.batch_size or 64)
    tracking = options["tracking"]
    _tracking(tracking)  # every option checked before anything touches MLflow
    result = run_train(
        data, backbone, train, split=split, compute=compute, run=_run(tracking), resume=resume, probe=probe
    )
    d = result.details
    kept = f"best epoch {d['best_epoch']}" if d["best_epoch"] is not None else f"last of {d['epochs_run']} epochs"
    precision = _PRECISION_NAMES.get(d["precision"], d["precision"])
    console.print(_metrics_table(f"{kind} ({train.strategy}, {precision}): {kept}", result.metrics, d["heldout_split"]))
    probe_score = d.get("probe_heldout_accuracy")
    if probe_score is not None and probe_score > result.metrics["heldout_accuracy"]:
        console.print(
            f"note: a linear SVM on this backbone's frozen features scores {probe_score:.4f} on the "
            f"{d['heldout_split']} split, above this fine-tune's {result.metrics['heldout_accuracy']:.4f}; "
            "`tlkit baseline` with the same data and weights gives you that model",
            highlight=False,
        )
    _run_footer(result.run_id)


@app.command("pretrain")
@command
@settings(train="pretrain", **{**TRAINING, "backbone": "pretrain-backbone"})
def pretrain_command(
    data: DataArg,
    train: dict,
    backbone: dict,
    split: dict,
    compute: dict,
    tracking: dict,
    seed: Seed = 0,
    resume: Resume = None,
):
    """Train a backbone end to end on a source dataset; reuse it later with --weights runs:/RUN_ID."""
    options = dict(train=train, backbone=backbone, split=split, compute=compute, tracking=tracking)
    _train("pretrain", data, options, seed=seed, resume=resume)


@app.command("finetune")
@command
@settings(train="finetune", **TRAINING)
def finetune_command(
    data: DataArg,
    train: dict,
    backbone: dict,
    split: dict,
    compute: dict,
    tracking: dict,
    seed: Seed = 0,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe/--no-probe",
            help="Also score a linear SVM on the frozen features (cached) and say if it beats the fine-tune.",
        ),
    ] = True,
    resume: Resume = None,
):
    """Fine-tune a backbone with a new head: discriminative learning rates and a freezing strategy."""
    options = dict(train=train, backbone=backbone, split=split, compute=compute, tracking=tracking)
    _train("finetune", data, options, seed=seed, resume=resume, probe=probe)


@app.command("lr-find")
@command
@settings(
    train=("finetune", ("lr_mult", "lrs", "groups", "batch_size", "augment", "hflip")),
    backbone="backbone",
    split="split",
    compute=("compute", ("precision", "num_workers")),
    tracking=("tracking", ("tracking_uri", "experiment")),
)
def lr_find_command(
    data: DataArg, train: dict, backbone: dict, split: dict, compute: dict, tracking: dict, seed: Seed = 0
):
    """Sweep learning rates (group ratios kept), log the loss-vs-LR plot, and suggest a head LR."""
    from tlkit.runs.stages import run_lr_find

    settings = build("TrainConfig", train, seed=seed, strategy="full")
    backbone_config, split_config = _backbone(backbone, seed), _split(split, seed)
    _tracking(tracking)
    result = run_lr_find(
        data,
        backbone_config,
        settings,
        split=split_config,
        compute=_compute({"devices": "auto", **compute}, batch_size=settings.batch_size or 64),
        run=_run(tracking),
    )
    console.print(
        f"suggested head learning rate: {result.metrics['suggested_lr']:.3g}  (plot: plots/lr_find.png in the run)"
    )
    _run_footer(result.run_id, model=False)


@app.command("tune")
@command
@settings(tune="tune", backbone="backbone", split="split", compute=("compute", ("-batch_size",)), tracking="tracking")
def tune_command(
    data: DataArg,
    tune: dict,
    backbone: dict,
    split: dict,
    compute: dict,
    tracking: dict,
    seed: Seed = 0,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the tune workers as tasks on a Ray cluster: auto, HOST:6379 or ray://HOST:10001 (needs pip "
            "install 'tlkit[ray]').",
        ),
    ] = None,
    ray_workers: Annotated[
        int,
        typer.Option(
            "--ray-workers",
            min=1,
            help="With --ray: tune workers on the one study, one core each (--workers is the DataLoader's).",
        ),
    ] = 2,
):
    """Search fine-tuning recipes (Optuna TPE, pruning), retrain the best and score it on held-out data."""
    from tlkit.config import TrainConfig
    from tlkit.pipelines.space import load_space

    settings = build("TuneConfig", tune)
    search = load_space(settings.space)  # every error of the space file before anything runs (Optuna not loaded)
    from tlkit.pipelines.tune import TuneJob  # imports Optuna

    job = TuneJob(
        data,
        _backbone(backbone, seed),
        search,
        base=TrainConfig(seed=seed),
        settings=settings,
        split=_split(split, seed),
        compute=_compute(compute),
        data_label=data,
    )
    _tracking(tracking)
    outcome = _tune_here(job, _run(tracking)) if ray is None else _tune_on_ray(job, _run(tracking), ray, ray_workers)
    counts = outcome.trials
    console.print(
        f"study {outcome.study} ({outcome.storage}): {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
        f"{counts['FAIL']} failed",
        highlight=False,
    )
    if outcome.best_params is not None:
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in outcome.best_params.items())
        console.print(
            f"best: trial {outcome.best_trial}, selection score {outcome.best_value:.4f}: {shown}",
            highlight=False,
            soft_wrap=True,
        )
    if outcome.final is None:
        console.print(f"not retrained here: {outcome.waiting}", highlight=False)
        _run_footer(outcome.parent_run_id, model=False)
        return
    final = outcome.final
    console.print(_metrics_table("best recipe, retrained", final.metrics, final.details.get("heldout_split", "test")))
    probe = final.details.get("probe_heldout_accuracy")
    if probe is not None:
        console.print(f"the frozen probe (linear SVM) on the same split: {probe:.4f}", highlight=False)
    console.print(f"reproduce it: {outcome.command}", highlight=False, soft_wrap=True)
    console.print(
        Text("MLflow study run ")
        + Text(outcome.parent_run_id, style="bold")
        + Text(f"  (model: runs:/{final.run_id}; browse with `tlkit ui`)"),
        highlight=False,
    )


def _trial_line(t) -> None:
    console.print(t.text(), highlight=False, soft_wrap=True)


def _tune_here(job, run):
    from tlkit.pipelines.tune import run_tune

    return run_tune(job, run=run, report=_trial_line, started=_STARTED)  # start-up counts too


def _tune_on_ray(job, run, address: str, workers: int):
    from dataclasses import replace

    from tlkit.core import tracking as mlflow_tracking
    from tlkit.pipelines.cluster import connected, run_tune_workers

    budget_s = job.settings.budget_s
    if budget_s is not None:  # the workers' clocks start later, elsewhere: the start-up here counts against the budget
        left = max(1.0, budget_s - (time.monotonic() - _STARTED))
        job = replace(job, settings=job.settings.model_copy(update={"budget": f"{left:.3f}s"}))
    run = replace(run, tracking_uri=mlflow_tracking.resolve_tracking_uri(run.tracking_uri))
    with connected(address) as cluster:
        outcomes = run_tune_workers(cluster, workers, job, run, mlflow_tracking.experiment_name())
    return next((o for o in outcomes if o.final is not None), outcomes[-1])


@app.command("predict")
@command
def predict_command(
    model: Annotated[
        str,
        typer.Argument(
            help="runs:/RUN_ID of a baseline, pretrain or finetune run, a model folder, or an exported MODEL.onnx "
            "(run on onnxruntime, without torch; no run is logged)."
        ),
    ],
    images: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    top_k: Annotated[int, typer.Option(help="Classes to show per image.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Write the predictions to this CSV.")] = None,
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
):
    """Class names and calibrated probabilities for images, preprocessed as in training (float32, the served model's
    numbers)."""
    _some_files(images)  # before torch, timm and MLflow load: a wrong path is said at once
    if model.endswith(".onnx"):  # the exported model alone: onnxruntime, no torch, no MLflow, no run
        from tlkit.core.files import write_csv
        from tlkit.review.predict import predict_onnx

        rows, skipped = predict_onnx(model, images, top_k=top_k)
        if out:
            write_csv(out, rows)
    else:
        from tlkit.runs.stages import run_predict

        _tracking(tracking_uri, experiment)
        rows, skipped, _ = run_predict(
            model, images, top_k=top_k, out=out, run=_run({"tracking_uri": tracking_uri, "run_name": run_name})
        )
    score = "probability"
    table = Table()
    for column in ("image", "rank", "class", score):
        table.add_column(column, justify="right" if column in ("rank", score) else "left")
    shown = rows[: 50 * top_k]
    for row in shown:
        table.add_row(printable(row["image"]), str(row["rank"]), printable(row["class"]), f"{row[score]:.4f}")
    console.print(table)
    if len(rows) > len(shown):
        console.print(f"... {len(rows) - len(shown)} more row(s){'' if out else '; pass --out FILE.csv for all'}")
    for path, why in skipped:
        errors.print(f"skipped {printable(path)}: {why}", highlight=False)
    if out:
        console.print(f"predictions written to {out}")


@app.command("evaluate")
@command
@settings(review=("evaluate", ("-eps",)), data_split="split", tracking="model-tracking")
def evaluate_command(
    model: Annotated[str, typer.Argument(help="runs:/RUN_ID of a baseline, pretrain or finetune run.")],
    data: DataArg,
    review: dict,
    data_split: dict,
    tracking: dict,
    eps: Annotated[
        list[str] | None,
        typer.Option(help="FGSM budgets as fractions of the pixel range: 0.01, 8/255 (repeatable)."),
    ] = None,
    seed: Seed = 0,
):
    """Score a saved model on a split: metrics, calibration, confusion matrices, top losses; TTA, maps, FGSM."""
    from tlkit.review.attack import parse_eps
    from tlkit.runs.evaluate import run_evaluate

    settings = build("EvaluateConfig", review, eps=parse_eps(eps) if eps else None)
    _tracking(tracking["tracking_uri"], tracking["experiment"], model)
    result = run_evaluate(model, data, settings, data_split=_split(data_split, seed), run=_run(tracking))
    m = result.metrics
    title = f"{model} on the {result.details['split']} split"
    table = Table(title=title, min_width=len(title) + 2)  # rich wraps a title to its table's width
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in m.items():
        if "." not in key or "fgsm" in key:  # per-class values are in the run
            table.add_row(key, f"{value:.4f}")
    console.print(table)
    pairs = ", ".join(f"{t}->{p} ({n})" for t, p, n in result.details["most_confused"]) or "none"
    console.print(printable(f"most confused (true->predicted): {pairs}"), highlight=False)
    console.print(f"the model's calibration: {result.details['calibration']}", highlight=False, soft_wrap=True)
    console.print(
        "in the run: predictions.csv, plots/top_losses.png, reliability.png, "
        f"confusion_matrix*.png{', explain/' if settings.explain else ''}",
        highlight=False,
    )
    _run_footer(result.run_id, model=False)


@app.command("explain")
@command
@settings(maps=("evaluate", ("method",)), tracking="model-tracking")
def explain_command(
    model: NetworkRef,
    images: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    maps: dict,
    tracking: dict,
    target: Annotated[str | None, typer.Option(help="Class to explain (default: the predicted one).")] = None,
    patch: Annotated[int, typer.Option(help="occlusion: side of the grey patch in input pixels.")] = 8,
    stride: Annotated[int, typer.Option(help="occlusion: step between patch positions.")] = 4,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs (image | map | overlay).")] = Path("explain"),
):
    """Where the network looks: a map per image (saliency, Grad-CAM or occlusion), beside the image."""
    from tlkit.runs.evaluate import run_explain

    _tracking(tracking["tracking_uri"], tracking["experiment"], model)
    method = maps["method"]
    result = run_explain(
        model, images, method=method, target=target, patch=patch, stride=stride, out=out, run=_run(tracking)
    )
    for path, why in result.details["skipped"]:
        errors.print(f"skipped {printable(path)}: {why}", highlight=False)
    console.print(
        f"{len(result.files)} {method} map(s) written to {out}/ and logged under explain/{method}", highlight=False
    )
    _run_footer(result.run_id, model=False)


@app.command("export")
@command
@settings(export="export")
def export_command(
    model: NetworkRef,
    export: dict,
    out: Annotated[Path, typer.Option(help="Folder for the model file and its JSON sidecar.")] = Path("export"),
    run_name: RunName = None,
    tracking_uri: TrackingUri = None,
    experiment: ModelExperiment = None,
):
    """Write the network to run without tlkit, with a JSON sidecar (classes, input size, mean, std, interpolation)."""
    from tlkit.runs.evaluate import run_export

    _tracking(tracking_uri, experiment, model)
    result = run_export(
        model,
        export["format"],
        out,
        run=_run({"tracking_uri": tracking_uri, "run_name": run_name}),
        force=export["force"],
    )
    console.print(f"written: {result.files[0]} and {result.files[1]}", highlight=False)
    if "max_abs_difference" in result.metrics:
        console.print(
            f"checked: outputs match PyTorch's on a batch within {result.metrics['max_abs_difference']:.2e}",
            highlight=False,
        )
    _run_footer(result.run_id, model=False)


@app.command("serve")
@command
def serve_command(
    model: Annotated[
        str, typer.Argument(help="runs:/RUN_ID of a baseline, pretrain or finetune run, or its model folder.")
    ],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5002,
    host: Annotated[
        str, typer.Option(help="Address to listen on; keep 127.0.0.1 unless you mean to serve other machines.")
    ] = "127.0.0.1",
    tracking_uri: TrackingUri = None,
):
    """Serve a saved model over HTTP (MLflow's scoring protocol), behind tlkit's request checks; Ctrl-C stops it."""
    from tlkit.core import tracking
    from tlkit.review.server import serve
    from tlkit.review.serving import limits

    if model.startswith(tracking.RUNS_PREFIX):
        run_id, path = tracking.parse_run_ref(model)
        folder = tracking.download_artifacts(run_id, path or "model", tracking_uri=tracking_uri)
    else:
        folder = Path(model)
    if not (folder / "MLmodel").is_file():
        raise TlkitError(
            f"{folder} holds no MLmodel file: name runs:/RUN_ID of a baseline, pretrain or finetune run, or the model "
            "folder inside one (mlruns/.../artifacts/model)"
        )
    console.print(f"serving {model} on http://{host}:{port}/invocations  (Ctrl-C stops it)", highlight=False)
    try:
        serve(str(folder), host=host, port=port, max_bytes=limits().max_bytes)
    except KeyboardInterrupt:  # uvicorn stops on Ctrl-C or SIGTERM, then raises the signal again: a clean stop
        pass
    console.print("server stopped", highlight=False)


@app.command("run")
@command
def run_command(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file, e.g. pipelines/quickstart.yaml.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: KEY.PATH=VALUE, e.g. stages.*.train.epochs=2 (repeatable)."),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Recompute every stage, even those whose inputs are unchanged.")
    ] = False,
    tracking_uri: TrackingUri = None,
    experiment: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment (default: the pipeline file's)."),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            help="Points (sweep point, seed) to run at once, each in its own process "
            "with its share of the cores (default: the file's jobs, else 1).",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the points as tasks on a Ray cluster: auto, HOST:6379 or ray://HOST:10001 "
            "(default: the file's ray.address; needs pip install 'tlkit[ray]').",
        ),
    ] = None,
):
    """Run a pipeline file: its stages in order, every sweep point and seed, as nested MLflow runs."""
    from tlkit.pipelines.sweep import plan_pipeline

    plan_pipeline(pipeline, set_)  # the file and every grid point checked before the stages' heavy imports
    from tlkit.pipelines.pipeline import print_summary, run_pipeline

    summary = run_pipeline(
        pipeline,
        overrides=set_,
        tracking_uri=tracking_uri,
        experiment=experiment,
        reuse=not fresh,
        jobs=jobs,
        ray=ray,
        console=console,
    )
    print_summary(summary, console)


@app.command("compare")
@command
def compare_command(
    experiment: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_EXPERIMENT_NAME", help="MLflow experiment whose runs to rank (default: tlkit)."),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option(help="Rank only the runs under this pipeline run (its id); the table is logged to it."),
    ] = None,
    metric: Annotated[
        str, typer.Option(help="Metric to rank by; per-epoch metrics count their best epoch.")
    ] = "heldout_accuracy",
    out: Annotated[Path, typer.Option(help="Folder for leaderboard.csv and leaderboard.png.")] = Path("compare"),
    tracking_uri: TrackingUri = None,
):
    """Leaderboard of runs: mean ± std over seeds, best first, with the settings that differ as columns."""
    from tlkit.runs.compare import compare, leaderboard_table

    board, files = compare(experiment=experiment, parent=parent, metric=metric, out=out, tracking_uri=tracking_uri)
    console.print(leaderboard_table(board))
    console.print(
        f"written: {', '.join(str(f) for f in files)}" + (f"; logged to run {parent} under compare/" if parent else ""),
        highlight=False,
    )


@app.command("ui")
@command
def ui_command(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Address to listen on; keep 127.0.0.1 unless you mean to share it.")
    ] = "127.0.0.1",
    experiment: Annotated[
        str | None, typer.Option(help="Experiment whose runs page to print (default: the one with the newest run).")
    ] = None,
    tracking_uri: TrackingUri = None,
):
    """Open the MLflow UI on the project's store (Ctrl-C stops it) and print the runs page to open."""
    from tlkit.core import tracking

    url = tracking.ui_url(f"http://{host}:{port}", experiment, tracking_uri=tracking_uri)
    console.print(
        f"MLflow UI on http://{host}:{port}  (store: {tracking.resolve_tracking_uri(tracking_uri)})", highlight=False
    )
    console.print(f"runs, best held-out accuracy first: {url}", highlight=False, soft_wrap=True)
    raise typer.Exit(tracking.serve_ui(host=host, port=port, tracking_uri=tracking_uri))


if __name__ == "__main__":
    app()
