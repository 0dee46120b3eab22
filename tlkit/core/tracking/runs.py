"""A stage's settings, metrics, figures, datasets and model -> one MLflow run, ended FAILED or KILLED by an error."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data.meta_dataset
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from tlkit import __version__
from tlkit.core import signals
from tlkit.core.files import printable
from tlkit.core.outcome import EndedRun, note_ended
from tlkit.core.tracking.reaping import process_tags
from tlkit.core.tracking.records import RunRecord, get_run
from tlkit.core.tracking.store import client, ensure_experiment
from tlkit.errors import TlkitError

# Runs with a held-out score on the data they were made for (baselines, fine-tunes, tune studies): the ones the UI
# view ranks. Ingest, extract, export, explain and evaluate runs have no such score, and a pretraining's is on its
# source task, so they stay out of the ranking (they are still in the experiment, a click away).
RANKED = {"tlkit.ranked": "true"}


# where a run sits in a pipeline: not copied
POINT_TAGS = (
    "tlkit.stage_id",
    "tlkit.point",
    "tlkit.seed",
    "tlkit.dataset",
)


def safe_name(name: str) -> str:
    """A param or metric name MLflow accepts: other characters (e.g. '+' in a stage id) become '_'."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = safe_name(f"{prefix}{key}")
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


_TAGS: dict[str, str] = {}  # of the `tagging` blocks this process is in


@contextmanager
def tagging(tags: Mapping[str, str]) -> Iterator[None]:
    """Every run started inside gets these tags too (a pipeline marks its stage runs this way)."""
    saved = dict(_TAGS)
    _TAGS.update({k: str(v) for k, v in tags.items()})
    try:
        yield
    finally:
        _TAGS.clear()
        _TAGS.update(saved)


