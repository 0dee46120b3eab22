"""One trial of a tune: its settings sampled, a fine-tune on the trial data with pruning and a deadline, its run."""

from __future__ import annotations

import copy
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import lightning as L
import numpy as np
import optuna
from optuna.trial import TrialState

from tlkit.core import runtime, tracking
from tlkit.pipelines.space import settings_for
from tlkit.pipelines.tune.job import TuneJob
from tlkit.pipelines.tune.selection import TuneSplits


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


class NoTrialToRun(Exception):
    """A trial Optuna started that this worker must not run: the study has all its trials, the budget has no room
    for one more and the retrain, or (the retrain's marker trial) another worker retrains the best recipe. Optuna
    records it FAILED and the worker stops asking for more."""


def counted_trials(study: optuna.Study) -> list:
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
            run_name=f"trial {trial.number} ({recipe_label(values)})",
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
        if self.limit is not None and sum(t.number < trial.number for t in counted_trials(trial.study)) >= self.limit:
            why = f"the study already has its {self.limit} trials"
        elif self.budget is not None and not self.budget.room_for_a_trial():
            why = "the budget has no room for another trial and the retrain"
        if why is not None:
            trial.study.stop()
            trial.set_user_attr("over_budget", True)
            raise NoTrialToRun(why)

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


def recipe_label(values: dict) -> str:
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
