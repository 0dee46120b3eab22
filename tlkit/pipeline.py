"""Pipeline file -> its stages run in order, as MLflow runs nested under one pipeline run, + a summary.

A plain pipeline nests its stage runs under the pipeline run. With `sweep:` or `seeds:`, every
(grid point, seed) gets a child run of its own, with the stage runs inside it, and the pipeline
run gets the mean ± std per grid point and a leaderboard (see compare.py).

A stage whose inputs are unchanged (same settings, data fingerprint, upstream model, tlkit
version) is not computed again: a finished run with the same `tlkit.stage_key` in the experiment
is reused, and a small run linking to it takes its place (`tlkit.reused_from`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tlkit import __version__, tracking
from tlkit.compare import Leaderboard, compare, leaderboard_table
from tlkit.errors import TlkitError
from tlkit.config import (
    MODEL_STAGES,
    BackboneConfig,
    BaselineStage,
    EvaluateStage,
    ExportStage,
    ExtractStage,
    PipelineConfig,
    PredictStage,
    TuneStage,
    _Stage,
)
from tlkit.ingest import Manifest
from tlkit.sample_data import write_digits, write_photos
from tlkit.review import run_evaluate
from tlkit.stages import StageResult, load_data, run_baseline, run_extract, run_predict, run_train
from tlkit.sweep import Plan, Point, plan_pipeline


@dataclass
class SummaryRow:
    id: str
    stage: str
    data: str
    run_id: str
    metrics: dict[str, float]
    seconds: float
    point: str = ""
    seed: int | None = None
    reused_from: str | None = None


@dataclass
class PipelineSummary:
    name: str
    experiment: str
    run_id: str
    tracking_uri: str
    rows: list[SummaryRow] = field(default_factory=list)
    leaderboard: Leaderboard | None = None


# ----------------------------------------------------------------------------------------------
# Resolving a point's inputs


def _prepare_data(config: PipelineConfig, name: str, cache: dict[str, Manifest], console: Console) -> Manifest:
    """Write generated sample data if missing, then ingest once per dataset and split setting."""
    spec = config.datasets[name]
    key = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    if key not in cache:
        path = Path(spec.folder)
        if spec.digits is not None and not path.exists():
            d = spec.digits
            counts = write_digits(path, classes=d.classes, per_class=d.per_class, size=d.size, seed=d.seed)
            console.print(f"wrote {sum(counts.values())} digit images ({d.classes}) to {path}")
        if spec.photos is not None and not path.exists():
            p = spec.photos
            written = write_photos(path, crop=p.crop, counts=(p.train, p.val, p.test), grey=p.grey, seed=spec.seed)
            console.print(f"wrote {sum(sum(n.values()) for n in written.values())} photo crops ({len(written['train'])} classes) to {path}")
        cache[key] = load_data(path, spec)
    return cache[key]


def _backbone_for(config: PipelineConfig, stage: _Stage, outputs: dict[str, str]) -> BackboneConfig:
    """The pipeline's backbone with the stage's overrides; a weights value naming a stage becomes its run."""
    merged = config.backbone.model_copy(
        update={k: getattr(stage, k) for k in ("model", "pretrained", "weights", "img_size") if getattr(stage, k) is not None}
    )
    if merged.weights in outputs:
        merged = merged.model_copy(update={"weights": outputs[merged.weights], "pretrained": False})
    return merged


def _resolve_files(config: PipelineConfig, base: Path) -> PipelineConfig:
    """Augmentation and weights files named in a pipeline are relative to the pipeline file."""
    config = config.model_copy(deep=True)

    def local(value: str | None) -> str | None:
        if value is None or value.startswith(("runs:/", "pkg:")) or Path(value).is_absolute() or not Path(value).suffix:
            return value
        return str((base / value).resolve())

    config.backbone.weights = local(config.backbone.weights)
    ids = {s.id for s in config.stages}
    for stage in config.stages:
        if isinstance(stage, _Stage) and stage.weights not in ids:
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


def _space(stage: TuneStage, base: Path | None):
    """A tune stage's search space, validated (a file's path is already absolute, see _resolve_files)."""
    from tlkit.space import load_space, parse_space

    if isinstance(stage.space, dict):
        return parse_space(stage.space, f"stages {stage.id} space", base)
    return load_space(stage.space)


def _file_digest(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        return "missing"
    if file.stat().st_size < 1 << 20:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    stat = file.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def stage_key(stage, manifest: Manifest | None, backbone: BackboneConfig | None, model_ref: str | None, config: PipelineConfig) -> str:
    """Everything a stage's result depends on, hashed: equal keys mean the stage need not run again."""
    payload: dict = {"stage": stage.model_dump(mode="json", exclude={"id"}), "version": __version__, "precision": config.compute.precision}
    if manifest is not None:
        payload["data"] = [manifest.fingerprint, manifest.split_settings]
    if backbone is not None:
        payload["backbone"] = backbone.model_dump(mode="json")
        if backbone.weights and not backbone.weights.startswith((tracking.RUNS_PREFIX, "pkg:")):  # runs and packages do not change
            payload["weights_file"] = _file_digest(backbone.weights)
    if model_ref is not None:
        payload["model"] = model_ref
    train = getattr(stage, "train", None)
    if train is not None and train.augment.endswith((".yaml", ".yml")):
        payload["augment_file"] = _file_digest(train.augment)
    if isinstance(stage, TuneStage) and isinstance(stage.space, str):
        payload["space_file"] = _file_digest(stage.space)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _metric_key(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z\-.]+", "_", text).strip("_")


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class _Progress:
    """'[done/total, minutes]' before each stage; `count` (when the stages of several processes add up: --jobs,
    --ray) adds one to a counter they share and returns the new total."""

    total: int
    start: float = field(default_factory=time.time)
    count: Callable[[], int] | None = None
    done: int = 0

    def step(self) -> str:
        if self.count is None:
            self.done += 1
            done = self.done
        else:
            done = self.count()
        return f"[{done}/{self.total}, {(time.time() - self.start) / 60:.1f} min]"


