"""One point of a pipeline (a grid point and seed): its stages in order, each run or reused.

Every stage type has one runner in `RUNNERS`; all take the stage and its resolved `StageInputs` and
return the one result type of tracked runs (`StageResult`). A stage whose inputs are unchanged (same
settings, data fingerprint, upstream model, weight and augmentation file contents, tlkit version) is
not computed again: a finished run with the same `tlkit.stage_key` in the experiment is reused, and a
small run linking to it takes its place (`tlkit.reused_from`). Points run here one after another
(pipeline.py), in processes (jobs.py) or as Ray tasks (cluster.py): all three call `run_point`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.text import Text

from tlkit import __version__
from tlkit.config import BackboneConfig
from tlkit.core import tracking
from tlkit.data.ingest import Manifest
from tlkit.data.samples import write_digits, write_photos
from tlkit.errors import TlkitError
from tlkit.pipelines.schema import (
    MODEL_STAGES,
    BaselineStage,
    EvaluateStage,
    ExportStage,
    ExtractStage,
    FinetuneStage,
    ModelStage,
    PipelineConfig,
    PredictStage,
    PretrainStage,
    TuneStage,
)
from tlkit.pipelines.sweep import Plan, Point
from tlkit.runs.stages import RunOptions, StageResult, load_data


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
class Progress:
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


def no_claim(key: str):
    return nullcontext()


@dataclass
class PointRun:
    """How one point runs: where it reports, what it may reuse, and (for --jobs and --ray) how it shares.

    `experiment` is the pipeline's MLflow experiment (a job or a Ray task opens it); `claim(key)` is a lock
    shared with the other jobs or tasks; `parent_run_id` the pipeline run a job's point nests under; `lines`
    prints one line per finished stage (no rules); `resume_from` the runs a retried Ray point's lost attempt left
    (a training stage continues from their checkpoint)."""

    plan: Plan
    progress: Progress
    tracking_uri: str | None
    reuse: bool
    console: Console
    experiment: str | None = None
    claim: Callable = no_claim
    parent_run_id: str | None = None
    lines: bool = False
    resume_from: list[str] = field(default_factory=list)


@dataclass
class StageInputs:
    """What a stage's runner needs, resolved: its data, backbone, upstream model and the point's settings."""

    config: PipelineConfig
    manifest: Manifest | None
    backbone: BackboneConfig | None
    model: str | None
    key: str
    tracking_uri: str | None
    console: Console
    start_from: Path | None = None

    # What a runner of that stage type always has (None only for the stage types that do not take it).
    @property
    def data(self) -> Manifest:
        assert self.manifest is not None, "only predict and export stages have no dataset"
        return self.manifest

    @property
    def network(self) -> BackboneConfig:
        assert self.backbone is not None, "only evaluate, predict and export stages have no backbone"
        return self.backbone

    @property
    def model_ref(self) -> str:
        assert self.model is not None, "only evaluate, predict and export stages take a model"
        return self.model

    def run(self, stage, *, progress: bool = True) -> RunOptions:
        """The stage's run: in this pipeline's store, named by the stage's id."""
        return RunOptions(tracking_uri=self.tracking_uri, run_name=stage.id, progress=progress)


# ----------------------------------------------------------------------------------------------
# Resolving a stage's inputs


def prepare_data(config: PipelineConfig, name: str, cache: dict[str, Manifest], console: Console) -> Manifest:
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
            console.print(
                f"wrote {sum(sum(n.values()) for n in written.values())} photo crops ({len(written['train'])} "
                f"classes) to {path}"
            )
        cache[key] = load_data(path, spec)
    return cache[key]


def backbone_for(config: PipelineConfig, stage: ModelStage, outputs: dict[str, str]) -> BackboneConfig:
    """The pipeline's backbone with the stage's overrides; a weights value naming a stage becomes its run."""
    merged = config.backbone.model_copy(
        update={
            k: getattr(stage, k)
            for k in ("model", "pretrained", "weights", "img_size")
            if getattr(stage, k) is not None
        }
    )
    if merged.weights in outputs:
        merged = merged.model_copy(update={"weights": outputs[merged.weights], "pretrained": False})
    return merged


