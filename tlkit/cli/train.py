"""`tlkit extract`, `baseline`, `pretrain`, `finetune`, `lr-find` and `tune`: the commands that make a model."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.text import Text

from tlkit.cli.apps import STARTED, app
from tlkit.cli.common import (
    EXTRACTING,
    TRAINING,
    DataArg,
    ExtractLayers,
    Resume,
    Seed,
    backbone_settings,
    compute_settings,
    run_options,
    split_settings,
    use_tracking,
)
from tlkit.cli.options import build, settings
from tlkit.cli.output import PRECISION_NAMES, console, metrics_table, run_footer
from tlkit.cli.process import command


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
    layers: ExtractLayers = "last",
):
    """Run the frozen backbone over every image and cache the features."""
    from tlkit.runs.stages import run_extract

    use_tracking(tracking)
    features, result = run_extract(
        data,
        backbone_settings(backbone, seed),
        split=split_settings(split, seed),
        compute=compute_settings(compute),
        run=run_options(tracking),
        layers=layers,
    )
    how = "read from cache" if features.cached else "computed"
    n, seconds = len(features.X), result.details["seconds"]
    which = " (every layer's)" if layers == "all" else ""
    rate = n / max(seconds, 1e-9)
    console.print(
        f"{n} x {features.X.shape[1]} features{which} {how} in {seconds:.2f} s ({rate:.0f} images/s), "
        f"key {features.key}"
    )
    run_footer(result.run_id, model=False)


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

    baseline_config = build("BaselineConfig", baseline, seed=seed)
    pixels = baseline_config.classifier == "pixels"
    backbone_config = BackboneConfig() if pixels else backbone_settings(backbone, seed)
    use_tracking(tracking)
    result = run_baseline(
        data,
        backbone_config,
        baseline_config,
        split=split_settings(split, seed),
        compute=compute_settings(compute),
        run=run_options(tracking),
    )
    model = result.details["model"] + (" (all layers)" if result.details["layers"] == "all" else "")
    title = f"{model} + {'svm' if pixels else baseline_config.classifier} (C={result.details['C']:g})"
    console.print(metrics_table(title, result.metrics, result.details["heldout_split"]))
    console.print(f"C chosen by: {result.details['selection']}", highlight=False)
    run_footer(result.run_id)


def _train(kind: str, data: str, options: dict, *, seed: int, resume: str | None, score_probe: bool = False) -> None:
    """pretrain / finetune; `options`: the command's settings groups (train, backbone, split, compute, tracking)."""
    from tlkit.runs.stages import run_train

    train = build("PretrainConfig" if kind == "pretrain" else "TrainConfig", options["train"], seed=seed)
    backbone, split = backbone_settings(options["backbone"], seed), split_settings(options["split"], seed)
    compute = compute_settings(options["compute"], batch_size=train.batch_size or 64)
    tracking = options["tracking"]
    use_tracking(tracking)  # every option checked before anything touches MLflow
    result = run_train(
        data,
        backbone,
        train,
        split=split,
        compute=compute,
        run=run_options(tracking),
        resume=resume,
        score_probe=score_probe,
    )
    d = result.details
    epoch = f"best epoch {d['best_epoch']}" if d["best_epoch"] is not None else f"last of {d['epochs_run']} epochs"
    precision = PRECISION_NAMES.get(d["precision"], d["precision"])
    title = f"{kind} ({train.strategy}, {precision}): {epoch}"
    if d.get("kept") == "probe":
        reads = (
            "every layer of the pretrained backbone" if d.get("probe_layers") == "all" else "the pretrained features"
        )
        title = f"{kind}: its frozen probe ({d['probe_classifier']} on {reads}), kept"
    elif d.get("kept") == "ensemble":
        title = f"{title}, averaged with its frozen probe ({d['probe_classifier']}): the ensemble, kept"
    console.print(metrics_table(title, result.metrics, d["heldout_split"]))
    if "probe_heldout_accuracy" in d:
        console.print(choice_line(d), highlight=False)
    run_footer(result.run_id)