def _no_claim(key: str):
    return nullcontext()


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
    points = [replace(p, config=_resolve_files(p.config, base_dir)) for p in plan.points]
    for point in points:  # search spaces are checked with the file: a typo fails before any run
        for stage in point.config.stages:
            if isinstance(stage, TuneStage):
                _space(stage, base_dir)
    address = ray or (plan.base.ray.address if plan.base.ray else None)
    if address and jobs is not None and jobs > 1:
        raise TlkitError("--jobs runs points in processes on this machine, --ray on a cluster: give one of them")
    jobs = plan.base.jobs if jobs is None else jobs
    if jobs < 1:
        raise TlkitError(f"--jobs {jobs}: run at least 1 point at a time (1 runs them one after another)")
    jobs = min(jobs, len(points))
    experiment = experiment or plan.base.experiment or plan.base.name
    tracking.configure(tracking_uri, experiment)
    manifests: dict[str, Manifest] = {}
    if address:
        from tlkit.cluster import connected

        with connected(address) as cluster:
            return _run_all(plan, points, experiment, tracking_uri, reuse, jobs, manifests, console, overrides, cluster=cluster)
    return _run_all(plan, points, experiment, tracking_uri, reuse, jobs, manifests, console, overrides)


def _run_all(plan: Plan, points: list[Point], experiment: str, tracking_uri: str | None, reuse: bool, jobs: int, manifests: dict,
             console: Console, overrides: list[str] | None, *, cluster=None) -> PipelineSummary:
    """Every point under one pipeline run: one after another here, in `jobs` processes, or as tasks on a Ray `cluster`."""
    from tlkit.config import RayConfig

    uri = tracking.resolve_tracking_uri(tracking_uri)
    if jobs > 1 or cluster is not None:
        for point in points:  # sample data is written here, once, before the jobs or the cluster's tasks read it
            for name in {s.data for s in point.config.stages if getattr(s, "data", None)}:
                _prepare_data(point.config, name, manifests, console)
    if cluster is not None:  # every refusal before the pipeline run exists
        from tlkit.cluster import alive_nodes, check_paths, check_store, point_paths

        nodes = alive_nodes(cluster)
        check_store(uri, len(nodes))
        check_paths(cluster, nodes, point_paths(points))
    progress = _Progress(sum(len(p.config.stages) for p in points))
    params = {"pipeline": plan.base.name, "stages": len(plan.base.stages), "points": len(points), "jobs": jobs, "overrides": list(overrides or [])}
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
            tracking.log_text(yaml.safe_dump(points[0].config.model_dump(mode="json"), sort_keys=False), "pipeline.resolved.yaml")
        if cluster is not None:
            from tlkit.cluster import run_points as run_on_cluster

            for rows in run_on_cluster(points, plan, settings=plan.base.ray or RayConfig(), parent_run_id=parent, experiment=experiment,
                                       tracking_uri=uri, reuse=reuse, progress=progress, console=console, ray=cluster):
                summary.rows += rows
        elif jobs > 1:
            from tlkit.jobs import run_points

            for rows in run_points(points, plan, jobs=jobs, parent_run_id=parent, experiment=experiment, tracking_uri=tracking_uri,
                                   reuse=reuse, progress=progress, console=console):
                summary.rows += rows
        else:
            for point in points:
                summary.rows += _run_point(point, plan, manifests, progress, tracking_uri, reuse, console)
        if plan.swept:
            _log_aggregates(summary)
            summary.leaderboard, _ = compare(parent=parent, tracking_uri=tracking_uri)
        tracking.log_text(summary_text(summary), "summary.txt")
    return summary


