"""An experiment -> the MLflow UI's runs table for it (a saved view: best first, tlkit's columns), and the UI server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.parse

from tlkit.core.tracking.store import artifact_root, client, resolve_tracking_uri
from tlkit.errors import TlkitError

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


def runs_view(metric: str) -> dict:
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
    store.set_experiment_tag(found.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(runs_view(metric)))
    query = urllib.parse.urlencode({"viewStateShareKey": VIEW_KEY, "workflowType": "machine_learning"})
    return f"{base}/#/experiments/{found.experiment_id}/runs?{query}"


def serve_ui(*, host: str = "127.0.0.1", port: int = 5000, tracking_uri: str | None = None) -> int:
    """Run `mlflow ui` against the store until interrupted; returns its exit code."""
    uri = resolve_tracking_uri(tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        command += ["--default-artifact-root", artifact_root(uri).as_uri()]
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
