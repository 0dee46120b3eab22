"""A run's artifact path -> a local copy in tlkit's cache folder, downloaded once, the cache kept to its size."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from tlkit.core.tracking.records import get_run, parse_run_ref
from tlkit.core.tracking.store import RUNS_PREFIX, resolve_tracking_uri
from tlkit.errors import TlkitError

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