def _run_point(point: Point, plan: Plan, manifests: dict, progress: _Progress, tracking_uri: str | None, reuse: bool, console: Console, *,
               claim=_no_claim, parent_run_id: str | None = None, lines: bool = False, resume_from: list[str] | None = None) -> list[SummaryRow]:
    """One (grid point, seed): its stages in order. A job of --jobs passes the pipeline run as `parent_run_id`,
    a `claim(key)` lock shared with the other jobs, and `lines` (one line per finished stage, no rules); a retried
    point of --ray passes the runs its lost attempt left (`resume_from`): a training stage continues from their checkpoint."""
    config = point.config
    params = {**{f"sweep.{point.names.get(k, k)}": v for k, v in point.settings.items()}, **({"seed": point.seed} if point.seed is not None else {})}
    tags = {"tlkit.point": point.group, "tlkit.seed": "" if point.seed is None else str(point.seed)}
    context = (tracking.start_run("point", run_name=point.label, params=params, tags=tags, parent_run_id=parent_run_id) if plan.swept
               else nullcontext())
    rows: list[SummaryRow] = []
    outputs: dict[str, str] = {}  # stage id -> runs:/ of the model it saved
    with context:
        if plan.swept:
            tracking.log_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "pipeline.resolved.yaml")
        for i, stage in enumerate(config.stages, start=1):
            where = f"{point.label} · " if plan.swept else ""
            if not lines:
                header = Text(f"{progress.step()} {where}stage {i}/{len(config.stages)}: {stage.id}", style="bold") + Text(f" ({stage.stage})")
                console.rule(header) if console.is_terminal else console.print(Text("== ") + header, soft_wrap=True)
            start = time.perf_counter()
            with tracking.tagging({"tlkit.stage_id": stage.id, **tags}):
                result, reused = _run_or_reuse(stage, config, outputs, manifests, tracking_uri, reuse, console, claim, resume_from or [])
            seconds = time.perf_counter() - start
            if result.model_uri:
                outputs[stage.id] = result.model_uri
            data = getattr(stage, "data", "")
            rows.append(SummaryRow(stage.id, stage.stage, data, result.run_id, result.metrics, seconds, point.group, point.seed, reused))
            accuracy = result.metrics.get("heldout_accuracy")
            if accuracy is not None:
                tracking.log_metrics({f"{_metric_key(stage.id)}.heldout_accuracy": accuracy})
            shown = f"held-out accuracy {accuracy:.4f}" if accuracy is not None else "done"
            how = f"reused run {reused}" if reused else f"{seconds:.1f} s"
            lead = f"{progress.step()} {where}" if lines else ""
            console.print(f"{lead}{stage.id}: {shown} ({how}; run {result.run_id})", highlight=False)
    return rows


