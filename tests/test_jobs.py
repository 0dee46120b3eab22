"""`tlkit run --jobs N`: a pipeline's points in parallel processes, nested and reused as in one process."""

import glob
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from test_pipeline import _runs, sweep_pipeline

from tlkit.errors import TlkitError
from tlkit.pipelines.pipeline import run_pipeline


def test_two_jobs_run_points_at_once_with_the_structure_and_reuse_of_one(tracked, tmp_path, digits_target):
    summary = run_pipeline(sweep_pipeline(tmp_path, digits_target), experiment="jobs", jobs=2)
    assert [(r.point, r.seed) for r in summary.rows[::6]] == [
        ("lr_mult=2", 0),
        ("lr_mult=2", 1),
        ("lr_mult=4", 0),
        ("lr_mult=4", 1),
    ]
    assert [r.id for r in summary.rows[:6]] == ["pre", "features", "svm", "tuned", "check", "label"]
    runs = _runs(tracked, "jobs")
    assert tracked.get_run(summary.run_id).data.params["jobs"] == "2"
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.run_id]
    assert sorted(r.info.run_name for r in points) == [
        "lr_mult=2 seed=0",
        "lr_mult=2 seed=1",
        "lr_mult=4 seed=0",
        "lr_mult=4 seed=1",
    ]
    for point in points:
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == point.info.run_id]
        assert sorted(r.data.tags["tlkit.stage_id"] for r in stages) == sorted(
            ["pre", "features", "svm", "tuned", "check", "label"]
        )
    assert all(r.info.status == "FINISHED" for r in runs)
    # the seed-pinned pretraining is shared by all four points: computed once, even with two jobs wanting it at the
    # start
    pretrains = [r for r in runs if r.data.tags.get("tlkit.stage_id") == "pre"]
    assert len(pretrains) == 4
    assert sum("tlkit.reused_from" not in r.data.tags for r in pretrains) == 1
    # two points were under way at the same time
    spans = sorted((p.info.start_time, p.info.end_time) for p in points)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    assert summary.leaderboard is not None
    assert {e.label for e in summary.leaderboard.entries} >= {"svm", "tuned"}


@pytest.mark.slow
def test_a_failing_point_stops_the_other_jobs_and_fails_the_pipeline(tracked, tmp_path, digits_target):
    path = sweep_pipeline(tmp_path, digits_target)
    config = yaml.safe_load(path.read_text())
    config["sweep"] = {"stages.label.images": [[str(digits_target / "5")], [str(tmp_path / "missing")]]}
    config["seeds"] = [0]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(TlkitError, match=r"^images=\[.*missing\] seed=0: no usable images"):
        run_pipeline(path, experiment="jobs-fail", jobs=2)
    runs = _runs(tracked, "jobs-fail")
    statuses = {r.info.status for r in runs}
    assert "RUNNING" not in statuses
    assert "FAILED" in statuses
    assert next(r for r in runs if r.data.tags.get("tlkit.stage") == "pipeline").info.status == "FAILED"


def test_jobs_below_one_is_refused_before_anything_runs(workdir, tmp_path, digits_target, runner):
    from tlkit.cli.app import app

    result = runner.invoke(app, ["run", str(sweep_pipeline(tmp_path, digits_target)), "--jobs", "0"])
    assert result.exit_code == 1
    assert "--jobs 0: run at least 1 point at a time" in result.output
    assert not (tmp_path / "mlflow.db").exists()


def _session_processes(session: int) -> list[int]:
    """The live processes of a process session (Linux /proc): what a command left running."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.split("/")[2]))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_every_job_and_leaves_nothing_behind(tmp_path, digits_target, how):
    """Ctrl-C reaches the whole process group, as in a terminal; SIGTERM (timeout, docker stop, systemd, Kubernetes)
    reaches the parent alone. Either way every job marks its open runs KILLED, no process and no temporary folder
    outlives the command, and the resume line is the command without --fresh."""
    path = sweep_pipeline(tmp_path, digits_target)
    config = yaml.safe_load(path.read_text())
    config["stages"][3]["train"]["epochs"] = 400  # long enough to be interrupted
    path.write_text(yaml.safe_dump(config))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"TMPDIR": str(scratch)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tlkit", "run", str(path), "--jobs", "2", "--fresh"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not list((tmp_path / ".tlkit" / "checkpoints").glob("*/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.3)  # a fine-tune is under way
    time.sleep(1)
    if how == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == (130 if how == "ctrl-c" else 143), out + err
    assert "Traceback" not in err, err
    interrupted = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert interrupted, err
    assert "marked KILLED" in interrupted[0]
    assert interrupted[0].endswith(f"tlkit run {path} --jobs 2"), interrupted[0]  # --fresh dropped
    deadline = time.monotonic() + 10  # the jobs ended before the command did; their exit may still be reaped
    while _session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_processes(process.pid) == []
    # torch keeps its compiler's cache (torchinductor_USER) in the temporary folder for every later process: not ours
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = _runs(client, "sweep-test")
    assert runs
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert next(r for r in runs if r.data.tags.get("tlkit.stage") == "pipeline").info.status == "KILLED"
