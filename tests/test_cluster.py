"""`tlkit run --ray`: a pipeline's points on a real two-node Ray cluster on this machine, logging to an `mlflow server`.

The cluster is Ray's own test cluster (`ray.cluster_utils.Cluster`: a head node and a worker node, each a raylet
with one CPU and its own processes); the tracking server runs on a loopback port. Every process these tests start
is stopped by them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL, free_port, mlflow_server_on
from test_pipeline import sweep_pipeline

from tlkit.errors import TlkitError

ray = pytest.importorskip("ray", reason="pip install 'tlkit[ray]'")


def test_ray_without_the_extra_is_a_one_line_error_naming_it(monkeypatch):
    from tlkit.pipelines import cluster

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(TlkitError, match=r"^--ray needs Ray, an optional extra: pip install 'tlkit\[ray\]'$"):
        cluster.import_ray()


def test_a_file_store_is_refused_on_a_cluster_of_several_nodes_and_allowed_on_one():
    from tlkit.pipelines.cluster import check_store

    with pytest.raises(
        TlkitError,
        match=r"sqlite:////tmp/mlflow.db is a file on this machine, which the 2 nodes .* start an MLflow server",
    ):
        check_store("sqlite:////tmp/mlflow.db", 2)
    check_store("sqlite:////tmp/mlflow.db", 1)
    check_store("http://127.0.0.1:5000", 2)


def test_an_address_where_nothing_answers_is_a_one_line_error_not_a_wait(monkeypatch):
    from tlkit.pipelines.cluster import check_reachable

    port = free_port()  # nothing listens there now
    started = time.monotonic()
    with pytest.raises(
        TlkitError, match=rf"^nothing answers at 127\.0\.0\.1:{port}: .*; start the cluster with `ray start --head`"
    ):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(TlkitError, match=rf"^nothing answers at 127\.0\.0\.1:{port} \(where 'auto' leads\)"):
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        check_reachable("auto")
    assert time.monotonic() - started < 15


def test_jobs_and_ray_together_are_refused_before_anything_runs(workdir, tmp_path, digits_target):
    from tlkit.pipelines.pipeline import run_pipeline

    with pytest.raises(
        TlkitError, match=r"^--jobs runs points in processes on this machine, --ray on a cluster: give one of them$"
    ):
        run_pipeline(_pipeline(tmp_path, digits_target), jobs=2, ray="auto")
    assert not (tmp_path / "mlflow.db").exists()


# Ray addresses nodes by this machine's network address unless told to keep to loopback (as it does on macOS):
# the tests' nodes, driver and workers listen and talk on 127.0.0.1 only.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture
def two_nodes(monkeypatch):
    """A head node and a worker node, one CPU each; yields (cluster, worker node)."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    for key, value in LOOPBACK_ONLY.items():
        monkeypatch.setenv(key, value)  # the nodes' processes
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # this process, which imported Ray already
    # sessions, logs and sockets (a short path: socket names are limited)
    folder = tempfile.mkdtemp(prefix="tlkit-ray-", dir="/tmp")
    # Ray's test cluster writes its address to <RAY_TMPDIR>/ray/ray_current_cluster whatever temp_dir says, and fails
    # where that folder does not exist (a machine where Ray never ran): keep it in this folder too
    os.mkdir(os.path.join(folder, "ray"))
    monkeypatch.setenv("RAY_TMPDIR", folder)
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "temp_dir": folder}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False}, shutdown_at_exit=True)
    try:
        worker = cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        cluster.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def mlflow_server(tmp_path):
    with mlflow_server_on(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as url:
        yield url


def _pipeline(tmp_path: Path, digits: Path, *, epochs: int = 2) -> Path:
    """test_pipeline's 4 points (2 learning-rate ratios x 2 seeds), cut to the source pretraining they share
    (its seed is pinned) and a fine-tune per point."""
    path = sweep_pipeline(tmp_path, digits)
    config = yaml.safe_load(path.read_text())
    config["name"] = "cluster-test"
    config["stages"] = [s for s in config["stages"] if s["id"] in ("pre", "tuned")]
    config["stages"][1]["train"]["epochs"] = epochs
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _tlkit(args: list[str], cwd: Path, **popen):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}, **LOOPBACK_ONLY}
    return subprocess.Popen(
        [sys.executable, "-m", "tlkit", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _runs(url: str, experiment: str = "cluster-test"):
    from mlflow import MlflowClient

    client = MlflowClient(url)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


@pytest.mark.slow
def test_points_run_on_both_nodes_share_one_stage_and_finish(two_nodes, mlflow_server, tmp_path, digits_target):
    cluster, worker = two_nodes
    path = _pipeline(tmp_path, digits_target)
    # a local file store cannot be shared by two nodes: refused in one line, before any run (or database) exists
    refused = _tlkit(["run", str(path), "--ray", cluster.address], tmp_path)
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode == 1, out
    assert "is a file on this machine, which the 2 nodes of the Ray cluster cannot share" in out, out
    assert not (tmp_path / "mlflow.db").exists()

    started = time.monotonic()
    process = _tlkit(["run", str(path), "--ray", cluster.address, "--tracking-uri", mlflow_server], tmp_path)
    out, _ = process.communicate(timeout=600)
    print(f"4 points on 2 nodes: {time.monotonic() - started:.1f} s\n{out}")
    assert process.returncode == 0, out
    assert "4 points on the Ray cluster (2 nodes" in out, out
    runs = _runs(mlflow_server)
    assert {r.info.status for r in runs} == {"FINISHED"}
    points = [r for r in runs if r.data.tags.get("tlkit.stage") == "point"]
    assert len(points) == 4
    # both nodes ran points
    assert {r.data.tags["tlkit.node"] for r in points} == {
        cluster.head_node.node_id[:16],
        worker.node_id[:16],
    }
    pipeline = next(r for r in runs if r.data.tags.get("tlkit.stage") == "pipeline")
    assert all(r.data.tags["mlflow.parentRunId"] == pipeline.info.run_id for r in points)
    pretrains = [r for r in runs if r.data.tags.get("tlkit.stage_id") == "pre"]
    assert len(pretrains) == 4
    assert sum("tlkit.reused_from" not in r.data.tags for r in pretrains) == 1  # computed once on the cluster
    assert "tuned.heldout_accuracy_mean" in pipeline.data.metrics or any(
        k.endswith("heldout_accuracy_mean") for k in pipeline.data.metrics
    )

    assert "\x1b[" not in out  # no colour codes in a file

    # a point that fails for a real reason fails the pipeline with its one-line error, and stops the others
    config = yaml.safe_load(path.read_text())
    config.update(
        name="cluster-fail",
        seeds=[0],
        sweep={"stages.label.images": [[str(digits_target / "5")], [str(tmp_path / "missing")]]},
    )
    config["stages"] = [
        {"id": "pixels", "stage": "baseline", "data": "digits", "baseline": {"classifier": "pixels"}},
        {"id": "label", "stage": "predict", "model": "pixels", "images": [str(digits_target / "5")]},
    ]
    path.write_text(yaml.safe_dump(config))
    failing = _tlkit(["run", str(path), "--ray", cluster.address, "--tracking-uri", mlflow_server], tmp_path)
    out, _ = failing.communicate(timeout=300)
    assert failing.returncode == 1, out
    assert out.strip().splitlines()[-1].startswith("error: images=["), out
    assert "missing] seed=0: no usable images" in out, out
    assert "RUNNING" not in {r.info.status for r in _runs(mlflow_server, "cluster-fail")}

    # a node that cannot read a path the pipeline names is refused before any point runs, naming the node and the path
    from tlkit.pipelines.cluster import alive_nodes, check_paths, connected

    with connected(cluster.address) as connection:
        with pytest.raises(
            TlkitError,
            match=r"^node 127\.0\.0\.1 cannot read /nonexistent/images; every node reads the data from the same path",
        ):
            check_paths(connection, alive_nodes(connection), [str(tmp_path), "/nonexistent/images"])


@pytest.mark.slow
def test_a_lost_node_s_point_is_retried_on_the_other_and_the_pipeline_finishes(
    two_nodes, mlflow_server, tmp_path, digits_target
):
    cluster, worker = two_nodes
    path = _pipeline(tmp_path, digits_target, epochs=80)
    process = _tlkit(["run", str(path), "--ray", cluster.address, "--tracking-uri", mlflow_server], tmp_path)
    try:
        deadline, victim = time.monotonic() + 300, None
        # a fine-tune under way on the worker node, with an epoch saved
        while victim is None and time.monotonic() < deadline:
            for run in _runs(mlflow_server):
                tags = run.data.tags
                if (
                    run.info.status == "RUNNING"
                    and tags.get("tlkit.stage") == "finetune"
                    and tags.get("tlkit.node") == worker.node_id[:16]
                    and (tmp_path / ".tlkit" / "checkpoints" / run.info.run_id / "last.ckpt").exists()
                ):
                    victim = run
            time.sleep(0.3)
        assert victim is not None, "no fine-tune got under way on the worker node"
        worker.kill_raylet()
        out, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    print(out)
    assert process.returncode == 0, out
    runs = _runs(mlflow_server)
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[victim.info.run_id].info.status == "KILLED"  # the lost attempt
    points = [r for r in runs if r.data.tags.get("tlkit.stage") == "point"]
    finished = [r for r in points if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == [
        "lr_mult=2 seed=0",
        "lr_mult=2 seed=1",
        "lr_mult=4 seed=0",
        "lr_mult=4 seed=1",
    ]
    retried = [r for r in runs if r.data.tags.get("tlkit.resumed_from") == victim.info.run_id]
    assert len(retried) == 1, "the retry continues from the lost run's checkpoint"
    assert retried[0].info.status == "FINISHED", "the retry continues from the lost run's checkpoint"
    assert retried[0].data.tags["tlkit.node"] == cluster.head_node.node_id[:16]
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}


@pytest.mark.slow
def test_ctrl_c_cancels_every_task_and_the_same_command_resumes(two_nodes, mlflow_server, tmp_path, digits_target):
    cluster, _ = two_nodes
    path = _pipeline(tmp_path, digits_target, epochs=80)
    command = ["run", str(path), "--ray", cluster.address, "--tracking-uri", mlflow_server]
    process = _tlkit(command, tmp_path, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(
        r.data.tags.get("tlkit.stage") == "finetune" and r.info.status == "RUNNING" for r in _runs(mlflow_server)
    ):
        assert time.monotonic() < deadline, "no fine-tune got under way"
        assert process.poll() is None, "no fine-tune got under way"
        time.sleep(0.3)
    os.kill(process.pid, signal.SIGINT)  # the driver alone: the points run in Ray's worker processes
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 130, out
    assert "Traceback" not in out, out
    runs = _runs(mlflow_server)
    assert "RUNNING" not in {r.info.status for r in runs}, [(r.info.run_name, r.info.status) for r in runs]
    assert "KILLED" in {r.info.status for r in runs}

    again = _tlkit(command, tmp_path)  # the same command
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    pretrains = [
        r for r in _runs(mlflow_server) if r.data.tags.get("tlkit.stage_id") == "pre" and r.info.status == "FINISHED"
    ]
    # the finished source pretraining is reused
    assert sum("tlkit.reused_from" not in r.data.tags for r in pretrains) == 1


@pytest.mark.slow
def test_tune_workers_as_ray_tasks_share_one_study(two_nodes, postgres, mlflow_server, tmp_path, digits_target):
    import optuna

    cluster, worker = two_nodes
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
    command = [
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
        "4",
        "--study",
        "on-ray",
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
        "--ray",
        cluster.address,
        "--ray-workers",
        "2",
    ]
    refused = _tlkit(command, tmp_path)  # the default storage, a SQLite file here, cannot be shared by two nodes
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode == 1, out
    assert "cannot share; give --storage postgresql://" in out, out

    storage = f"{postgres}/optuna"
    process = _tlkit([*command, "--storage", storage], tmp_path)
    out, _ = process.communicate(timeout=600)
    print(out)
    assert process.returncode == 0, out
    study = optuna.load_study(study_name="on-ray", storage=storage)
    counted = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(counted) == 4, [(t.number, t.state.name) for t in study.trials]
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    trials = [r for r in runs if r.data.tags.get("tlkit.stage") == "trial"]
    # the search spread over both
    assert {r.data.tags["tlkit.node"] for r in trials} == {
        cluster.head_node.node_id[:16],
        worker.node_id[:16],
    }
    finals = [r for r in runs if r.data.tags.get("tlkit.role") == "tune-final"]
    assert len(finals) == 1
    assert finals[0].info.status == "FINISHED"
    assert "reproduce it:" in out
    assert "worker 0: trial" in out
    assert "worker 1: trial" in out