@contextmanager
def start_run(
    stage: str,
    *,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[str]:
    """An MLflow run for one stage, nested under the active run (a pipeline) when there is one, or
    under `parent_run_id` (a run of another process: a pipeline's job runs its points under it).

    Yields the run id; `run_id` continues an existing run (resume). The run ends FAILED on an
    error and KILLED on Ctrl-C, and is noted on the exception that ended it (`tlkit.core.outcome`).
    """
    nested = mlflow.active_run() is not None
    if run_id is not None:
        get_run(run_id)  # before anything is created: an unknown id is an error, not a new store
    if not nested:
        ensure_experiment()
    # the context's tags win
    all_tags = {
        "tlkit.stage": stage,
        "tlkit.version": __version__,
        **process_tags(),
        **(tags or {}),
        **_TAGS,
    }
    command = os.environ.get("TLKIT_COMMAND")  # the command line, set by the CLI's entry point
    if command and not nested and parent_run_id is None:
        # no passwords of URIs in a tag anyone can read
        all_tags["tlkit.command"] = re.sub(r"://[^/@\s]*@", "://***@", command)
    # Ctrl-C or SIGTERM while MLflow creates the run waits until the run is tlkit's to end: else it stays RUNNING
    # (seen in a fresh-clone CI run: a tune stopped as MLflow created its study run, "nothing to resume")
    with signals.held() as interrupts:
        if run_id is not None:  # resume: continue that run, now in this process
            run = mlflow.start_run(run_id=run_id, nested=nested)
            mlflow.set_tags(process_tags())
        else:
            run = mlflow.start_run(
                run_name=run_name or stage,
                nested=nested,
                tags=all_tags,
                parent_run_id=None if nested else parent_run_id,
            )
    try:
        interrupts.deliver()
        if params:
            try:
                log_params(params)
            except MlflowException as err:
                if run_id is None:
                    raise
                raise TlkitError(
                    f"cannot resume run {run_id} with other settings ({err.message.splitlines()[0]}); resume with the "
                    "options it was started with"
                ) from None
        yield run.info.run_id
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning turns Ctrl-C into SystemExit after its clean-up
        signals.note_interrupted()
        note_ended(stop, EndedRun(run.info.run_id, "KILLED", recorded=_end_run("KILLED")))
        raise
    except BaseException as error:
        note_ended(error, EndedRun(run.info.run_id, "FAILED", recorded=_end_run("FAILED")))
        raise
    else:
        mlflow.end_run()


def _end_run(status: str) -> bool:
    """End the active run with `status` while another error is on its way out; False when the store cannot take it
    (a full disk holds the database too): the run then stays RUNNING and the next command finds it dead
    (`reap_dead_runs`). The error the user sees is the first one, not this."""
    run = mlflow.active_run()
    try:
        mlflow.end_run(status=status)  # pops the run off MLflow's stack before it writes: no stale run on failure
        return True
    except Exception:  # noqa: BLE001
        # Ctrl-C can land inside a database write and leave this process's connection unusable: once more on a new one
        try:
            if run is not None:
                MlflowClient(mlflow.get_tracking_uri()).set_terminated(run.info.run_id, status)
                return True
        except Exception:  # noqa: BLE001
            pass
    return False


def _text(value: Any) -> Any:
    """Strings (in dicts and lists too) that MLflow can store: a file name's bytes that are not UTF-8, which Python
    keeps as lone surrogates and an encoder refuses, become \\xNN escapes."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, Mapping):
        return {_text(k): _text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    return value


def log_params(params: Mapping[str, Any]) -> None:
    flat = _text(flatten(params))
    items = list(flat.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[start : start + 100]))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({safe_name(k): float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(_text(dict(tags)))


def set_run_tags(run_id: str, tags: Mapping[str, str], *, tracking_uri: str | None = None) -> None:
    """Tag any run by id, finished or not (e.g. the best trial of a study)."""
    store = client(tracking_uri)
    for key, value in tags.items():
        store.set_tag(run_id, key, str(value))


class _ImageFolder(mlflow.data.meta_dataset.MetaDataset):
    """An image dataset as MLflow sees it: a name, tlkit's fingerprint as digest, its splits as profile."""

    def __init__(self, source: str, *, name: str, digest: str, profile: dict):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        self._profile = profile
        with warnings.catch_warnings():  # two registered local sources match a path; either is right
            warnings.simplefilter("ignore", UserWarning)
            resolved = resolve_dataset_source(source)
        super().__init__(resolved, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def log_dataset(source: str, *, name: str, digest: str, profile: dict, context: str = "training") -> None:
    """Record the run's data as an MLflow dataset input (the UI's Dataset column)."""
    mlflow.log_input(
        _ImageFolder(printable(source), name=printable(name), digest=digest, profile=_text(profile)), context=context
    )


def log_figure(figure, path: str) -> None:
    mlflow.log_figure(figure, path)


def log_text(text: str, path: str) -> None:
    mlflow.log_text(printable(text), path)


def log_dict(data: dict, path: str) -> None:
    mlflow.log_dict(_text(data), path)


def log_artifacts(folder: Path, path: str | None = None) -> None:
    mlflow.log_artifacts(str(folder), artifact_path=path)


def log_artifact(file: Path, path: str | None = None) -> None:
    mlflow.log_artifact(str(file), artifact_path=path)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in (
        "torch",
        "torchvision",
        "timm",
        "lightning",
        "scikit-learn",
        "albumentations",
        "safetensors",
        "pillow",
        "mlflow",
        "pandas",
    ):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pass
    return pins


def log_model(bundle_dir: Path, path: str, *, code: Path) -> None:
    """Log a model bundle as the run's `path` artifact: an MLflow pyfunc model holding the bundle.

    `code` is the Python file that defines the model (MLflow's models-from-code, tlkit.review.pyfunc_model):
    no pickle in the model folder, so loading or serving it runs only that file and tlkit.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if bundle_dir.name != "bundle":  # pyfunc keeps the folder's own name: model/artifacts/bundle/
            bundle_dir = Path(shutil.copytree(bundle_dir, Path(tmp) / "bundle"))
        target = Path(tmp) / "model"
        # Requirements given, not inferred: inference loads the model in a subprocess, seconds per run.
        mlflow.pyfunc.save_model(
            str(target), python_model=str(code), artifacts={"bundle": str(bundle_dir)}, pip_requirements=_requirements()
        )
        mlflow.log_artifacts(str(target), artifact_path=path)


def log_artifact_to(run_id: str, file: Path, path: str | None = None, *, tracking_uri: str | None = None) -> None:
    """Attach a file to any run, finished or not (e.g. a leaderboard to a pipeline run)."""
    client(tracking_uri).log_artifact(run_id, str(file), artifact_path=path)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


class MetricsBuffer:
    """Metrics for one run, buffered and sent in batches by explicit run id (MlflowClient).

    By run id, so it also works in processes that DDP spawns, where no MLflow run is active. The
    Lightning side (finetune.MetricsCallback) adds per-step learning rates and per-epoch metrics;
    they are sent once per epoch, not per step.
    """

    def __init__(self, run_id: str | None = None, tracking_uri: str | None = None):
        self.run_id = run_id or active_run_id()
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self._pending: list[Metric] = []

    def add(self, key: str, value: float, step: int) -> None:
        self._pending.append(Metric(key, value, int(time.time() * 1000), step))

    def flush(self) -> None:
        if self.run_id is None or not self._pending:
            self._pending.clear()
            return
        store = MlflowClient(self.tracking_uri)
        for start in range(0, len(self._pending), 1000):  # MLflow's batch limit
            store.log_batch(self.run_id, metrics=self._pending[start : start + 1000])
        self._pending.clear()


def record_reuse(origin: RunRecord, *, stage: str, run_name: str) -> str:
    """A run that stands for `origin` at a new place in a pipeline: its params, final metrics, and a link.

    The model and plots stay in the origin run (tag `tlkit.reused_from`); nothing is computed.
    """
    tags = {
        k: v for k, v in origin.tags.items() if k.startswith("tlkit.") and k not in POINT_TAGS and k != "tlkit.stage"
    }
    tags["tlkit.reused_from"] = origin.run_id
    with start_run(stage, run_name=run_name, tags=tags) as run_id:
        log_params(origin.params)
        log_metrics(origin.metrics)
        log_text(
            f"Inputs unchanged: these results are those of run {origin.run_id} ({origin.name}); its artifacts hold "
            "the model and plots.\n",
            "reused.txt",
        )
    return run_id