def _run_or_reuse(stage, config: PipelineConfig, outputs: dict[str, str], manifests: dict, tracking_uri: str | None, reuse: bool,
                  console: Console, claim=_no_claim, resume_from: list[str] = ()) -> tuple[StageResult, str | None]:
    """Run one stage, or stand in for an earlier run with the same inputs. Returns (result, reused run id).

    `claim(key)` holds the stage's key while it looks for a finished run and computes: with --jobs, a job
    that needs a stage another job is computing waits for it, then reuses its run."""
    if isinstance(stage, PredictStage):  # images on disk may change under the same paths: always predict
        model = outputs.get(stage.model, stage.model)
        return run_predict(model, stage.images, top_k=stage.top_k, run_name=stage.id, tracking_uri=tracking_uri)[2], None
    if isinstance(stage, ExportStage):  # writes files outside the store, which may be gone: always export
        from tlkit.review import run_export

        model = outputs.get(stage.model, stage.model)
        result = run_export(model, stage.format, Path(stage.out), run_name=stage.id, tracking_uri=tracking_uri, force=stage.force)
        console.print(f"{stage.id}: written {result.files[0]} and {result.files[1]}", highlight=False)
        return StageResult("export", result.run_id, result.metrics, details={"files": [str(f) for f in result.files]}), None
    manifest = _prepare_data(config, stage.data, manifests, console)
    backbone = None if isinstance(stage, EvaluateStage) else _backbone_for(config, stage, outputs)
    model = outputs.get(stage.model, stage.model) if isinstance(stage, EvaluateStage) else None
    key = stage_key(stage, manifest, backbone, model, config)
    with claim(key):
        if reuse:
            found = tracking.find_finished_run("tlkit.stage_key", key, stage=stage.stage, tracking_uri=tracking_uri)
            if found is not None:
                run_id = tracking.record_reuse(found, stage=stage.stage, run_name=stage.id)
                holder = found.tags.get("tlkit.final_run", found.run_id)  # a tune's model is in its retrained-recipe run
                model_uri = f"{tracking.RUNS_PREFIX}{holder}" if stage.stage in MODEL_STAGES else None
                return StageResult(stage.stage, run_id, dict(found.metrics), model_uri, {"reused_from": found.run_id}), found.run_id
        with tracking.tagging({"tlkit.stage_key": key}):
            if isinstance(stage, TuneStage):
                return _run_tune(stage, manifest, backbone, config, key if reuse else f"{key}-{time.time_ns()}", tracking_uri, console), None
            return _run_stage(stage, manifest, backbone, model, config, tracking_uri, _checkpoint_of(resume_from, key, tracking_uri)), None


def _checkpoint_of(runs: list[str], key: str, tracking_uri: str | None) -> Path | None:
    """The last checkpoint that one of `runs` (a lost attempt's) saved for the stage with this key, if it is here."""
    from tlkit.stages import checkpoint_dir

    for run_id in runs:
        last = checkpoint_dir(run_id) / "last.ckpt"
        if last.exists() and tracking.get_run(run_id, tracking_uri).data.tags.get("tlkit.stage_key") == key:
            return last
    return None


