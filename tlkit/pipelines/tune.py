"""Data + backbone + search space -> an Optuna study of fine-tuning recipes; the best one retrained and scored on
held-out data.

The only module that imports Optuna. The study lives in Optuna's storage (SQLite beside
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

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shlex
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import optuna
from optuna.trial import TrialState

from tlkit.config import BackboneConfig, ComputeConfig, SplitConfig, TrainConfig, TuneConfig
from tlkit.core import runtime, tracking
from tlkit.data.ingest import Manifest, groups_by_class, records_fingerprint
from tlkit.errors import TlkitError
from tlkit.pipelines.space import SearchSpace, settings_for
from tlkit.runs.stages import RunOptions, StageResult, load_data, make_backbone, run_train

SELECTION_FRACTION = TuneConfig().selection  # of each class's training images, when the data has no test split
HEARTBEAT_S = 30  # a worker's running trial is refreshed this often ...
GRACE_S = 120  # ... and failed by the next worker after this long without news (a crashed process)
PRUNE_WARMUP_PCT = 30  # no trial is pruned before 30 % of its schedule: onecycle warms up for 25 %
FINAL = "#final"  # suffix of the one-trial study whose trial is the retraining of the best recipe
STORAGE_ATTEMPTS = 5  # tries at opening a study whose storage another worker is creating at the same moment


# ----------------------------------------------------------------------------------------------
# Splits


@dataclass
class TuneSplits:
    """What trials see, and what the best recipe retrains on and is scored on."""

    trials: Manifest  # train + selection (as its "val" split); no held-out image is in it
    final: Manifest  # the data of the final retrain
    final_use_val: str  # "train": val joins train and test is held out; "select": val is held out
    heldout: str  # the split that the reported figure is on
    selection: str  # what the selection split is, in words


def _carve(records: list, fraction: float, seed: int) -> set[str]:
    """Paths of about `fraction` of each class's training images (at least one of a class with two or more),
    identical images kept together."""
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for groups in groups_by_class([(r.label, r.sha256, r.path) for r in records]).values():
        if len(groups) < 2:
            continue
        n = min(len(groups) - 1, max(1, round(fraction * len(groups))))
        for i in rng.permutation(len(groups))[:n]:
            chosen.update(groups[i])
    return chosen


def tune_splits(manifest: Manifest, *, fraction: float = SELECTION_FRACTION, seed: int = 0) -> TuneSplits:
    """The selection split that trials are scored on, and the held-out split they never see."""
    train, val, test = (manifest.split(s) for s in ("train", "val", "test"))
    if not train:
        raise TlkitError("the training split is empty; ingest with smaller --val/--test or give a train/ folder")
    if test:
        if not val:
            raise TlkitError(
                "tune scores trials on the val split and reports on test, but this data has no val split; ingest with "
                "--val > 0"
            )
        records = [r for r in manifest.records if r.split != "test"]
        trials = replace(
            manifest,
            records=records,
            fingerprint=records_fingerprint(records),
            split_settings={**manifest.split_settings, "tune": "test left out"},
        )
        return TuneSplits(
            trials=trials, final=manifest, final_use_val="train", heldout="test", selection="the val split"
        )
    if not val:
        raise TlkitError(
            "tune needs a held-out split to report on and this data has only train; ingest with --val or --test > 0"
        )
    selected = _carve(train, fraction, seed)
    if not selected:
        raise TlkitError(
            "too few training images to carve a selection split out of train (a class needs 2 or more); add images or "
            "a test split"
        )
    records = [replace(r, split="val") if r.path in selected else r for r in train]
    trials = replace(
        manifest,
        records=records,
        fingerprint=records_fingerprint(records),
        split_settings={
            **manifest.split_settings,
            "tune": f"selection = {fraction:.0%} of train (seed {seed}); val left out",
        },
    )
    return TuneSplits(
        trials=trials,
        final=manifest,
        final_use_val="select",
        heldout="val",
        selection=f"{len(selected)} images ({fraction:.0%} of each class) carved out of train",
    )


# ----------------------------------------------------------------------------------------------
# Storage and study


def default_storage(tracking_uri: str | None = None) -> str:
    """SQLite `optuna.db` beside a SQLite tracking store's database, else in the working directory."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else Path.cwd()
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def shown_url(url: str) -> str:
    """A storage URL without its password, for logs and params."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats (a crashed worker's trial is failed, not left running forever)."""
    kwargs: dict = {}
    shown = shown_url(url)  # as the user wrote it, without the password
    if (
        url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg")
        and not importlib.util.find_spec("psycopg2")
    ):
        # the driver tlkit[postgres] installs, whatever SQLAlchemy's default
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable server is an error in seconds, not a hang
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 60}  # several local workers take turns writing
    try:
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
                )
            except Exception as err:
                # Workers started together on a new database race to create Optuna's tables ("duplicate key value
                # violates unique constraint", seen in tests/test_tune_postgres.py): the loser finds them made.
                if attempt + 1 == STORAGE_ATTEMPTS or not any(
                    word in str(err) for word in ("duplicate key", "already exists", "UniqueViolation")
                ):
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")
    except ModuleNotFoundError as err:
        raise TlkitError(
            f"storage {shown} needs the Python package {err.name!r}; pip install 'tlkit[postgres]' (psycopg) for "
            "PostgreSQL"
        ) from None
    except Exception as err:  # sqlalchemy's errors: bad URL, server down, wrong password
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TlkitError(f"cannot open Optuna storage {shown}: {line}") from None