def choice_line(details: dict) -> str:
    """Which model the run delivers, why, and the other candidates' held-out figures."""
    kept, scores = details["kept"], details.get("selection_scores")
    probe = {"svm": "linear SVM", "logreg": "logistic regression"}[details.get("probe_classifier", "svm")]
    frozen = "every layer's frozen features" if details.get("probe_layers") == "all" else "the frozen features"
    names = {
        "finetune": "the fine-tune",
        "probe": f"the {probe} on {frozen}",
        "ensemble": f"the ensemble of the fine-tune and the {probe} on {frozen}",
    }
    short = {"finetune": "fine-tune", "probe": "probe", "ensemble": "ensemble"}
    if scores:
        why = f"on {details['choice_split']}: " + ", ".join(f"{short[k]} {v:.4f}" for k, v in scores.items())
    elif details["keep"] != "best":
        why = f"--keep {details['keep']}"
    else:
        why = "no training image to hold back for the choice: every class has one"
    others = [k for k in names if k != kept and f"{k}_heldout_accuracy" in details]
    figures = ", ".join(f"the {short[k]} {details[f'{k}_heldout_accuracy']:.4f}" for k in others)
    again = f", then trained again on {details['refit']}" if details.get("refit") else ""
    return f"kept {names[kept]} ({why}{again}); on the {details['heldout_split']} split: {figures}"


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
    score_probe: Annotated[
        bool,
        typer.Option(
            "--probe/--no-probe",
            help="Also fit the linear probes on the frozen features (cached); --keep chooses between them and the "
            "fine-tune.",
        ),
    ] = True,
    resume: Resume = None,
):
    """Fine-tune a backbone with a new head: discriminative learning rates and a freezing strategy."""
    options = dict(train=train, backbone=backbone, split=split, compute=compute, tracking=tracking)
    _train("finetune", data, options, seed=seed, resume=resume, score_probe=score_probe)


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

    train_config = build("TrainConfig", train, seed=seed, strategy="full")
    backbone_config, split_config = backbone_settings(backbone, seed), split_settings(split, seed)
    use_tracking(tracking)
    result = run_lr_find(
        data,
        backbone_config,
        train_config,
        split=split_config,
        compute=compute_settings({"devices": "auto", **compute}, batch_size=train_config.batch_size or 64),
        run=run_options(tracking),
    )
    console.print(
        f"suggested head learning rate: {result.metrics['suggested_lr']:.3g}  (plot: plots/lr_find.png in the run)"
    )
    run_footer(result.run_id, model=False)


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

    tune_config = build("TuneConfig", tune)
    search = load_space(tune_config.space)  # every error of the space file before anything runs (Optuna not loaded)
    from tlkit.pipelines.tune import TuneJob  # imports Optuna

    job = TuneJob(
        data,
        backbone_settings(backbone, seed),
        search,
        base=TrainConfig(seed=seed),
        settings=tune_config,
        split=split_settings(split, seed),
        compute=compute_settings(compute),
        data_label=data,
    )
    use_tracking(tracking)
    outcome = (
        _tune_here(job, run_options(tracking))
        if ray is None
        else _tune_on_ray(job, run_options(tracking), ray, ray_workers)
    )
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
        run_footer(outcome.parent_run_id, model=False)
        return
    final = outcome.final
    console.print(metrics_table("best recipe, retrained", final.metrics, final.details.get("heldout_split", "test")))
    if "probe_heldout_accuracy" in final.details:
        console.print(choice_line(final.details), highlight=False)
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

    return run_tune(job, run=run, report=_trial_line, started=STARTED)  # start-up counts too


def _tune_on_ray(job, run, address: str, workers: int):
    from dataclasses import replace

    from tlkit.core import tracking as mlflow_tracking
    from tlkit.pipelines.cluster import connected, run_tune_workers

    budget_s = job.settings.budget_s
    if budget_s is not None:  # the workers' clocks start later, elsewhere: the start-up here counts against the budget
        left = max(1.0, budget_s - (time.monotonic() - STARTED))
        job = replace(job, settings=job.settings.model_copy(update={"budget": f"{left:.3f}s"}))
    run = replace(run, tracking_uri=mlflow_tracking.resolve_tracking_uri(run.tracking_uri))
    with connected(address) as cluster:
        outcomes = run_tune_workers(
            cluster, workers=workers, job=job, run=run, experiment=mlflow_tracking.experiment_name()
        )
    return next((o for o in outcomes if o.final is not None), outcomes[-1])
