"""Stage settings, metrics, plots, models -> MLflow runs. The only module that imports mlflow.

The default store needs no server: a SQLite database `mlflow.db` with artifacts under `mlruns/`,
both in the working directory (MLflow 3.13+ refuses a bare `./mlruns` file store). Any tracking
URI (a server, another database) works through `--tracking-uri` or MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tqdm bars per download are noise
os.environ.setdefault(
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"
)  # "View run ... at" per run on a server: tlkit prints its own footer

import mlflow  # noqa: E402
import mlflow.data.meta_dataset  # noqa: E402
import mlflow.pyfunc  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; create the store before starting parallel commands
    fcntl = None  # type: ignore[assignment]

# MLflow sets its own loggers to INFO at import; its start-up lines ("Creating initial MLflow database
# tables...", alembic's migrations) are not the user's business. Here, so library callers get it too.
for _name in (
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_store",
    "alembic",
    "alembic.runtime.migration",
):
    logging.getLogger(_name).setLevel(logging.WARNING)
# It logs a database error's whole traceback at ERROR, then raises it; the CLI says it in one line (cli._known_failure).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

from tlkit import __version__  # noqa: E402
from tlkit.core.files import printable  # noqa: E402
from tlkit.errors import TlkitError  # noqa: E402

DEFAULT_EXPERIMENT = "tlkit"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
RUNS_PREFIX = "runs:/"


def default_tracking_uri() -> str:
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the SQLite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


_TARGET: dict[str, str | None] = {
    "uri": None,
    "experiment": None,
}  # what `configure` chose; the store is touched at the first run
_READY: set[str] = set()  # stores this process has created or checked


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
    uri = resolve_tracking_uri(tracking_uri or _TARGET["uri"])
    if uri not in _READY:
        try:
            _create_store(uri)
        except MlflowException as err:
            raise TlkitError(f"cannot use tracking store {uri}: {err.message.splitlines()[0]}") from None
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise TlkitError(
                    f"cannot write the tracking store's lock file in {Path(err.filename or '.').parent} "
                    f"({err.strerror}); "
                    "run tlkit in a folder you can write, or pass --tracking-uri for a store elsewhere"
                ) from None
            raise
        _READY.add(uri)
        reap_dead_runs(uri, quiet=REAP_QUIETLY)
    return MlflowClient(uri)


# ----------------------------------------------------------------------------------------------
# Runs whose process died (kill -9, a crash, a power cut) stay RUNNING in MLflow for ever. Each run
# records the host, pid and process start time that made it; the next command on that host finds the
# runs whose process is gone and marks them KILLED, saying how to resume them.

# a Ray task: the runs of a lost attempt are its retry's to report (tlkit.pipelines.cluster), not a resume hint's
REAP_QUIETLY = False
COMMAND: str | None = None  # the command line that started this process (the CLI sets it), recorded on its top runs
_HOST = socket.gethostname()


def _process_start(pid: int) -> str:
    """The kernel's start time of process `pid` (Linux), '' elsewhere or when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that pid: not ours to judge
    return (
        not started or not _process_start(pid) or _process_start(pid) == started
    )  # the same pid, started again, is another process


def _process_tags() -> dict[str, str]:
    return {"tlkit.host": _HOST, "tlkit.pid": str(os.getpid()), "tlkit.process_start": _process_start(os.getpid())}


