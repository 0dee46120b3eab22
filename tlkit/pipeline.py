"""Pipeline file -> its stages run in order, as MLflow runs nested under one pipeline run, + a summary."""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from tlkit import tracking
from tlkit.config import BackboneConfig, BaselineStage, ExtractStage, PipelineConfig, _Stage, load_pipeline
from tlkit.ingest import Manifest
from tlkit.sample_data import write_digits
from tlkit.stages import StageResult, load_data, run_baseline, run_extract, run_train


@dataclass
class SummaryRow:
    id: str
    stage: str
    data: str
    run_id: str
    metrics: dict[str, float]
    seconds: float


@dataclass
class PipelineSummary:
    name: str
    experiment: str
    run_id: str
    tracking_uri: str
    rows: list[SummaryRow] = field(default_factory=list)


def _prepare_data(config: PipelineConfig, name: str, cache: dict[str, Manifest], console: Console) -> Manifest:
    """Write generated sample data if missing, then ingest once per dataset."""
    if name not in cache:
        spec = config.datasets[name]
        path = Path(spec.path)
        if spec.digits is not None and not path.exists():
            d = spec.digits
            counts = write_digits(path, classes=d.classes, per_class=d.per_class, size=d.size, seed=d.seed)
            console.print(f"wrote {sum(counts.values())} digit images ({d.classes}) to {path}")
        cache[name] = load_data(path, spec)
    return cache[name]


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

    def local(value: str | None) -> str | None:
        if value is None or value.startswith("runs:/") or Path(value).is_absolute() or not Path(value).suffix:
            return value
        return str((base / value).resolve())

    config.backbone.weights = local(config.backbone.weights)
    for stage in config.stages:
        stage.weights = local(stage.weights) if stage.weights not in {s.id for s in config.stages} else stage.weights
        train = getattr(stage, "train", None)
        if train is not None and train.augment.endswith((".yaml", ".yml")):
            train.augment = local(train.augment)
    return config


def _metric_key(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z\-.]+", "_", text).strip("_")


def run_pipeline(path: str | Path, *, tracking_uri: str | None = None, experiment: str | None = None, console: Console | None = None) -> PipelineSummary:
    """Validate and run a pipeline file. Everything is validated before anything runs."""
    console = console or Console()
    config = _resolve_files(load_pipeline(path), Path(path).resolve().parent)
    experiment = experiment or config.experiment or config.name
    tracking.configure(tracking_uri, experiment)
    manifests: dict[str, Manifest] = {}
    outputs: dict[str, str] = {}
    with tracking.start_run("pipeline", run_name=config.name, params={"pipeline": config.name, "stages": len(config.stages)}) as parent:
        summary = PipelineSummary(config.name, experiment, parent, tracking.resolve_tracking_uri(tracking_uri))
        tracking.log_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "pipeline.yaml")
        for i, stage in enumerate(config.stages, start=1):
            console.rule(f"[bold]stage {i}/{len(config.stages)}: {stage.id}[/] ({stage.stage} on {stage.data})")
            manifest = _prepare_data(config, stage.data, manifests, console)
            backbone = _backbone_for(config, stage, outputs)
            start = time.perf_counter()
            result = _run_stage(stage, manifest, backbone, config, tracking_uri)
            seconds = time.perf_counter() - start
            if result.model_uri:
                outputs[stage.id] = result.model_uri
            row = SummaryRow(stage.id, stage.stage, stage.data, result.run_id, result.metrics, seconds)
            summary.rows.append(row)
            if "test_accuracy" in result.metrics:
                tracking.log_metrics({f"{_metric_key(stage.id)}.test_accuracy": result.metrics["test_accuracy"]})
            console.print(f"{stage.id}: test accuracy {result.metrics.get('test_accuracy', float('nan')):.4f} in {seconds:.1f} s (run {result.run_id})")
        tracking.log_text(summary_text(summary), "summary.txt")
    return summary


def _run_stage(stage: _Stage, manifest: Manifest, backbone: BackboneConfig, config: PipelineConfig, tracking_uri: str | None) -> StageResult:
    if isinstance(stage, BaselineStage):
        return run_baseline(manifest, backbone, stage.baseline, compute=config.compute, run_name=stage.id, tracking_uri=tracking_uri)
    if isinstance(stage, ExtractStage):
        return run_extract(manifest, backbone, compute=config.compute, run_name=stage.id, tracking_uri=tracking_uri)[1]
    return run_train(stage.stage, manifest, backbone, stage.train, compute=config.compute, run_name=stage.id, tracking_uri=tracking_uri)


def summary_table(summary: PipelineSummary) -> Table:
    table = Table(title=f"{summary.name}: held-out results")
    table.add_column("method", no_wrap=True)
    table.add_column("stage")
    table.add_column("data")
    table.add_column("test acc.", justify="right")
    table.add_column("balanced", justify="right")
    table.add_column("seconds", justify="right")
    for row in summary.rows:
        acc = row.metrics.get("test_accuracy")
        bal = row.metrics.get("test_balanced_accuracy")
        table.add_row(row.id, row.stage, row.data, "-" if acc is None else f"{acc:.4f}", "-" if bal is None else f"{bal:.4f}", f"{row.seconds:.1f}")
    return table


def _run_lines(summary: PipelineSummary) -> str:
    return "\n".join(f"  {row.id}: runs:/{row.run_id}" for row in summary.rows)


def summary_text(summary: PipelineSummary) -> str:
    console = Console(width=140, record=True, file=io.StringIO())
    console.print(summary_table(summary))
    return console.export_text() + "\nruns:\n" + _run_lines(summary) + "\n"


def print_summary(summary: PipelineSummary, console: Console) -> None:
    console.print()
    console.print(summary_table(summary))
    console.print("runs (use as --weights or predict MODEL):\n" + _run_lines(summary), highlight=False)
    console.print(
        f"All runs are in MLflow experiment [bold]{summary.experiment}[/] under pipeline run {summary.run_id}.\n"
        f"Open them side by side: `tlkit ui`, then http://127.0.0.1:5000 (store: {summary.tracking_uri}).",
        highlight=False,
    )