def space_of(stage: TuneStage, base: Path | None):
    """A tune stage's search space, validated (a file's path is already absolute, see pipeline.resolve_files)."""
    from tlkit.pipelines.space import load_space, parse_space

    if isinstance(stage.space, dict):
        return parse_space(stage.space, f"stages {stage.id} space", base)
    return load_space(stage.space)


def file_digest(path: str) -> str:
    """The SHA-256 of a file's contents ('missing' when it is not there)."""
    file = Path(path)
    if not file.is_file():
        return "missing"
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_key(
    stage, manifest: Manifest | None, backbone: BackboneConfig | None, model_ref: str | None, config: PipelineConfig
) -> str:
    """Everything a stage's result depends on, hashed: equal keys mean the stage need not run again."""
    payload: dict = {
        "stage": stage.model_dump(mode="json", exclude={"id"}),
        "version": __version__,
        "precision": config.compute.precision,
    }
    if manifest is not None:
        payload["data"] = [manifest.fingerprint, manifest.split_settings]
    if backbone is not None:
        payload["backbone"] = backbone.model_dump(mode="json")
        # runs and packages do not change
        if backbone.weights and not backbone.weights.startswith((tracking.RUNS_PREFIX, "pkg:")):
            payload["weights_file"] = file_digest(backbone.weights)
    if model_ref is not None:
        payload["model"] = model_ref
    train = getattr(stage, "train", None)
    if train is not None and train.augment.endswith((".yaml", ".yml")):
        payload["augment_file"] = file_digest(train.augment)
    if isinstance(stage, TuneStage) and isinstance(stage.space, str):
        payload["space_file"] = file_digest(stage.space)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def metric_key(text: str) -> str:
    """`text` as a part of an MLflow metric name."""
    return re.sub(r"[^0-9A-Za-z\-.]+", "_", text).strip("_")


# ----------------------------------------------------------------------------------------------
# The runners: stage type -> tracked run


def _predict(stage: PredictStage, inputs: StageInputs) -> StageResult:
    from tlkit.runs.stages import run_predict

    return run_predict(inputs.model_ref, stage.images, top_k=stage.top_k, run=inputs.run(stage))[2]


def _export(stage: ExportStage, inputs: StageInputs) -> StageResult:
    from tlkit.runs.evaluate import run_export

    result = run_export(inputs.model_ref, stage.format, Path(stage.out), run=inputs.run(stage), force=stage.force)
    inputs.console.print(f"{stage.id}: written {result.files[0]} and {result.files[1]}", highlight=False)
    return result


def _evaluate(stage: EvaluateStage, inputs: StageInputs) -> StageResult:
    from tlkit.runs.evaluate import run_evaluate

    return run_evaluate(inputs.model_ref, inputs.data, stage, run=inputs.run(stage))  # the stage is an EvaluateConfig


def _baseline(stage: BaselineStage, inputs: StageInputs) -> StageResult:
    from tlkit.runs.stages import run_baseline

    return run_baseline(
        inputs.data, inputs.network, stage.baseline, compute=inputs.config.compute, run=inputs.run(stage)
    )


def _extract(stage: ExtractStage, inputs: StageInputs) -> StageResult:
    from tlkit.runs.stages import run_extract

    return run_extract(
        inputs.data, inputs.network, compute=inputs.config.compute, run=inputs.run(stage), layers=stage.layers
    )[1]


def _train(stage: PretrainStage | FinetuneStage, inputs: StageInputs) -> StageResult:
    from tlkit.runs.stages import run_train

    return run_train(
        inputs.data,
        inputs.network,
        stage.train,
        compute=inputs.config.compute,
        run=inputs.run(stage),
        resume=inputs.start_from,
    )


