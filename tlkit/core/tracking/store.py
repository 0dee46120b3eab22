"""A tracking URI and experiment name -> the MLflow store and experiment that runs go to, created when first used.

The default store needs no server: a SQLite database `mlflow.db` with artifacts under `mlruns/`, both in the
working directory (MLflow 3.13+ refuses a bare `./mlruns` file store). Any tracking URI (a server, another
database) works through `--tracking-uri` or MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; create the store before starting parallel commands
    fcntl = None  # type: ignore[assignment]

from tlkit.core.tracking.reaping import reap_dead_runs
from tlkit.errors import TlkitError


@dataclass
class _Target:
    """Where this process's runs go (`configure`), and the stores it has created or checked."""

    uri: str | None = None
    experiment: str | None = None
    reap_quietly: bool = False  # a Ray task: the runs of a lost attempt are its retry's to report, not a hint's
    ready: set[str] = field(default_factory=set)


_TARGET = _Target()  # owned by this module: set by `configure`, read through `client` and `experiment_name`


DEFAULT_EXPERIMENT = "tlkit"


DEFAULT_DB = "mlflow.db"


DEFAULT_ARTIFACTS = "mlruns"


RUNS_PREFIX = "runs:/"


# The UI opens an experiment with this tag on its runs table (model training), not on GenAI traces.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri() -> str:
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the SQLite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _create_store(uri: str) -> None:
    """Create a new SQLite store's tables under a file lock, once per process.

    MLflow creates and migrates the schema when a process first opens the database; several
    processes doing so at once on a new file crashed ("duplicate column name"). The first one to
    take the lock creates it; the others wait, then find it made.
    """
    if not uri.startswith("sqlite:///") or fcntl is None:
        return
    database = Path(uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(database.with_name(database.name + ".lock"), "a")
    except OSError as err:
        if database.exists() and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            # a store in a read-only folder: made long ago, read as it is (a command that writes a run says so then)
            return
        raise
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def client(tracking_uri: str | None = None) -> MlflowClient:
    """An MlflowClient on the store; a new SQLite store is created safely first (see _create_store)."""
    uri = target_uri(tracking_uri)
    if uri not in _TARGET.ready:
        try:
            _create_store(uri)
        except MlflowException as err:
            raise TlkitError(f"cannot use tracking store {uri}: {err.message.splitlines()[0]}") from None
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise TlkitError(
                    f"cannot write the tracking store's lock file in {Path(err.filename or '.').parent} "
                    f"({err.strerror}); run tlkit in a folder you can write, or pass --tracking-uri for a store "
                    "elsewhere"
                ) from None
            raise
        _TARGET.ready.add(uri)
        reap_dead_runs(uri, quiet=_TARGET.reap_quietly)
    return MlflowClient(uri)


def configure(tracking_uri: str | None = None, experiment: str | None = None, *, reap_quietly: bool = False) -> None:
    """Choose the store and experiment. Nothing is created until the first run starts, so a command
    that fails on its options leaves no database behind. `reap_quietly`: dead runs found in the store are marked
    KILLED without a warning (a Ray task's retry reports its lost attempt itself)."""
    uri = resolve_tracking_uri(tracking_uri)
    _TARGET.uri = uri
    _TARGET.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    _TARGET.reap_quietly = reap_quietly
    mlflow.set_tracking_uri(uri)


def target_uri(tracking_uri: str | None = None) -> str:
    """`tracking_uri`, else the configured store, else MLFLOW_TRACKING_URI or the default."""
    return resolve_tracking_uri(tracking_uri or _TARGET.uri)


def artifact_root(uri: str) -> Path:
    """Where a local store keeps its artifacts: `mlruns/` beside its SQLite database (a store in a temporary folder
    leaves nothing in the working directory), or in the working directory for a file store."""
    if uri.startswith("sqlite:///"):
        database = uri.removeprefix("sqlite:///").split("?")[0]  # sqlite:////abs/path: "/abs/path"
        return Path(database).resolve().parent / DEFAULT_ARTIFACTS
    return Path(DEFAULT_ARTIFACTS).resolve()


def experiment_name() -> str:
    return _TARGET.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def ensure_experiment() -> str:
    """The configured experiment's id, created as a model-training experiment if it is new."""
    uri = target_uri()
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    store = client(uri)
    try:
        found = store.get_experiment_by_name(name)
        if found is None:
            location = None
            if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
                # Local store: keep artifacts beside the database, not wherever MLflow guesses.
                location = (artifact_root(uri) / name.replace("/", "_")).as_uri()
            try:
                experiment_id = store.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
            except MlflowException:  # another process created it a moment ago
                experiment_id = store.get_experiment_by_name(name).experiment_id  # type: ignore[union-attr]
        else:
            experiment_id = found.experiment_id
            if found.lifecycle_stage == "deleted":
                raise TlkitError(
                    f"experiment {name!r} is deleted; restore it in the MLflow UI or choose another --experiment"
                )
    except MlflowException as err:
        raise TlkitError(f"cannot use tracking store {uri}: {err.message.splitlines()[0]}") from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def experiment_id(name: str, tracking_uri: str | None = None) -> str:
    uri = resolve_tracking_uri(tracking_uri)
    try:
        found = client(uri).get_experiment_by_name(name)
    except MlflowException as err:
        raise TlkitError(f"cannot use tracking store {uri}: {err.message.splitlines()[0]}") from None
    if found is None:
        names = [e.name for e in client(uri).search_experiments()]
        raise TlkitError(f"no experiment {name!r} in {uri}; the experiments are: {', '.join(names) or 'none yet'}")
    return found.experiment_id