def _run_tune(stage: TuneStage, manifest: Manifest, backbone: BackboneConfig, config: PipelineConfig, key: str, tracking_uri: str | None,
              console: Console) -> StageResult:
    """A tune stage: the whole study in this process, then the retrained best recipe is the stage's model.

    The study is named by the stage's inputs, so a pipeline interrupted during a tune resumes the study
    when run again (with --fresh, a new study)."""
    from tlkit.config import parse_duration
    from tlkit.tune import run_tune

    def line(t) -> None:
        console.print(f"  {t.text(settings=False)}", highlight=False)

    outcome = run_tune(manifest, backbone, _space(stage, None), base=stage.train, trials=stage.trials,
                       budget_s=parse_duration(stage.budget) if stage.budget is not None else None, study=stage.study or f"{config.name}.{stage.id}.{key}",
                       storage=stage.storage, selection_fraction=stage.selection, compute=config.compute, run_name=stage.id,
                       tracking_uri=tracking_uri, data_label=str(manifest.root), report=line, progress=False)
    if outcome.final is None:
        raise TlkitError(f"stage {stage.id}: {outcome.waiting}; a pipeline's tune stage needs the retrained recipe (run extra workers with `tlkit tune --study {outcome.study}`)")
    final = outcome.final
    console.print(f"  best recipe (trial {outcome.best_trial}): {outcome.command}", highlight=False, soft_wrap=True)
    details = {"final_run": final.run_id, "study": outcome.study, "best_params": outcome.best_params, "trials": outcome.trials}
    return StageResult("tune", outcome.parent_run_id, dict(final.metrics), final.model_uri, details)


def _run_stage(stage, manifest: Manifest, backbone: BackboneConfig | None, model: str | None, config: PipelineConfig,
               tracking_uri: str | None, start_from: Path | None = None) -> StageResult:
    if isinstance(stage, EvaluateStage):
        return run_evaluate(model, manifest, split=stage.split, tta=stage.tta, explain_top=stage.explain, method=stage.method,
                            attack=stage.attack, eps=stage.eps, run_name=stage.id, tracking_uri=tracking_uri)
    if isinstance(stage, BaselineStage):
        return run_baseline(manifest, backbone, stage.baseline, compute=config.compute, run_name=stage.id, tracking_uri=tracking_uri)
    if isinstance(stage, ExtractStage):
        return run_extract(manifest, backbone, compute=config.compute, run_name=stage.id, tracking_uri=tracking_uri)[1]
    return run_train(stage.stage, manifest, backbone, stage.train, compute=config.compute, run_name=stage.id, tracking_uri=tracking_uri,
                     start_from=start_from)


def _log_aggregates(summary: PipelineSummary) -> None:
    """Mean and std over seeds of each stage's held-out accuracy, per grid point, on the pipeline run."""
    values: dict[tuple[str, str], list[float]] = {}
    for row in summary.rows:
        if "heldout_accuracy" in row.metrics:
            values.setdefault((row.point, row.id), []).append(row.metrics["heldout_accuracy"])
    metrics = {}
    for (point, stage), accs in values.items():
        name = f"{_metric_key(point)}/{_metric_key(stage)}" if point else _metric_key(stage)
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
        where = f" [{row.point}{' ' if row.point else ''}seed={row.seed}]" if row.seed is not None else (f" [{row.point}]" if row.point else "")
        lines.append(f"  {row.id}{where}: runs:/{row.run_id}" + (f" (reuses runs:/{row.reused_from})" if row.reused_from else ""))
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
        console.print(f"Every run, seed by seed: summary.txt of pipeline run {summary.run_id}; the table as CSV and PNG: its compare/ folder.", highlight=False)
    else:
        console.print(summary_table(summary))
        console.print("runs (use as --weights or predict MODEL):\n" + _run_lines(summary), highlight=False)
    console.print(
        f"All runs are in MLflow experiment {summary.experiment} under pipeline run {summary.run_id}.\n"
        f"Open them side by side: `tlkit ui --experiment {summary.experiment}` prints the page (store: {summary.tracking_uri}).",
        highlight=False,
    )