def reap_dead_runs(uri: str, *, quiet: bool = False) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone; warn once per run, with the resume command
    (`quiet`: no warning, for a caller that reports the interruption itself)."""
    store = MlflowClient(uri)
    try:
        ids = [e.experiment_id for e in store.search_experiments()]
        running = (
            store.search_runs(ids, f"attributes.status = 'RUNNING' and tags.`tlkit.host` = '{_HOST}'", max_results=1000)
            if ids
            else []
        )
    except MlflowException:
        return []
    reaped = []
    for run in running:
        tags = run.data.tags
        try:
            pid = int(tags.get("tlkit.pid", ""))
        except ValueError:
            continue
        if _alive(pid, tags.get("tlkit.process_start", "")):
            continue
        try:
            store.set_terminated(run.info.run_id, "KILLED")
        except MlflowException:  # a read-only store: say nothing now, the next command that can write will
            continue
        reaped.append(run.info.run_id)
        if not quiet:
            logging.getLogger("tlkit").warning(_death_notice(store, run))
    return reaped


def _death_notice(store: MlflowClient, run) -> str:
    run_id, stage = run.info.run_id, run.data.tags.get("tlkit.stage", "")
    name = f"{run.info.run_name or stage}" + (f", {stage}" if stage and stage != run.info.run_name else "")
    text = f"run {run_id} ({name}) died without finishing (its process is gone); it is now marked KILLED"
    if stage in ("finetune", "pretrain"):
        epochs = [m.step for m in store.get_metric_history(run_id, "train_loss")]
        text = (
            f"run {run_id} ({name}) died "
            + (f"after epoch {max(epochs) + 1}" if epochs else "before it logged an epoch")
            + "; marked KILLED"
        )
        command = run.data.tags.get("tlkit.command")
        if command and " --resume " not in f" {command} ":
            command = f"{command} --resume {run_id}"
        text += (
            f"; resume with: {command}"
            if command
            else f"; resume it with the command that started it and --resume {run_id}"
        )
    elif run.data.tags.get("tlkit.command"):
        text += f"; run it again with: {run.data.tags['tlkit.command']}"
    return text


def configure(tracking_uri: str | None = None, experiment: str | None = None) -> None:
    """Choose the store and experiment. Nothing is created until the first run starts, so a command
    that fails on its options leaves no database behind."""
    uri = resolve_tracking_uri(tracking_uri)
    _TARGET["uri"], _TARGET["experiment"] = (
        uri,
        experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
    )
    mlflow.set_tracking_uri(uri)


def experiment_name() -> str:
    return _TARGET["experiment"] or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _ensure_experiment() -> str:
    """The configured experiment's id, created as a model-training experiment if it is new."""
    uri = resolve_tracking_uri(_TARGET["uri"])
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    store = client(uri)
    try:
        found = store.get_experiment_by_name(name)
        if found is None:
            location = None
            if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
                # Local store: keep artifacts beside the database, not wherever MLflow guesses.
                location = (Path(DEFAULT_ARTIFACTS).resolve() / name.replace("/", "_")).as_uri()
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


# The UI opens an experiment with this tag on its runs table (model training), not on GenAI traces.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


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


