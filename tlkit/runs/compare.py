"""MLflow runs -> a leaderboard: one row per method and setting, mean ± std over seeds, best first.

Runs are grouped by name and by the settings that define them (seeds and data-derived params
left out), so the seeds of one grid point become one row. A run that reused another's results
counts once, with its origin. Per-epoch metrics use their best epoch, not their last.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from tlkit.core import tracking
from tlkit.core.files import printable, save_figure
from tlkit.core.metrics import close, plt
from tlkit.errors import TlkitError

# Params that record what happened rather than what was asked for: not settings to compare by.
DERIVED = {
    "data.fingerprint",
    "data.n_train",
    "data.n_val",
    "data.n_test",
    "weights_digest",
    "feature_key",
    "C",
    "C_selection",
    "lr_resolved",
    "batch_size_resolved",
    "group_lrs",
    "heldout_split",
    "selection.C",
    "selection.epoch",
    "selection.probe_C",
    "phases",
    "layer_groups",
    "precision",
    "num_features",
    "data.source",
    "study",
    "storage",
    "space_source",
    "selection.recipe",
    "selection.kept",
    "kept",
    "probe_classifier",
    "probe_layers",
}
LOWER_IS_BETTER = ("loss", "error", "ece", "seconds")


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


@dataclass
class Entry:
    """One leaderboard row: a method with its settings on one dataset, and its value per seed."""

    label: str
    settings: dict[str, str]
    dataset: str = ""
    values: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values))

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Leaderboard:
    metric: str
    columns: list[str]
    entries: list[Entry]

    def rows(self) -> list[dict]:
        return [
            {
                "rank": i,
                "run": e.label,
                "dataset": e.dataset,
                **{c: e.settings.get(c, "") for c in self.columns},
                f"{self.metric}_mean": e.mean,
                f"{self.metric}_std": e.std,
                "n": e.n,
                "values": " ".join(f"{v:.4f}" for v in e.values),
                "runs": " ".join(e.run_ids),
            }
            for i, e in enumerate(self.entries, start=1)
        ]


def _is_setting(key: str) -> bool:
    return key not in DERIVED and not key.endswith("seed") and not key.startswith(("sweep.", "best."))


def _settings(run: tracking.RunRecord, names: dict[str, str]) -> dict[str, str]:
    settings = {}
    for key, value in run.params.items():
        if not _is_setting(key):
            continue
        if value.startswith(tracking.RUNS_PREFIX):  # weights from a run: name the run, not its id
            run_id = value[len(tracking.RUNS_PREFIX) :].split("/")[0]
            value = f"runs:/{names.get(run_id, '…')}"
        settings[key] = value
    return settings


def dataset_label(run: tracking.RunRecord) -> str:
    """The data a run was made on: a pipeline's name for it (which may draw other images for each seed), else its
    folder's name and the first characters of tlkit's fingerprint of its images."""
    if run.tags.get("tlkit.dataset"):
        return run.tags["tlkit.dataset"]
    source, fingerprint = run.params.get("data.source", ""), run.params.get("data.fingerprint", "")
    name = Path(source.rstrip("/")).name if source else ""
    return " ".join(part for part in (name, fingerprint[:8]) if part)


def best_value(values: list[float], metric: str) -> float:
    return min(values) if lower_is_better(metric) else max(values)


def build_leaderboard(
    runs: list[tracking.RunRecord], metric: str, history: Callable[[str, str], list[float]]
) -> Leaderboard:
    """Group runs that have `metric` into rows, best mean first; `history(run_id, metric)` gives per-epoch values."""
    names = {run.run_id: run.tags.get("tlkit.stage_id", run.name) for run in runs}

    def seed(run: tracking.RunRecord) -> float:
        text = run.tags.get("tlkit.seed", "")
        return int(text) if text.lstrip("-").isdigit() else float("inf")

    runs = sorted(runs, key=seed)  # a row's values in seed order, however the runs finished (tlkit run --jobs)
    groups: dict[tuple, Entry] = {}
    origins: dict[tuple, set[str]] = {}
    for run in runs:
        evaluation = run.tags.get("tlkit.stage") == "evaluate"  # a saved model scored again: its figures are its own
        legacy = f"test_{metric[8:]}" if metric.startswith("heldout_") else ""
        if legacy and metric not in run.metrics and legacy in run.metrics and not evaluation:
            run.metrics[metric] = run.metrics[legacy]  # a run of tlkit < 0.3 named its held-out figures test_*
        if metric not in run.metrics or run.status != "FINISHED" or run.tags.get("tlkit.role") == "tune-final":
            continue  # a tune's retrained recipe is shown by its study's run
        label = run.tags.get("tlkit.stage_id", run.name)
        if evaluation and run.params.get("tta") == "True" and "tta" not in metric:
            label = f"{label}: {metric} without tta"  # what the figure is, whatever the run's name says
        settings = _settings(run, names)
        dataset = dataset_label(run)
        key = (label, dataset, tuple(sorted(settings.items())))
        entry = groups.setdefault(key, Entry(label, settings, dataset))
        if run.origin_id in origins.setdefault(key, set()):
            continue  # a reused result counts once
        origins[key].add(run.origin_id)
        values = history(run.origin_id, metric) or [run.metrics[metric]]
        entry.values.append(best_value(values, metric))
        entry.run_ids.append(run.run_id)
    if not groups:
        raise TlkitError(
            f"no finished run has a metric {metric!r}; pick one with --metric (e.g. heldout_accuracy, "
            "best_val_accuracy)"
        )
    entries = list(groups.values())
    # A setting is a column when it tells apart two rows of the same method.
    columns: list[str] = []
    for setting in sorted({k for e in entries for k in e.settings}):
        for label in {e.label for e in entries}:
            seen = {e.settings.get(setting, "") for e in entries if e.label == label}
            if len(seen) > 1:
                columns.append(setting)
                break
    sign = 1 if lower_is_better(metric) else -1
    # runs of different data are not ranked against each other: each dataset's rows together, best first within
    entries.sort(key=lambda e: (e.dataset, sign * e.mean, e.std, e.label))
    return Leaderboard(metric, columns, entries)


def descendants(runs: list[tracking.RunRecord], parent: str) -> list[tracking.RunRecord]:
    children: dict[str, list[tracking.RunRecord]] = {}
    for run in runs:
        if run.parent_id:
            children.setdefault(run.parent_id, []).append(run)
    found, todo = [], [parent]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.run_id)
    return found


def leaderboard_table(board: Leaderboard, title: str = "") -> Table:
    table = Table(title=title or f"leaderboard: {board.metric} (mean ± std over seeds)")
    several = len({e.dataset for e in board.entries}) > 1
    table.add_column("#", justify="right")
    table.add_column("run", no_wrap=True)
    if several:
        table.add_column("dataset", no_wrap=True)
    for column in board.columns:
        table.add_column(column)
    table.add_column(board.metric, justify="right")
    table.add_column("n", justify="right")
    for i, e in enumerate(board.entries, start=1):
        spread = f" ± {e.std:.4f}" if e.n > 1 else ""
        table.add_row(
            str(i),
            e.label,
            *([e.dataset] if several else []),
            *(e.settings.get(c, "") for c in board.columns),
            f"{e.mean:.4f}{spread}",
            str(e.n),
        )
    return table


def write_csv(board: Leaderboard, path: Path) -> Path:
    from tlkit.core import files

    return files.write_csv(path, board.rows())


def leaderboard_figure(board: Leaderboard):
    """Horizontal bars, best on top, with the standard deviation over seeds as error bars."""
    labels = []
    several = len({e.dataset for e in board.entries}) > 1
    for e in board.entries:
        detail = ", ".join(f"{c.split('.')[-1]}={e.settings[c]}" for c in board.columns if e.settings.get(c))
        label = f"{e.label} ({detail})" if detail else e.label
        labels.append(printable(f"{label} [{e.dataset}]" if several and e.dataset else label))
    height = max(2.5, 0.45 * len(labels) + 1.2)
    figure, axis = plt.subplots(figsize=(9, height), dpi=100)
    y = np.arange(len(labels))[::-1]
    means = [e.mean for e in board.entries]
    axis.barh(y, means, xerr=[e.std for e in board.entries], color="#4c72b0", ecolor="black", capsize=4)
    axis.set_yticks(y, labels)
    gap = 0.01 * max((abs(m) + e.std for m, e in zip(means, board.entries)), default=1.0)
    for yi, m, e in zip(y, means, board.entries):  # the figure beyond the error bar's cap, not over it
        axis.text(m + e.std + gap, yi, f"{m:.3f}" + (f" ± {e.std:.3f}" if e.n > 1 else ""), va="center", fontsize=8)
    axis.set_xlabel(f"{board.metric} (mean ± std, n = seeds)")
    if all(0 <= m <= 1 for m in means):
        axis.set_xlim(0, 1.2)
        axis.set_xticks(np.linspace(0, 1, 6))  # room for the labels, no tick past 1
    figure.tight_layout()
    return figure


def compare(
    *,
    experiment: str | None = None,
    parent: str | None = None,
    metric: str = "heldout_accuracy",
    out: Path | None = None,
    tracking_uri: str | None = None,
) -> tuple[Leaderboard, list[Path]]:
    """Leaderboard of an experiment's runs (or a pipeline run's descendants); CSV + PNG written to `out`
    and, with a parent, logged to it under `compare/`."""
    if parent:
        parent_run = tracking.get_run(parent, tracking_uri)
        runs = descendants(tracking.search_runs([parent_run.info.experiment_id], tracking_uri=tracking_uri), parent)
        if not runs:
            raise TlkitError(f"run {parent} has no child runs; pass the id of a pipeline run (`tlkit run` prints it)")
    else:
        name = experiment or tracking.DEFAULT_EXPERIMENT
        runs = tracking.search_runs([tracking.experiment_id(name, tracking_uri)], tracking_uri=tracking_uri)
    board = build_leaderboard(
        runs, metric, lambda run_id, key: tracking.metric_history(run_id, key, tracking_uri=tracking_uri)
    )
    if out is not None:
        return board, _write_board(board, Path(out), parent, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="tlkit-compare-") as tmp:  # logged to the parent run, then removed
        _write_board(board, Path(tmp), parent, tracking_uri)
    return board, []


def _write_board(board: Leaderboard, target: Path, parent: str | None, tracking_uri: str | None) -> list[Path]:
    """The leaderboard's CSV and PNG in `target`, logged to `parent` under compare/ when given."""
    target.mkdir(parents=True, exist_ok=True)
    stem = "leaderboard" if board.metric == "heldout_accuracy" else f"leaderboard-{board.metric}"
    files = [write_csv(board, target / f"{stem}.csv")]
    figure = leaderboard_figure(board)
    save_figure(figure, target / f"{stem}.png")
    close(figure)
    files.append(target / f"{stem}.png")
    if parent:
        for file in files:
            tracking.log_artifact_to(parent, file, "compare", tracking_uri=tracking_uri)
    return files
