"""Two `tlkit tune` workers on one study in a real PostgreSQL server, logging to an `mlflow server` on the same server.

Needs Debian's `postgresql` package (`.ci/run` installs it). The server runs on a loopback port with a
temporary data directory, as the user `postgres` when the tests run as root (initdb refuses root).
"""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import TINY_MODEL, mlflow_server_on
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` with its runs in the PostgreSQL database `mlflow`: the team-server setup of the README."""
    with mlflow_server_on(f"{postgres}/mlflow", tmp_path) as url:
        yield url


def test_two_workers_finish_one_study_on_postgresql_with_no_trial_lost_or_run_twice(
    postgres, mlflow_server, digits_target, tmp_path
):
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "lr": {"low": 2e-3, "high": 2e-2, "log": True},
                "epochs": [2, 3],
                "strategy": ["full", "freeze-unfreeze"],
                "freeze_epochs": 1,
                "augment": "none",
                "hflip": False,
            }
        )
    )
    storage = f"{postgres}/optuna"
    argv = [
        sys.executable,
        "-m",
        "tlkit",
        "tune",
        str(digits_target),
        "--model",
        TINY_MODEL,
        "--no-pretrained",
        "--img-size",
        "32",
        "--space",
        str(space),
        "--trials",
        "8",
        "--study",
        "shared",
        "--storage",
        storage,
        "--tracking-uri",
        mlflow_server,
        "--experiment",
        "team",
        "--val",
        "0.2",
        "--test",
        "0.3",
        "--precision",
        "32-true",
    ]
    env = {**os.environ, "TLKIT_CACHE": str(tmp_path / "cache")}
    workers = [
        subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(outputs)

    study = optuna.load_study(study_name="shared", storage=storage)
    counted = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(counted) == 8, [(t.number, t.state.name) for t in study.trials]
    # none lost: every other trial never ran
    assert all("over_budget" in t.user_attrs for t in study.trials if t not in counted)
    assert len({t.user_attrs["worker"] for t in counted}) == 2  # both workers took trials

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    trials = [r for r in runs if r.data.tags.get("tlkit.stage") == "trial"]
    # each trial run once
    assert sorted(int(r.data.tags["tlkit.trial"]) for r in trials) == sorted(t.number for t in counted)
    assert {r.info.run_id for r in trials} == {t.user_attrs["mlflow_run_id"] for t in counted}
    parents = [r for r in runs if r.data.tags.get("tlkit.stage") == "tune"]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    finals = [r for r in runs if r.data.tags.get("tlkit.role") == "tune-final"]
    assert len(finals) == 1
    assert finals[0].info.status == "FINISHED"  # the best recipe retrained once, by one worker
    assert "heldout_accuracy" in parents[0].data.metrics
    assert sum("reproduce it:" in out for out in outputs) >= 1
