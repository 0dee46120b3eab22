"""`tlkit tune`: an Optuna study of fine-tuning recipes, the best retrained and scored on held-out data.

The only package that imports Optuna. One module a concern: `selection` (the split trials are scored on, and the
held-out split they never see), `job` (what a tune searches), `studies` (Optuna's storage, studies, sampler and
pruner), `trials` (one trial: pruning, the budget's deadline, its run), `search` (the whole command: plan, search,
retrain, log)."""

from tlkit.pipelines.tune.job import TuneJob
from tlkit.pipelines.tune.search import TuneOutcome, default_study_name, reproduce_command, run_tune
from tlkit.pipelines.tune.selection import SELECTION_FRACTION, TuneSplits, tune_splits
from tlkit.pipelines.tune.studies import default_storage, open_storage, open_study, pruner, shown_url
from tlkit.pipelines.tune.trials import Budget, DeadlineCallback, Objective, PruningCallback, TrialLine

__all__ = [
    "SELECTION_FRACTION",
    "Budget",
    "DeadlineCallback",
    "Objective",
    "PruningCallback",
    "TrialLine",
    "TuneJob",
    "TuneOutcome",
    "TuneSplits",
    "default_storage",
    "default_study_name",
    "open_storage",
    "open_study",
    "pruner",
    "reproduce_command",
    "run_tune",
    "shown_url",
    "tune_splits",
]