def _tune(stage: TuneStage, inputs: StageInputs) -> StageResult:
    """A tune stage: the whole study in this process, then the retrained best recipe is the stage's model.

    The study is named by the stage's inputs, so a pipeline interrupted during a tune resumes the study
    when run again (with --fresh, a new study)."""
    from tlkit.pipelines.tune import TuneJob, run_tune

    console, config = inputs.console, inputs.config

    def line(t) -> None:
        console.print(f"  {t.text(settings=False)}", highlight=False)

    job = TuneJob(
        inputs.data,
        inputs.network,
        space_of(stage, None),
        base=stage.train,
        settings=stage.model_copy(update={"study": stage.study or f"{config.name}.{stage.id}.{inputs.key}"}),
        compute=config.compute,
        data_label=str(inputs.data.root),
    )
    outcome = run_tune(job, run=inputs.run(stage, progress=False), report=line)
    if outcome.final is None:
        raise TlkitError(
            f"stage {stage.id}: {outcome.waiting}; a pipeline's tune stage needs the retrained recipe (run extra "
            f"workers with `tlkit tune --study {outcome.study}`)"
        )
    final = outcome.final
    console.print(f"  best recipe (trial {outcome.best_trial}): {outcome.command}", highlight=False, soft_wrap=True)
    details = {
        "final_run": final.run_id,
        "study": outcome.study,
        "best_params": outcome.best_params,
        "trials": outcome.trials,
    }
    return StageResult(
        stage="tune",
        run_id=outcome.parent_run_id,
        metrics=dict(final.metrics),
        model_uri=final.model_uri,
        details=details,
    )


RUNNERS: dict[type, Callable[..., StageResult]] = {
    PredictStage: _predict,
    ExportStage: _export,
    EvaluateStage: _evaluate,
    BaselineStage: _baseline,
    ExtractStage: _extract,
    PretrainStage: _train,
    FinetuneStage: _train,
    TuneStage: _tune,
}
ALWAYS_RUN = (PredictStage, ExportStage)  # images on disk may change under the same paths; exported files may be gone


# ----------------------------------------------------------------------------------------------
# Running a point


def dataset_label(data: str, point: Point) -> str:
    """The leaderboard's dataset for a stage on `data`: the file's name for it, whatever folder a seed draws it into,
    with the values a sweep gives it ('photos path=flowers17'), so that swept datasets are not ranked as one."""
    swept = {k.split(".", 2)[2]: v for k, v in point.settings.items() if k.startswith(f"datasets.{data}.")}
    shown = [f"{key}={Path(str(value)).name if key == 'path' else value}" for key, value in swept.items()]
    return " ".join([data, *shown])


def run_point(point: Point, how: PointRun, manifests: dict[str, Manifest]) -> list[SummaryRow]:
    """One (grid point, seed): its stages in order, as one point run when the pipeline is swept."""
    config, plan, console, progress = point.config, how.plan, how.console, how.progress
    params = {
        **{f"sweep.{point.names.get(k, k)}": v for k, v in point.settings.items()},
        **({"seed": point.seed} if point.seed is not None else {}),
    }
    tags = {"tlkit.point": point.group, "tlkit.seed": "" if point.seed is None else str(point.seed)}
    context = (
        tracking.start_run("point", run_name=point.label, params=params, tags=tags, parent_run_id=how.parent_run_id)
        if plan.swept
        else nullcontext()
    )
    rows: list[SummaryRow] = []
    outputs: dict[str, str] = {}  # stage id -> runs:/ of the model it saved
    with context:
        if plan.swept:
            tracking.log_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "pipeline.resolved.yaml")
        for i, stage in enumerate(config.stages, start=1):
            where = f"{point.label} · " if plan.swept else ""
            if not how.lines:
                header = Text(
                    f"{progress.step()} {where}stage {i}/{len(config.stages)}: {stage.id}", style="bold"
                ) + Text(f" ({stage.stage})")
                console.rule(header) if console.is_terminal else console.print(Text("== ") + header, soft_wrap=True)
            start = time.perf_counter()
            data = getattr(stage, "data", "")
            named = {"tlkit.dataset": dataset_label(data, point)} if data else {}
            with tracking.tagging({"tlkit.stage_id": stage.id, **named, **tags}):
                result, reused = _run_or_reuse(stage, config=config, outputs=outputs, manifests=manifests, how=how)
            seconds = time.perf_counter() - start
            if result.model_uri:
                outputs[stage.id] = result.model_uri
            rows.append(
                SummaryRow(
                    id=stage.id,
                    # a fine-tune that delivered its frozen probe says so (tlkit.train.choice)
                    stage=f"{stage.stage} (probe)" if result.details.get("kept") == "probe" else stage.stage,
                    data=data,
                    run_id=result.run_id,
                    metrics=result.metrics,
                    seconds=seconds,
                    point=point.group,
                    seed=point.seed,
                    reused_from=reused,
                )
            )
            accuracy = result.metrics.get("heldout_accuracy")
            if accuracy is not None:
                tracking.log_metrics({f"{metric_key(stage.id)}.heldout_accuracy": accuracy})
            shown = f"held-out accuracy {accuracy:.4f}" if accuracy is not None else "done"
            spent = f"reused run {reused}" if reused else f"{seconds:.1f} s"
            lead = f"{progress.step()} {where}" if how.lines else ""
            console.print(f"{lead}{stage.id}: {shown} ({spent}; run {result.run_id})", highlight=False)
    return rows


