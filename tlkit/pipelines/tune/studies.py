"""Optuna's storage and studies: where a study lives, how it is opened by one worker or many, its sampler and pruner."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import optuna

from tlkit.core import tracking
from tlkit.errors import TlkitError

HEARTBEAT_S = 30  # a worker's running trial is refreshed this often ...
GRACE_S = 120  # ... and failed by the next worker after this long without news (a crashed process)
PRUNE_WARMUP_PCT = 30  # no trial is pruned before 30 % of its schedule: onecycle warms up for 25 %
STORAGE_ATTEMPTS = 5  # tries at opening a study whose storage another worker is creating at the same moment


def default_storage(tracking_uri: str | None = None) -> str:
    """SQLite `optuna.db` beside a SQLite tracking store's database, else in the working directory."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else Path.cwd()
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def shown_url(url: str) -> str:
    """A storage URL without its password, for logs and params."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats (a crashed worker's trial is failed, not left running forever)."""
    kwargs: dict = {}
    shown = shown_url(url)  # as the user wrote it, without the password
    if (
        url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg")
        and not importlib.util.find_spec("psycopg2")
    ):
        # the driver tlkit[postgres] installs, whatever SQLAlchemy's default
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable server is an error in seconds, not a hang
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 60}  # several local workers take turns writing
    try:
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
                )
            except Exception as err:
                # Workers started together on a new database race to create Optuna's tables ("duplicate key value
                # violates unique constraint", seen in tests/test_tune_postgres.py): the loser finds them made.
                if attempt + 1 == STORAGE_ATTEMPTS or not any(
                    word in str(err) for word in ("duplicate key", "already exists", "UniqueViolation")
                ):
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")
    except ModuleNotFoundError as err:
        raise TlkitError(
            f"storage {shown} needs the Python package {err.name!r}; pip install 'tlkit[postgres]' (psycopg) for "
            "PostgreSQL"
        ) from None
    except Exception as err:  # sqlalchemy's errors: bad URL, server down, wrong password
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TlkitError(f"cannot open Optuna storage {shown}: {line}") from None


def _sampler(seed: int, n_trials: int | None) -> optuna.samplers.TPESampler:
    # TPE starts modelling after n_startup_trials random ones: 10 by default, two thirds of a 15-trial study.
    startup = max(3, min(10, (n_trials or 30) // 3))
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True
    )


def pruner() -> optuna.pruners.BasePruner:
    """The median pruner every tune uses. Its steps are percent of a trial's schedule, so trials of 5 and 20 epochs
    are compared at the same point of their schedules."""
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=PRUNE_WARMUP_PCT)


def open_study(name: str, storage, *, seed: int, n_trials: int | None) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when another worker (or an earlier run) made it. Returns (study, created).

    Creation is atomic in the storage (a unique study name), so among workers started together exactly
    one creates it, and that one creates the MLflow parent run too. Other workers draw other random
    trials (their sampler seed differs).
    """
    try:
        return optuna.create_study(
            study_name=name, storage=storage, direction="maximize", sampler=_sampler(seed, n_trials), pruner=pruner()
        ), True
    except optuna.exceptions.DuplicatedStudyError:
        worker_seed = seed + 1 + int.from_bytes(os.urandom(2), "little")
        return optuna.load_study(
            study_name=name, storage=storage, sampler=_sampler(worker_seed, n_trials), pruner=pruner()
        ), False


def wait_for_parent(study: optuna.Study, timeout_s: float = 120.0) -> dict:
    """The study's tlkit record, written by the worker that created it (a moment after creating the study)."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = study.user_attrs.get("tlkit")
        if record:
            return record
        if time.monotonic() > deadline:
            raise TlkitError(
                f"study {study.study_name!r} exists but its creator never recorded its MLflow run; start over with "
                "another --study name"
            )
        time.sleep(1.0)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)
