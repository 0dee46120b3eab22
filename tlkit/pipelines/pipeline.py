"""Pipeline file -> its points' stages run in order, as MLflow runs nested under one pipeline run, + a summary.

A plain pipeline nests its stage runs under the pipeline run. With `sweep:` or `seeds:`, every
(grid point, seed) gets a child run of its own, with the stage runs inside it, and the pipeline
run gets the mean ± std per grid point and a leaderboard (see runs/compare.py). How one point runs,
and how a stage with unchanged inputs is reused, is points.py.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from tlkit.core import tracking
from tlkit.data.ingest import Manifest
from tlkit.errors import TlkitError
from tlkit.pipelines.points import PointRun, Progress, SummaryRow, metric_key, prepare_data, run_point, space_of
from tlkit.pipelines.schema import ModelStage, PipelineConfig, RayConfig, TuneStage
from tlkit.pipelines.sweep import Point, plan_pipeline
from tlkit.runs.compare import Leaderboard, compare, leaderboard_table


@dataclass
class PipelineSummary:
    name: str
    experiment: str
    run_id: str
    tracking_uri: str
    rows: list[SummaryRow] = field(default_factory=list)
    leaderboard: Leaderboard | None = None


def resolve_files(config: PipelineConfig, base: Path) -> PipelineConfig:
    """Augmentation and weights files named in a pipeline are relative to the pipeline file."""
    config = config.model_copy(deep=True)

    def local(value: str | None) -> str | None:
        if value is None or value.startswith(("runs:/", "pkg:")) or Path(value).is_absolute() or not Path(value).suffix:
            return value
        return str((base / value).resolve())

    config.backbone.weights = local(config.backbone.weights)
    ids = {s.id for s in config.stages}
    for stage in config.stages:
        if isinstance(stage, ModelStage) and stage.weights not in ids:
            stage.weights = local(stage.weights)
        train = getattr(stage, "train", None)
        if train is not None and train.augment.endswith((".yaml", ".yml")):
            train.augment = local(train.augment)
        if isinstance(stage, TuneStage) and isinstance(stage.space, str):
            stage.space = local(stage.space)
        elif isinstance(stage, TuneStage) and isinstance(stage.space, dict) and "augment" in stage.space:
            # an inline space's augmentation files too: it is read later, from whatever folder the command runs in
            spec = stage.space["augment"]
            named = lambda v: local(v) if isinstance(v, str) and v.endswith((".yaml", ".yml")) else v  # noqa: E731
            stage.space["augment"] = [named(v) for v in spec] if isinstance(spec, list) else named(spec)
    return config


# ----------------------------------------------------------------------------------------------
# Running


def run_pipeline(
    path: str | Path,
    *,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    reuse: bool = True,
    jobs: int | None = None,
    ray: str | None = None,
    console: Console | None = None,
) -> PipelineSummary:
    """Validate a pipeline file (every grid point and seed) and run it. Nothing runs if anything is invalid.

    Args:
        path: the pipeline YAML file.
        overrides: `key.path=value` settings applied to the file first (`tlkit run --set`).
        tracking_uri: MLflow store (default: sqlite:///mlflow.db here).
        experiment: MLflow experiment (default: the file's `experiment`, else its name).
        reuse: reuse finished runs whose inputs are unchanged (False recomputes everything).
        jobs: points (grid point, seed) run at once, each in its own process (default: the file's
            `jobs`, else 1); see jobs.py.
        ray: the address of a Ray cluster to run the points on (default: the file's `ray.address`, else
            none: run here); see cluster.py.
        console: where progress goes.
    """
    console = console or Console(markup=False)
    plan = plan_pipeline(path, overrides)
    base_dir = Path(path).resolve().parent
    points = [replace(p, config=resolve_files(p.config, base_dir)) for p in plan.points]
    for point in points:  # search spaces are checked with the file: a typo fails before any run
        for stage in point.config.stages:
            if isinstance(stage, TuneStage):
                space_of(stage, base_dir)
    address = ray or (plan.base.ray.address if plan.base.ray else None)
    if address and jobs is not None and jobs > 1:
        raise TlkitError("--jobs runs points in processes on this machine, --ray on a cluster: give one of them")
    jobs = plan.base.jobs if jobs is None else jobs
    if jobs < 1:
        raise TlkitError(f"--jobs {jobs}: run at least 1 point at a time (1 runs them one after another)")
    jobs = min(jobs, len(points))
    experiment = experiment or plan.base.experiment or plan.base.name
    tracking.configure(tracking_uri, experiment)
    progress = Progress(sum(len(p.config.stages) for p in points))
    how = PointRun(
        plan=plan, progress=progress, tracking_uri=tracking_uri, reuse=reuse, console=console, experiment=experiment
    )
    if address:
        from tlkit.pipelines.cluster import connected

        with connected(address) as cluster:
            return _run_all(points, how, jobs, overrides, cluster=cluster)
    return _run_all(points, how, jobs, overrides)


def _run_all(
    points: list[Point], how: PointRun, jobs: int, overrides: list[str] | None, *, cluster=None
) -> PipelineSummary:
    """Every point under one pipeline run: one after another here, in `jobs` processes, or as Ray tasks (`cluster`)."""
    plan, console, tracking_uri, experiment = how.plan, how.console, how.tracking_uri, how.experiment or ""
    manifests: dict[str, Manifest] = {}
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if jobs > 1 or cluster is not None:
        for point in points:  # sample data is written here, once, before the jobs or the cluster's tasks read it
            for name in {str(getattr(s, "data")) for s in point.config.stages if getattr(s, "data", None)}:  # noqa: B009
                prepare_data(point.config, name, manifests, console)
    if cluster is not None:  # every refusal before the pipeline run exists
        from tlkit.pipelines.cluster import alive_nodes, check_paths, check_store, point_paths

        nodes = alive_nodes(cluster)
        check_store(uri, len(nodes))
        check_paths(cluster, nodes, point_paths(points))
    params = {
        "pipeline": plan.base.name,
        "stages": len(plan.base.stages),
        "points": len(points),
        "jobs": jobs,
        "overrides": list(overrides or []),
    }
    if cluster is not None:
        params["ray_nodes"] = len(nodes)
    if plan.base.sweep:
        params["sweep"] = {k: json.dumps(v) for k, v in plan.base.sweep.items()}
    if plan.base.seeds:
        params["seeds"] = plan.base.seeds
    with tracking.start_run("pipeline", run_name=plan.base.name, params=params) as parent:
        summary = PipelineSummary(plan.base.name, experiment, parent, uri)
        tracking.log_text(yaml.safe_dump(plan.raw, sort_keys=False), "pipeline.yaml")
        if not plan.swept:
            tracking.log_text(
                yaml.safe_dump(points[0].config.model_dump(mode="json"), sort_keys=False), "pipeline.resolved.yaml"
            )
        if cluster is not None:
            from tlkit.pipelines.cluster import run_points as run_on_cluster

            shared = replace(how, tracking_uri=uri, parent_run_id=parent)
            for rows in run_on_cluster(points, shared, settings=plan.base.ray or RayConfig(), ray=cluster):
                summary.rows += rows
        elif jobs > 1:
            from tlkit.pipelines.jobs import run_points

            for rows in run_points(points, replace(how, parent_run_id=parent), jobs=jobs):
                summary.rows += rows
        else:
            for point in points:
                summary.rows += run_point(point, how, manifests)
        if plan.swept:
            _log_aggregates(summary)
            summary.leaderboard, _ = compare(parent=parent, tracking_uri=tracking_uri)
        tracking.log_text(summary_text(summary), "summary.txt")
    return summary


def _log_aggregates(summary: PipelineSummary) -> None:
    """Mean and std over seeds of each stage's held-out accuracy, per grid point, on the pipeline run."""
    values: dict[tuple[str, str], list[float]] = {}
    for row in summary.rows:
        if "heldout_accuracy" in row.metrics:
            values.setdefault((row.point, row.id), []).append(row.metrics["heldout_accuracy"])
    metrics = {}
    for (point, stage), accs in values.items():
        name = f"{metric_key(point)}/{metric_key(stage)}" if point else metric_key(stage)
        metrics[f"{name}.heldout_accuracy_mean"] = float(np.mean(accs))
        metrics[f"{name}.heldout_accuracy_std"] = float(np.std(accs))
    tracking.log_metrics(metrics)


# ----------------------------------------------------------------------------------------------
# Reporting


def summary_table(summary: PipelineSummary) -> Table:
    table = Table(title=f"{summary.name}: held-out results")
    table.add_column("method", no_wrap=True)
    swept = any(row.point or row.seed is not None for row in summary.rows)
    if swept:
        table.add_column("point")
        table.add_column("seed", justify="right")
    table.add_column("stage")
    table.add_column("held-out acc.", justify="right")
    table.add_column("balanced", justify="right")
    table.add_column("seconds", justify="right")
    for row in summary.rows:
        acc = row.metrics.get("heldout_accuracy")
        bal = row.metrics.get("heldout_balanced_accuracy")
        cells = [row.id, *([row.point, "" if row.seed is None else str(row.seed)] if swept else []), row.stage]
        seconds = "reused" if row.reused_from else f"{row.seconds:.1f}"
        table.add_row(*cells, "-" if acc is None else f"{acc:.4f}", "-" if bal is None else f"{bal:.4f}", seconds)
    return table


def _run_lines(summary: PipelineSummary) -> str:
    lines = []
    for row in summary.rows:
        where = (
            f" [{row.point}{' ' if row.point else ''}seed={row.seed}]"
            if row.seed is not None
            else (f" [{row.point}]" if row.point else "")
        )
        lines.append(
            f"  {row.id}{where}: runs:/{row.run_id}" + (f" (reuses runs:/{row.reused_from})" if row.reused_from else "")
        )
    return "\n".join(lines)


def summary_text(summary: PipelineSummary) -> str:
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(summary_table(summary))
    if summary.leaderboard is not None:
        console.print(leaderboard_table(summary.leaderboard))
    return console.export_text() + "\nruns:\n" + _run_lines(summary) + "\n"


def print_summary(summary: PipelineSummary, console: Console) -> None:
    console.print()
    if summary.leaderboard is not None:
        console.print(leaderboard_table(summary.leaderboard))
        console.print(
            f"Every run, seed by seed: summary.txt of pipeline run {summary.run_id}; the table as CSV and PNG: its "
            "compare/ folder.",
            highlight=False,
        )
    else:
        console.print(summary_table(summary))
        console.print("runs (use as --weights or predict MODEL):\n" + _run_lines(summary), highlight=False)
    console.print(
        f"All runs are in MLflow experiment {summary.experiment} under pipeline run {summary.run_id}.\n"
        f"Open them side by side: `tlkit ui --experiment {summary.experiment}` prints the page (store: "
        f"{summary.tracking_uri}).",
        highlight=False,
    )