def _sampler(seed: int, n_trials: int | None) -> optuna.samplers.TPESampler:
    # TPE starts modelling after n_startup_trials random ones: 10 by default, two thirds of a 15-trial study.
    startup = max(3, min(10, (n_trials or 30) // 3))
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True
    )


def pruner() -> optuna.pruners.BasePruner:
    """The median pruner every tune uses. Its steps are percent of a trial's schedule, so trials of 5 and 20 epochs
    are compared at the same point of their schedules."""
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=PRUNE_WARMUP_PCT)


def open_study(name: str, storage, *, seed: int, n_trials: int | None) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when another worker (or an earlier run) made it. Returns (study, created).

    Creation is atomic in the storage (a unique study name), so among workers started together exactly
    one creates it, and that one creates the MLflow parent run too. Other workers draw other random
    trials (their sampler seed differs).
    """
    try:
        return optuna.create_study(
            study_name=name, storage=storage, direction="maximize", sampler=_sampler(seed, n_trials), pruner=pruner()
        ), True
    except optuna.exceptions.DuplicatedStudyError:
        worker_seed = seed + 1 + int.from_bytes(os.urandom(2), "little")
        return optuna.load_study(
            study_name=name, storage=storage, sampler=_sampler(worker_seed, n_trials), pruner=pruner()
        ), False


def _wait_for_parent(study: optuna.Study, timeout_s: float = 120.0) -> dict:
    """The study's tlkit record, written by the worker that created it (a moment after creating the study)."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = study.user_attrs.get("tlkit")
        if record:
            return record
        if time.monotonic() > deadline:
            raise TlkitError(
                f"study {study.study_name!r} exists but its creator never recorded its MLflow run; start over with "
                "another --study name"
            )
        time.sleep(1.0)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)


# ----------------------------------------------------------------------------------------------
# Trials


