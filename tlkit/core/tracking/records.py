"""Run references and the store's runs -> what tlkit reads back: a run, its records, its metric history."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from tlkit.core.tracking.store import RUNS_PREFIX, client, ensure_experiment, target_uri
from tlkit.errors import TlkitError

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
    uri = target_uri(tracking_uri)
    # do not create a store to find nothing in it
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
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
    experiment = active.info.experiment_id if active else ensure_experiment()
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