_TAGS: dict[str, str] = {}


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
    error and KILLED on Ctrl-C.
    """
    nested = mlflow.active_run() is not None
    if run_id is not None:
        get_run(run_id)  # before anything is created: an unknown id is an error, not a new store
    if not nested:
        _ensure_experiment()
    all_tags = {
        "tlkit.stage": stage,
        "tlkit.version": __version__,
        **_process_tags(),
        **(tags or {}),
        **_TAGS,
    }  # the context's tags win
    command = COMMAND or os.environ.get("TLKIT_COMMAND")
    if command and not nested and parent_run_id is None:
        all_tags["tlkit.command"] = re.sub(
            r"://[^/@\s]*@", "://***@", command
        )  # no passwords of URIs in a tag anyone can read
    if run_id is not None:  # resume: continue that run, now in this process
        run = mlflow.start_run(run_id=run_id, nested=nested)
        mlflow.set_tags(_process_tags())
    else:
        run = mlflow.start_run(
            run_name=run_name or stage, nested=nested, tags=all_tags, parent_run_id=None if nested else parent_run_id
        )
    try:
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
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit after its clean-up
        (KILLED if _end_run("KILLED") else UNRECORDED).append(run.info.run_id)
        raise
    except BaseException:
        (FAILED if _end_run("FAILED") else UNRECORDED).append(run.info.run_id)
        raise
    else:
        mlflow.end_run()


KILLED: list[str] = []  # runs this process marked KILLED (innermost first), for the CLI's resume hint
FAILED: list[str] = []  # runs this process marked FAILED (innermost first)
UNRECORDED: list[str] = []  # runs that ended in an error the store could not record (left RUNNING; reaped later)


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


_RUN_ID = re.compile(r"[A-Za-z0-9_-]+")


def parse_run_ref(ref: str) -> tuple[str, str]:
    """'runs:/ID' or 'runs:/ID/path' -> (run id, path inside the run or '').

    The path is checked before anything is read: it stays inside its run (no '..', no absolute path, no
    backslash), since it names files to download and a folder of the cache to replace.
    """
    rest = ref[len(RUNS_PREFIX) :].lstrip("/")
    run_id, _, path = rest.partition("/")
    if not run_id:
        raise TlkitError(
            f"{ref!r} names no run; write runs:/RUN_ID (the id is shown by every command and in `tlkit ui`)"
        )
    if not _RUN_ID.fullmatch(run_id):
        raise TlkitError(
            f"{ref!r}: {run_id!r} is not a run id (letters, digits, '-' and '_' only); write runs:/RUN_ID[/PATH] with "
            "the id shown by every command and in `tlkit ui`"
        )
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if "\\" in path or "\0" in path or any(p == ".." for p in parts):
        raise TlkitError(
            f"{ref!r}: the artifact path {path!r} leaves its run; name a path inside the run, e.g. runs:/{run_id}/model"
        )
    return run_id, "/".join(parts)


def get_run(run_id: str, tracking_uri: str | None = None):
    """The MLflow run, or a TlkitError naming the store that was searched."""
    uri = resolve_tracking_uri(tracking_uri or _TARGET["uri"])
    if (
        uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists()
    ):  # do not create a store to find nothing in it
        raise TlkitError(
            f"no run {run_id!r}: the tracking store {uri} does not exist yet; run tlkit where mlflow.db is, or pass "
            "--tracking-uri"
        )
    try:
        return client(uri).get_run(run_id)
    except MlflowException:
        raise TlkitError(
            f"no run {run_id!r} in tracking store {uri}; check the id in `tlkit ui`, or pass --tracking-uri for "
            "another store"
        ) from None


def experiment_of(run_ref: str, tracking_uri: str | None = None) -> str:
    """The name of the experiment that holds `runs:/ID`."""
    run = get_run(parse_run_ref(run_ref)[0], tracking_uri)
    return client(tracking_uri).get_experiment(run.info.experiment_id).name


RUN_CACHE_MB = 2048  # downloaded run artifacts kept in the cache folder (TLKIT_RUN_CACHE_MB), oldest used dropped first


def download_artifacts(run_id: str, path: str, *, tracking_uri: str | None = None) -> Path:
    """`path` of a run's artifacts as a local path, downloaded once into tlkit's cache folder (runs/RUN_ID/).

    A finished run's artifacts do not change, so a later call reuses the copy; the folder is kept under
    RUN_CACHE_MB by dropping the copies used longest ago. Nothing is left in the system's temporary folder.
    """
    from tlkit.core.cache import cache_dir

    run_id, path = parse_run_ref(f"{RUNS_PREFIX}{run_id}/{path}")  # nothing outside the run, whoever calls
    run = get_run(run_id, tracking_uri)
    uri = resolve_tracking_uri(tracking_uri)
    runs = cache_dir() / "runs"
    target = runs / run_id / (path.strip("/") or "_all")
    if target.exists() and run.info.status == "FINISHED":
        os.utime(runs / run_id)  # used now: the last to be dropped
        return target
    staging = None
    try:
        runs.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=runs, prefix=f".{run_id}."))
        got = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(staging), tracking_uri=uri
            )
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(got, target)  # whole or not at all: a reader never finds half a model
        except OSError:
            if not target.exists():  # else another process put the same files there a moment ago
                raise
    except (MlflowException, OSError) as err:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise TlkitError(
            f"run {run_id} has no artifact {path!r} ({str(err).splitlines()[0]}); is it a tlkit training or baseline "
            "run?"
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    _trim_run_cache(runs, keep=run_id)
    return target


def _trim_run_cache(runs: Path, *, keep: str) -> None:
    limit = float(os.environ.get("TLKIT_RUN_CACHE_MB", RUN_CACHE_MB)) * 2**20
    folders = [f for f in runs.iterdir() if f.is_dir() and not f.name.startswith(".")]
    sizes = {f: sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) for f in folders}
    total = sum(sizes.values())
    for folder in sorted(folders, key=lambda f: f.stat().st_mtime):
        if total <= limit:
            break
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]


@dataclass
class RunRecord:
    """What tlkit reads back from a run: names, params, latest metrics, tags."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: int

    @property
    def parent_id(self) -> str | None:
        return self.tags.get("mlflow.parentRunId")

    @property
    def origin_id(self) -> str:
        """The run that computed these results: itself, or the run it reused."""
        return self.tags.get("tlkit.reused_from", self.run_id)


def _record(run) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        experiment_id=run.info.experiment_id,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
        start_time=run.info.start_time or 0,
    )


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


def search_runs(
    experiment_ids: list[str], *, filter_string: str = "", tracking_uri: str | None = None
) -> list[RunRecord]:
    """Every run of the experiments that matches the filter, newest first."""
    store = client(tracking_uri)
    records, token = [], None
    while True:
        page = store.search_runs(
            experiment_ids,
            filter_string=filter_string,
            max_results=1000,
            page_token=token,
            order_by=["attributes.start_time DESC"],
        )
        records += [_record(run) for run in page]
        token = page.token
        if not token:
            return records


