"""Data + backbone + search space -> an Optuna study of fine-tuning recipes; the best one retrained and scored on
held-out data.

The study lives in Optuna's storage (SQLite beside
`mlflow.db` by default, any SQLAlchemy URL such as PostgreSQL to share it), so several processes or
machines can work on one study, and a study interrupted with Ctrl-C is resumed by the same command.

Honest selection: trials train on the training split and are scored on a *selection* split; the
held-out split is not in the data they are given at all. With train/val/test data the selection
split is val and test is held out; with train/val only, the selection split is carved out of train
and val is held out. The best recipe is then retrained once on train + selection, and its figure
on the held-out split is the one reported. Within a trial the schedule runs to its end (no epoch is
chosen on the selection split), and a trial's value is its last epoch's `val_score` (accuracy,
ties broken by lower loss; see finetune.selection_score).

Tracked: one parent MLflow run per study, one child run per trial (settings, validation curve,
COMPLETE or PRUNED), the best trial tagged, Optuna's plots on the parent, and a child run for the
retrained best recipe that holds the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.trial import TrialState

from tlkit.config import BackboneConfig, SplitConfig, TrainConfig
from tlkit.core import tracking
from tlkit.data.ingest import Manifest
from tlkit.errors import TlkitError
from tlkit.pipelines.space import SearchSpace, settings_for
from tlkit.pipelines.tune.job import TuneJob
from tlkit.pipelines.tune.selection import TuneSplits, tune_splits
from tlkit.pipelines.tune.studies import default_storage, open_storage, open_study, shown_url, wait_for_parent
from tlkit.pipelines.tune.trials import Budget, NoTrialToRun, Objective, TrialLine, counted_trials, recipe_label
from tlkit.runs.stages import RunOptions, StageResult, load_data, make_backbone, run_train

FINAL = "#final"  # suffix of the one-trial study whose trial is the retraining of the best recipe


@dataclass
class TuneOutcome:
    study: str
    storage: str
    parent_run_id: str
    trials: dict[str, int]  # state -> count
    best_params: dict | None = None
    best_value: float | None = None
    best_trial: int | None = None
    final: StageResult | None = None
    command: str | None = None
    waiting: str | None = None  # why this worker did not retrain the best recipe


def default_study_name(
    manifest: Manifest, backbone: BackboneConfig, space: SearchSpace, base: TrainConfig, *, selection: str
) -> str:
    """The same inputs give the same name, so running the same command again resumes the study."""
    payload = [
        manifest.fingerprint,
        manifest.split_settings,
        backbone.model_dump(mode="json"),
        space.digest,
        base.model_dump(mode="json"),
        selection,
    ]
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"tune-{backbone.model or 'run'}-{digest}"


def reproduce_command(data: str, backbone: BackboneConfig, split: SplitConfig, settings: TrainConfig) -> str:
    """The `tlkit finetune` command line that trains the final recipe (settings that differ from its defaults)."""
    argv = ["tlkit", "finetune", str(data)]
    if backbone.model:
        argv += ["--model", backbone.model]
    if backbone.weights:
        argv += ["--weights", backbone.weights]
    elif not backbone.pretrained:
        argv += ["--no-pretrained"]
    if backbone.img_size:
        argv += ["--img-size", str(backbone.img_size)]
    defaults = SplitConfig()
    for key in ("val", "test", "shots"):
        if getattr(split, key) != getattr(defaults, key):
            argv += [f"--{key}", str(getattr(split, key))]
    argv += ["--seed", str(settings.seed)]
    train_defaults = TrainConfig()
    for key, value in settings.model_dump().items():
        if key == "seed" or value == getattr(train_defaults, key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, float):
            argv += [flag, f"{value:.4g}"]
        elif value is not None:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(argv)


def _log_study_plots(study: optuna.Study) -> None:
    """Optuna's optimisation history and parameter importances, as PNGs on the parent run."""
    from optuna.visualization import matplotlib as plots

    from tlkit.core.metrics import close

    for name, draw in (
        ("optimization_history", plots.plot_optimization_history),
        ("param_importances", plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. importances of a single complete trial
            logging.getLogger("tlkit").warning(
                f"no {name.replace('_', ' ')} plot: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            )
            continue
        figure: Any = axes.figure if hasattr(axes, "figure") else axes[0].figure  # type: ignore[index]
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        tracking.log_figure(figure, f"plots/{name}.png")
        close(figure)


def _trial_counts(study: optuna.Study) -> dict[str, int]:
    counts = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    for t in study.get_trials(deepcopy=False):
        if t.state.name in counts and "over_budget" not in t.user_attrs:
            counts[t.state.name] += 1
    return counts


def run_tune(
    job: TuneJob,
    *,
    run: RunOptions = RunOptions(),
    report: Callable[[TrialLine], None] | None = None,
    started: float | None = None,
) -> TuneOutcome:
    """Search fine-tuning recipes with Optuna, then retrain the best one and score it on the held-out split.

    Args:
        job: the data, backbone, space, base recipe and the study's settings (`TuneConfig`: trials, over all
            workers, COMPLETE + PRUNED; the budget of this worker, trials and the retrain of the best recipe
            together, see `Budget`; the study's name, default derived from the inputs so that the same command
            resumes it; its storage, default SQLite optuna.db beside mlflow.db; the share of train carved out as
            the selection split when the data has no test split).
        run: the MLflow store, the study run's name, progress bars.
        report: called after each trial this worker ran.
        started: the `time.monotonic()` the budget counts from (the command's start; default: now).

    Returns:
        The study's outcome; `final` is the retrained best recipe (None when another worker retrains it).
    """
    with _optuna_quiet():
        plan = _plan(job, run.tracking_uri, time.monotonic() if started is None else started)
        with _study_run(plan, run) as parent:
            return _search_then_retrain(plan, run=run, report=report, parent=parent)


@contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Inside, Optuna says only errors: tlkit prints one line per trial and a failed trial's error once, which
    Optuna's warning would repeat with its traceback (110 lines for a Ctrl-C); its experimental-API warnings are
    about tlkit's code, not the user's study. The caller's settings are restored after."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


@dataclass
class _Plan:
    """A study ready to run: its data and splits, the backbone, the budget, the opened study, its run's params."""

    job: TuneJob
    manifest: Manifest
    splits: TuneSplits
    backbone: Any
    budget: Budget | None
    opened: _Opened
    params: dict


def _plan(job: TuneJob, tracking_uri: str | None, started: float) -> _Plan:
    """Check the inputs, carve the splits, set the budget's clock (from `started`, the command's start), and open
    the study (or join it)."""
    from tlkit.train.finetune import check_settings

    # Trials never train on their selection split nor stop on it; the final retrain decides use_val itself.
    base = job.base.model_copy(update={"use_val": "select", "patience": None})
    job = replace(job, base=base)
    manifest = load_data(job.data, job.split)
    splits = tune_splits(manifest, fraction=job.settings.selection, seed=base.seed)
    budget = None
    if job.settings.budget_s:
        retrained = len(splits.final.split("train")) + (
            len(splits.final.split("val")) if splits.final_use_val == "train" else 0
        )
        budget = Budget(job.settings.budget_s, retrained / max(1, len(splits.trials.split("train"))), start=started)
    backbone = make_backbone(job.backbone, tracking_uri=tracking_uri)
    check_settings(splits.trials, backbone, base)
    inputs = {
        "data": manifest.fingerprint,
        "model": backbone.name,
        "weights": backbone.weights,
        "space": job.space.digest,
        "base": base.model_dump(mode="json"),
        "heldout": splits.heldout,
    }
    name = job.settings.study or default_study_name(manifest, job.backbone, job.space, base, selection=splits.selection)
    storage = job.settings.storage or default_storage(tracking_uri)
    opened = _open(name, storage, inputs, seed=base.seed, trials=job.settings.trial_count)
    params = {
        "model": backbone.name,
        "weights": backbone.weights,
        "study": opened.name,
        "storage": shown_url(opened.url),
        "trials": job.settings.trial_count,
        "budget_s": job.settings.budget_s,
        "space": {d.name: d.describe() for d in job.space.dimensions},
        "space_source": job.space.source,
        "train": base.model_dump(exclude_unset=True),
        "heldout_split": splits.heldout,
        "selection.recipe": f"trial score on {splits.selection}",
    }
    return _Plan(job, manifest=manifest, splits=splits, backbone=backbone, budget=budget, opened=opened, params=params)


@contextmanager
def _study_run(plan: _Plan, run: RunOptions) -> Iterator[str]:
    """The study's MLflow run: started by the worker that created the study (its data, backbone and trial 0, the
    base recipe, logged), continued by the others."""
    opened = plan.opened
    if not opened.created:
        with tracking.start_run("tune", run_id=opened.parent_run_id) as parent:
            yield parent
        return
    name = run.named(f"tune {plan.backbone.name}: {opened.name}")
    tags = {"tlkit.study": opened.name, **tracking.RANKED}
    with tracking.start_run("tune", run_name=name, params=plan.params, tags=tags) as parent:
        start = plan.job.space.defaults(plan.job.base)
        if start:  # trial 0 is the base recipe (tlkit's defaults): the search can only end above it on selection
            opened.study.enqueue_trial(start, user_attrs={"default_recipe": True})
        opened.study.set_user_attr("tlkit", {"mlflow_run_id": parent, "inputs": opened.inputs})
        from tlkit.runs.stages import log_backbone, log_data

        log_data(plan.manifest)
        log_backbone(plan.backbone)
        yield parent


def _search_then_retrain(
    plan: _Plan, *, run: RunOptions, report: Callable[[TrialLine], None] | None, parent: str
) -> TuneOutcome:
    """This worker's trials, then (once the study has all of its trials) the best recipe retrained, by one worker."""
    from tlkit.train.finetune import with_resolved_defaults

    job, opened, splits, trials = plan.job, plan.opened, plan.splits, plan.job.settings.trial_count
    objective = Objective(
        opened.name, job=job, splits=splits, backbone=plan.backbone, trials=trials, report=report, budget=plan.budget
    )
    _optimise(opened.study, objective, trials)
    outcome = TuneOutcome(opened.name, shown_url(opened.url), parent, _trial_counts(opened.study))
    best = _best_when_done(opened.study, outcome, trials)
    if best is None:
        return outcome
    values = job.space.sample(optuna.trial.FixedTrial(best.params))
    if "scaled_epochs" in best.user_attrs:  # the recipe as the budget scaled it
        values["epochs"] = best.user_attrs["scaled_epochs"]
    final_settings = settings_for(values, job.base).model_copy(update={"use_val": splits.final_use_val})
    outcome.command = reproduce_command(  # with the epochs and batch size the retrain resolves to, named
        job.data_label or str(getattr(job.data, "source", job.data)),
        job.backbone,
        job.split,
        with_resolved_defaults(final_settings, splits.final),
    )
    final = _retrain_once(opened, splits=splits, job=job, settings=final_settings, run=run)
    if final is None:
        outcome.waiting = "another worker is retraining the best recipe"
        return outcome
    outcome.final = final
    if not final.details.get("reused"):  # a study finished before: its runs hold everything already
        named = run.run_name is None and opened.created  # named for what it found, now that it is known
        _log_outcome(opened.study, outcome, best, plan.backbone.name if named else None)
    return outcome


@dataclass
class _Opened:
    """A study opened in its storage: created here, or joined (with the MLflow run its creator started)."""

    name: str
    url: str
    rdb: Any
    study: optuna.Study
    created: bool
    inputs: dict
    parent_run_id: str | None = None


def _open(name: str, url: str, inputs: dict, *, seed: int, trials: int | None) -> _Opened:
    """Open the study, or join it: then wait for its creator's MLflow run, and refuse one started with other inputs."""
    rdb = open_storage(url)
    optuna_study, created = open_study(name, rdb, seed=seed, n_trials=trials)
    if created:
        return _Opened(name, url=url, rdb=rdb, study=optuna_study, created=True, inputs=inputs)
    record = wait_for_parent(optuna_study)
    differs = [k for k, v in inputs.items() if record["inputs"].get(k) != v]
    if differs:
        raise TlkitError(
            f"study {name!r} in {shown_url(url)} was started with other {', '.join(differs)}; "
            "run it with the same inputs, or name a new study with --study"
        )
    return _Opened(
        name, url=url, rdb=rdb, study=optuna_study, created=False, inputs=inputs, parent_run_id=record["mlflow_run_id"]
    )


def _optimise(study: optuna.Study, objective: Objective, trials: int | None) -> None:
    """This worker's trials: those the study still lacks (a resumed study runs only those), or until the budget."""
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    left = None if trials is None else trials - len(study.get_trials(deepcopy=False, states=finished))
    if left is None or left > 0:
        stop_at_limit = [optuna.study.MaxTrialsCallback(trials, states=finished)] if trials is not None else []
        study.optimize(objective, n_trials=left, catch=(NoTrialToRun,), callbacks=stop_at_limit, gc_after_trial=True)


def _best_when_done(study: optuna.Study, outcome: TuneOutcome, trials: int | None) -> optuna.trial.FrozenTrial | None:
    """The best trial, once the study has all its trials; else None, with why in `outcome.waiting`."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        if outcome.trials["RUNNING"]:
            outcome.waiting = "no trial has completed yet; other workers are still running trials"
            return None
        raise TlkitError(
            f"study {outcome.study!r}: no trial completed ({outcome.trials['PRUNED']} pruned, "
            f"{outcome.trials['FAIL']} failed); give more --trials or widen the search space"
        )
    best = study.best_trial
    outcome.best_params, outcome.best_value, outcome.best_trial = dict(best.params), best.value, best.number
    done = outcome.trials["RUNNING"] == 0 and (
        trials is None or outcome.trials["COMPLETE"] + outcome.trials["PRUNED"] >= trials
    )
    if done:
        return best
    outcome.waiting = (
        f"{outcome.trials['RUNNING']} trial(s) still running in other workers; the last one to finish "
        "retrains the best recipe"
        if outcome.trials["RUNNING"]
        else "the study has not had all its trials; run the same command again to continue it"
    )
    return None


def _log_outcome(study: optuna.Study, outcome: TuneOutcome, best: optuna.trial.FrozenTrial, model: str | None) -> None:
    """The study run's record of what it found: tags, the best params, metrics, command, plots, trials table; renamed
    after its best recipe when `model` (its backbone's name) is given."""
    final = outcome.final
    assert final is not None  # called once the best recipe is retrained
    tracking.set_run_tags(best.user_attrs["mlflow_run_id"], {"tlkit.best_trial": "true"})
    tracking.set_tags({"tlkit.best_trial_run": best.user_attrs["mlflow_run_id"], "tlkit.final_run": final.run_id})
    tracking.log_params({"best." + k: v for k, v in best.params.items()})
    tracking.log_metrics(
        {
            **final.metrics,
            **{
                k: v
                for k, v in final.details.items()
                if k in ("probe_heldout_accuracy", "finetune_heldout_accuracy") and v is not None
            },
            "best_selection_score": float(best.value or 0.0),  # a complete trial has a value
            "best_trial": best.number,
            **{f"trials_{k.lower()}": v for k, v in outcome.trials.items() if k != "RUNNING"},
            "seconds": _study_seconds(study),
        }
    )
    tracking.log_text(str(outcome.command) + "\n", "best_command.txt")
    if model is not None:
        counted = outcome.trials["COMPLETE"] + outcome.trials["PRUNED"]
        tracking.set_tags({"mlflow.runName": f"tune {model}: {counted} trials, best {recipe_label(best.params)}"})
    _log_study_plots(study)
    tracking.log_text(_trials_table(study), "trials.tsv")


def _study_seconds(study: optuna.Study) -> float:
    """Wall time from the study's first trial until now (all workers together)."""
    starts = [t.datetime_start.timestamp() for t in study.get_trials(deepcopy=False) if t.datetime_start]
    return time.time() - min(starts) if starts else 0.0


def _trials_table(study: optuna.Study) -> str:
    keys = sorted({k for t in study.trials for k in t.params})
    lines = ["\t".join(["number", "state", "value", *keys, "mlflow_run_id"])]
    for t in study.trials:
        if "over_budget" in t.user_attrs:
            continue
        lines.append(
            "\t".join(
                [
                    str(t.number),
                    t.state.name,
                    "" if t.value is None else f"{t.value:.4f}",
                    *(str(t.params.get(k, "")) for k in keys),
                    t.user_attrs.get("mlflow_run_id", ""),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _retrain_once(
    opened: _Opened, *, splits: TuneSplits, job: TuneJob, settings: TrainConfig, run: RunOptions
) -> StageResult | None:
    """Retrain the best recipe on train + selection and score it on the held-out split, once per study.

    The retraining is the single trial of a companion study (`NAME#final`): Optuna gives a trial number
    to exactly one worker first, failed trials (Ctrl-C) are redone by the next run, and a crashed
    worker's trial is failed by heartbeat. Returns None when another worker has it.
    """
    study, storage = opened.study, opened.rdb
    marker_name = study.study_name + FINAL
    try:
        marker = optuna.create_study(study_name=marker_name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        marker = optuna.load_study(study_name=marker_name, storage=storage)
    finished = marker.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if finished:  # retrained before (a resumed or repeated command): report that run
        run_id = finished[0].user_attrs["mlflow_run_id"]
        record = tracking.get_run(run_id, run.tracking_uri)
        return StageResult(
            stage="finetune",
            run_id=run_id,
            metrics={k: v for k, v in record.data.metrics.items() if k.startswith("heldout_")},
            model_uri=f"runs:/{run_id}",
            details={
                "probe_heldout_accuracy": record.data.metrics.get("probe_heldout_accuracy"),
                "heldout_split": splits.heldout,
                "reused": True,
            },
        )
    result: dict = {}

    def retrain(trial: optuna.Trial) -> float:
        if sum(t.number < trial.number for t in counted_trials(marker)) >= 1:
            marker.stop()
            trial.set_user_attr("over_budget", True)
            raise NoTrialToRun("another worker retrains the best recipe")
        try:
            # ranked through its study's run, which carries the same figures
            with tracking.tagging(
                {"tlkit.role": "tune-final", "tlkit.study": study.study_name, "tlkit.ranked": "false"}
            ):
                stage = run_train(
                    splits.final,
                    job.backbone,
                    settings,
                    compute=job.compute,
                    run=replace(run, run_name="best recipe"),
                    score_probe=True,
                )
        except SystemExit as stop:
            raise KeyboardInterrupt from stop
        trial.set_user_attr("mlflow_run_id", stage.run_id)
        result["stage"] = stage
        return stage.metrics["heldout_accuracy"]

    marker.optimize(retrain, n_trials=1, catch=(NoTrialToRun,))
    return result.get("stage")