class PruningCallback(L.Callback):
    """Reports the selection split's `val_score` after each epoch (step: percent of the schedule) and
    stops a trial the pruner judges hopeless at the end of that epoch (Optuna's Lightning pruning
    callback does the same; stopping rather than raising lets the epoch's metrics reach MLflow)."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial
        self.pruned_at: int | None = None
        self.last_score: float | None = None
        self.epochs = 0

    def on_validation_end(self, trainer: L.Trainer, module) -> None:
        score = trainer.callback_metrics.get("val_score")
        if score is None or trainer.sanity_checking:
            return
        self.last_score = float(score)
        self.epochs = trainer.current_epoch + 1
        step = round(100 * self.epochs / (trainer.max_epochs or 1))
        self.trial.report(self.last_score, step)
        if self.epochs < (trainer.max_epochs or 0) and self.trial.should_prune():
            self.pruned_at = self.epochs
            trainer.should_stop = True


class Budget:
    """The wall-clock budget of one worker's tune: its trials and the retrain of the best recipe together.

    The retrain's length is known from the trials: seconds per epoch (measured in the trial) x its epochs x the
    retrain's share of images over a trial's, plus its fixed costs (the trial's own setup time, twice: the retrain
    also fits the probe and logs the model, and a few seconds more). That much time is kept back for it: a trial
    is cut at the end of the epoch after which the retrain of the best recipe so far (or of this trial) would no
    longer fit, and no trial starts that could not run two epochs. So the whole command ends within the budget
    plus about one epoch.
    """

    MARGIN = 1.15  # on the epochs: the retrain's loader and batches are not exactly the trial's
    FIXED_S = 3.0  # logging the model, plots and calibration, beyond what a trial does

    def __init__(self, seconds: float, final_share: float, *, start: float | None = None):
        self.final_share = final_share
        self.deadline = (start if start is not None else time.monotonic()) + seconds
        self.best_reserve = 0.0  # the retrain of the best complete trial so far
        self.epoch_seconds: list[float] = []  # one per trial: its seconds per epoch

    def retrain_seconds(self, epoch_seconds: float, epochs: int, setup_seconds: float) -> float:
        return epoch_seconds * epochs * self.final_share * self.MARGIN + 2 * setup_seconds + self.FIXED_S

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def room_for_a_trial(self) -> bool:
        typical = float(np.median(self.epoch_seconds)) if self.epoch_seconds else 0.0
        return self.left() - self.best_reserve > 2 * typical


class DeadlineCallback(L.Callback):
    """Stops a trial at the end of the epoch after which the budget would not also hold the retrain."""

    def __init__(self, budget: Budget, epochs: int):
        self.budget, self.epochs = budget, epochs
        self.created = self.started = time.monotonic()
        self.cut_at: int | None = None
        self.per_epoch = 0.0
        self.setup_s = 0.0  # not `setup`: a Lightning callback hook of that name

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        self.started = time.monotonic()
        self.setup_s = self.started - self.created  # model, loaders, the first batches decoded

    def reserve(self, epochs: int) -> float:
        return self.budget.retrain_seconds(self.per_epoch, epochs, self.setup_s)

    def on_validation_end(self, trainer: L.Trainer, module) -> None:
        if trainer.sanity_checking:
            return
        done = trainer.current_epoch + 1
        self.per_epoch = (time.monotonic() - self.started) / done
        # one more epoch, and then the retrain of the best recipe so far, or of this one at that length, must still fit
        reserve = max(self.budget.best_reserve, self.reserve(done + 1))
        if done < (trainer.max_epochs or 0) and self.budget.left() - self.per_epoch < reserve:
            self.cut_at = done
            trainer.should_stop = True


class _NoTrialToRun(Exception):
    """A trial Optuna started that this worker must not run: the study has all its trials, the budget has no room
    for one more and the retrain, or (the retrain's marker trial) another worker retrains the best recipe. Optuna
    records it FAILED and the worker stops asking for more."""


def _counted(study: optuna.Study) -> list:
    """Trials that count towards --trials: finished, pruned, or running/waiting now (failed ones are redone)."""
    return study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    )


@dataclass
class TrialLine:
    """What the caller is told after each trial."""

    number: int
    state: str
    value: float | None
    accuracy: float | None
    params: dict
    seconds: float
    epochs: int
    max_epochs: int
    done: int
    total: int | None
    note: str = ""

    def text(self, *, settings: bool = True) -> str:
        """'trial 3 [4/15]: selection accuracy 0.9123  (41 s)  lr=0.001 …', as the CLI and pipelines print it."""
        of = f"/{self.total}" if self.total else ""
        if self.state == "PRUNED":
            how = f"pruned after epoch {self.epochs}/{self.max_epochs}, selection score {self.value:.4f}"
        else:
            how = f"selection accuracy {self.accuracy:.4f}"
        line = f"trial {self.number} [{self.done}{of}]: {how}  ({self.seconds:.0f} s)"
        if settings:
            line += "  " + " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()
            )
        return line + (f"  ({self.note})" if self.note else "")


class Objective:
    """One trial: sample settings, fine-tune on the trial data with pruning, log a child run, return the score."""

    def __init__(
        self,
        study_name: str,
        *,
        job: TuneJob,
        splits: TuneSplits,
        backbone,
        trials: int | None,
        report: Callable[[TrialLine], None] | None,
        budget: Budget | None = None,
    ):
        self.study_name, self.space, self.base, self.splits = study_name, job.space, job.base, splits
        self.backbone, self.compute, self.limit, self.report = backbone, job.compute, trials, report
        self.budget = budget

    def __call__(self, trial: optuna.Trial) -> float:
        from tlkit.train.callbacks import MetricsCallback
        from tlkit.train.finetune import FitOptions, train_classifier

        study = trial.study
        self._check_room(trial)
        values = self.space.sample(trial)
        settings = settings_for(values, self.base)
        start = time.perf_counter()
        pruning = PruningCallback(trial)
        deadline = DeadlineCallback(self.budget, settings.epochs) if self.budget is not None else None
        # every trial starts from the same weights
        backbone = replace(self.backbone, model=copy.deepcopy(self.backbone.model))
        tags = {"tlkit.study": self.study_name, "tlkit.trial": str(trial.number)}
        with tracking.start_run(
            "trial",
            run_name=f"trial {trial.number} ({_recipe_label(values)})",
            params={"train": settings.model_dump()},
            tags=tags,
        ) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which process ran it
            try:
                fit = FitOptions(
                    callbacks=[MetricsCallback(run_id), pruning, *([deadline] if deadline else [])],
                    calibrated=False,
                    progress=runtime.progress_mode() == "plain",  # epoch lines in a log; no bars between trial lines
                    val_every_epoch=True,  # the selection split: the pruner reads it every epoch
                )
                result = train_classifier(self.splits.trials, backbone, settings, compute=self.compute, fit=fit)
            # Lightning turns Ctrl-C into SystemExit: Optuna marks a KeyboardInterrupt's trial FAIL
            except SystemExit as stop:
                raise KeyboardInterrupt from stop
            note = (
                self._keep_to_budget(
                    trial,
                    deadline=deadline,
                    pruning=pruning,
                    epochs=settings.epochs,
                    accuracy=result.metrics["heldout_accuracy"],
                )
                if deadline
                else ""
            )
            state = "PRUNED" if pruning.pruned_at is not None else "COMPLETE"
            accuracy = result.metrics["heldout_accuracy"]  # the trial data's held-out split is the selection split
            tracking.set_tags({"tlkit.trial_state": state})
            tracking.log_metrics(
                {
                    "selection_accuracy": accuracy,
                    "selection_score": accuracy if pruning.last_score is None else pruning.last_score,
                    "epochs_run": pruning.epochs,
                    "seconds": time.perf_counter() - start,
                }
            )
        if self.report:
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) + 1
            self.report(
                TrialLine(
                    number=trial.number,
                    state=state,
                    value=pruning.last_score,
                    accuracy=accuracy,
                    params=values,
                    seconds=time.perf_counter() - start,
                    epochs=pruning.epochs,
                    max_epochs=settings.epochs,
                    done=done,
                    total=self.limit,
                    note=note,
                )
            )
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at} of {settings.epochs}")
        return pruning.last_score if pruning.last_score is not None else accuracy

    def _check_room(self, trial: optuna.Trial) -> None:
        """Stop the study, and run nothing, when it has its trials or the budget has no room for one more."""
        why = None
        if self.limit is not None and sum(t.number < trial.number for t in _counted(trial.study)) >= self.limit:
            why = f"the study already has its {self.limit} trials"
        elif self.budget is not None and not self.budget.room_for_a_trial():
            why = "the budget has no room for another trial and the retrain"
        if why is not None:
            trial.study.stop()
            trial.set_user_attr("over_budget", True)
            raise _NoTrialToRun(why)

    def _keep_to_budget(
        self, trial: optuna.Trial, deadline: DeadlineCallback, pruning: PruningCallback, epochs: int, accuracy: float
    ) -> str:
        """After a trial under a budget: a trial the deadline cut is pruned, or, when no trial is complete yet, kept
        as the recipe scaled to the budget; the retrain of a new best is reserved. Returns the note for its line."""
        budget = self.budget
        assert budget is not None  # called only under a budget
        budget.epoch_seconds.append(deadline.per_epoch)
        complete = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        note = ""
        if deadline.cut_at is not None and pruning.pruned_at is None:
            if complete:
                pruning.pruned_at = deadline.cut_at
                return f"cut at the budget after epoch {deadline.cut_at}"
            # nothing complete yet: this recipe, scaled to what the budget holds, is the one to retrain
            epochs = deadline.cut_at
            trial.set_user_attr("scaled_epochs", epochs)
            note = (
                f"scaled to the budget: {epochs} of {deadline.epochs} epochs fit with the retrain "
                f"({deadline.per_epoch:.2g} s an epoch); "
                f"the retrain runs {epochs}"
            )
        if pruning.pruned_at is None:
            score = pruning.last_score if pruning.last_score is not None else accuracy
            if not complete or score > trial.study.best_value:
                budget.best_reserve = deadline.reserve(epochs)
        return note


# ----------------------------------------------------------------------------------------------
# The whole tune


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


@dataclass
class TuneJob:
    """What a study searches: the images, the backbone every trial starts from, the space, the settings the space
    does not name (default: `tlkit finetune`'s; their seed seeds the study), the study's size and storage, the split
    and the compute. `data_label` names the data in the command that reproduces the best recipe."""

    data: str | Path | Manifest
    backbone: BackboneConfig
    space: SearchSpace
    base: TrainConfig = field(default_factory=TrainConfig)
    settings: TuneConfig = field(default_factory=TuneConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    data_label: str | None = None


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
    record = _wait_for_parent(optuna_study)
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
        study.optimize(objective, n_trials=left, catch=(_NoTrialToRun,), callbacks=stop_at_limit, gc_after_trial=True)


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
            **{k: v for k, v in final.details.items() if k == "probe_heldout_accuracy" and v is not None},
            "best_selection_score": float(best.value or 0.0),  # a complete trial has a value
            "best_trial": best.number,
            **{f"trials_{k.lower()}": v for k, v in outcome.trials.items() if k != "RUNNING"},
            "seconds": _study_seconds(study),
        }
    )
    tracking.log_text(str(outcome.command) + "\n", "best_command.txt")
    if model is not None:
        counted = outcome.trials["COMPLETE"] + outcome.trials["PRUNED"]
        tracking.set_tags({"mlflow.runName": f"tune {model}: {counted} trials, best {_recipe_label(best.params)}"})
    _log_study_plots(study)
    tracking.log_text(_trials_table(study), "trials.tsv")


def _recipe_label(values: dict) -> str:
    """A recipe in a few words, for run names: its strategy and rate first (`lp-ft, lr 3e-04`)."""
    parts = [str(values["strategy"])] if "strategy" in values else []
    parts += [
        f"{k.replace('_', ' ')} {v:.0e}"
        if isinstance(v, float) and abs(v) < 0.01
        else f"{k.replace('_', ' ')} {v:g}"
        if isinstance(v, float)
        else f"{k.replace('_', ' ')} {v}"
        for k, v in values.items()
        if k != "strategy"
    ]
    return ", ".join(parts[:3]) + (", …" if len(parts) > 3 else "")


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
        if sum(t.number < trial.number for t in _counted(marker)) >= 1:
            marker.stop()
            trial.set_user_attr("over_budget", True)
            raise _NoTrialToRun("another worker retrains the best recipe")
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

    marker.optimize(retrain, n_trials=1, catch=(_NoTrialToRun,))
    return result.get("stage")