def find_finished_run(
    tag: str, value: str, *, stage: str | None = None, tracking_uri: str | None = None
) -> RunRecord | None:
    """The newest finished run of the active experiment carrying tag=value (and, given `stage`, of that
    stage: a tune's trials carry its tags too), followed to its origin."""
    active = mlflow.active_run()
    experiment = active.info.experiment_id if active else _ensure_experiment()
    query = f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'" + (
        f" and tags.`tlkit.stage` = '{stage}'" if stage else ""
    )
    found = search_runs([experiment], filter_string=query, tracking_uri=tracking_uri)
    if not found:
        return None
    origin = found[0].origin_id
    return found[0] if origin == found[0].run_id else _record(client(tracking_uri).get_run(origin))


def metric_history(run_id: str, key: str, *, tracking_uri: str | None = None) -> list[float]:
    return [value for _, value in metric_steps(run_id, key, tracking_uri=tracking_uri)]


def metric_steps(run_id: str, key: str, *, tracking_uri: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of every logged value of a metric, by step; a resumed run's repeated step counts once."""
    latest = {
        m.step: m.value for m in sorted(client(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.timestamp)
    }
    return sorted(latest.items())


POINT_TAGS = (
    "tlkit.stage_id",
    "tlkit.point",
    "tlkit.seed",
    "tlkit.dataset",
)  # where a run sits in a pipeline: not copied


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


# Runs with a held-out score on the data they were made for (baselines, fine-tunes, tune studies): the ones the UI
# view ranks. Ingest, extract, export, explain and evaluate runs have no such score, and a pretraining's is on its
# source task, so they stay out of the ranking (they are still in the experiment, a click away).
RANKED = {"tlkit.ranked": "true"}
VIEW_KEY = "tlkit"  # the runs-table view tlkit stores on each experiment (the UI's own "share view" mechanism)
VIEW_COLUMNS = (
    "attributes.`Dataset`",
    "metrics.`heldout_accuracy`",
    "metrics.`heldout_balanced_accuracy`",
    "params.`heldout_split`",
    "params.`model`",
    "params.`weights`",
    "params.`classifier`",
    "params.`train.strategy`",
    "tags.`tlkit.stage`",
)


def _runs_view(metric: str) -> dict:
    """A saved state of the runs table: best `metric` first; held-out figures and the method's settings as columns."""
    return {
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": False,
        # only ranked runs; a run that reused another's result shows once, as the original
        "searchFilter": "tags.`tlkit.ranked` = 'true' AND tags.`tlkit.reused_from` IS NULL",
        "lifecycleFilter": "Active",
        "selectedColumns": [
            *VIEW_COLUMNS[:1],
            f"metrics.`{metric}`",
            *(c for c in VIEW_COLUMNS[1:] if c != f"metrics.`{metric}`"),
        ],
        "runsExpanded": {},
        "groupBy": None,
    }


def ui_url(
    base: str, experiment: str | None = None, *, metric: str = "heldout_accuracy", tracking_uri: str | None = None
) -> str:
    """The UI page of an experiment's runs table, model-training view, best `metric` first, its columns shown.

    Without `experiment`, the experiment of the newest run. The view is stored on the experiment as the
    UI's shared view state (`mlflow.sharedViewState.tlkit`) and named in the URL; `workflowType=machine_learning`
    is the UI's switch between its GenAI and model-training pages (it otherwise opens on GenAI traces).
    """
    store = client(tracking_uri)
    if experiment is None:
        experiments = store.search_experiments(order_by=["last_update_time DESC"], max_results=1)
        found = experiments[0] if experiments else None
    else:
        found = store.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in store.search_experiments()]
            raise TlkitError(f"no experiment {experiment!r}; the experiments are: {', '.join(names) or 'none yet'}")
    if found is None:
        return f"{base}/#/experiments"
    store.set_experiment_tag(found.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(_runs_view(metric)))
    query = urllib.parse.urlencode({"viewStateShareKey": VIEW_KEY, "workflowType": "machine_learning"})
    return f"{base}/#/experiments/{found.experiment_id}/runs?{query}"


def serve_ui(*, host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None) -> int:
    """Run `mlflow ui` against the store until interrupted; returns its exit code."""
    uri = resolve_tracking_uri(tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        command += ["--default-artifact-root", Path(DEFAULT_ARTIFACTS).resolve().as_uri()]
    server = subprocess.Popen(command, start_new_session=True)  # its own group: stopped with all its workers

    def stop(*_) -> None:
        os.killpg(server.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        stop()
        server.wait(timeout=30)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