def _run_or_reuse(
    stage, config: PipelineConfig, outputs: dict[str, str], manifests: dict[str, Manifest], how: PointRun
) -> tuple[StageResult, str | None]:
    """Run one stage, or stand in for an earlier run with the same inputs. Returns (result, reused run id).

    `how.claim(key)` holds the stage's key while it looks for a finished run and computes: with --jobs, a job
    that needs a stage another job is computing waits for it, then reuses its run."""
    runner = RUNNERS[type(stage)]
    model = outputs.get(stage.model, stage.model) if isinstance(stage, (*ALWAYS_RUN, EvaluateStage)) else None
    if isinstance(stage, ALWAYS_RUN):
        return runner(
            stage,
            StageInputs(
                config=config,
                manifest=None,
                backbone=None,
                model=model,
                key="",
                tracking_uri=how.tracking_uri,
                console=how.console,
            ),
        ), None
    manifest = prepare_data(config, stage.data, manifests, how.console)
    backbone = None if isinstance(stage, EvaluateStage) else backbone_for(config, stage, outputs)
    key = stage_key(stage, manifest=manifest, backbone=backbone, model_ref=model, config=config)
    with how.claim(key):
        if how.reuse:
            found = tracking.find_finished_run("tlkit.stage_key", key, stage=stage.stage, tracking_uri=how.tracking_uri)
            if found is not None:
                run_id = tracking.record_reuse(found, stage=stage.stage, run_name=stage.id)
                # a tune's model is in its retrained-recipe run
                holder = found.tags.get("tlkit.final_run", found.run_id)
                model_uri = f"{tracking.RUNS_PREFIX}{holder}" if stage.stage in MODEL_STAGES else None
                return StageResult(
                    stage=stage.stage,
                    run_id=run_id,
                    metrics=dict(found.metrics),
                    model_uri=model_uri,
                    details={"reused_from": found.run_id},
                ), found.run_id
        study_key = key if how.reuse or not isinstance(stage, TuneStage) else f"{key}-{time.time_ns()}"
        inputs = StageInputs(
            config=config,
            manifest=manifest,
            backbone=backbone,
            model=model,
            key=study_key,
            tracking_uri=how.tracking_uri,
            console=how.console,
            start_from=_checkpoint_of(how.resume_from, key, how.tracking_uri),
        )
        with tracking.tagging({"tlkit.stage_key": key}):
            return runner(stage, inputs), None


def _checkpoint_of(runs: list[str], key: str, tracking_uri: str | None) -> Path | None:
    """The last checkpoint that one of `runs` (a lost attempt's) saved for the stage with this key, if it is here."""
    from tlkit.runs.stages import checkpoint_dir

    for run_id in runs:
        last = checkpoint_dir(run_id) / "last.ckpt"
        if last.exists() and tracking.get_run(run_id, tracking_uri).data.tags.get("tlkit.stage_key") == key:
            return last
    return None
