"""Faults lose nothing: a full disk, a killed process, a damaged store, a read-only folder, odd file names.

Each case runs the real command in a subprocess where the fault is real (a small tmpfs, kill -9, a truncated
database) and checks the one line it prints, the time it took, and what was kept.
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image
from test_cli import assert_one_line_error, invoke
from typer.testing import CliRunner

FINETUNE = [
    "--model",
    TINY_MODEL,
    "--no-pretrained",
    "--img-size",
    "32",
    "--augment",
    "none",
    "--no-hflip",
    "--workers",
    "0",
    "--batch-size",
    "16",
]


def tlkit(*args, cwd, env=None, timeout=300):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tlkit", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=timeout,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "COLUMNS": "200", **(env or {})},
    )
    result.seconds = time.monotonic() - started
    return result


def one_line(result, *fragments, within: float | None = None):
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if within is not None:
        assert result.seconds < within, f"{result.seconds:.1f} s: {lines[0]}"
    return lines[0]


def statuses(folder, experiment="tlkit"):
    from mlflow import MlflowClient

    store = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    found = store.get_experiment_by_name(experiment)
    return {r.info.run_id: r.info.status for r in store.search_runs([found.experiment_id])} if found else {}


def wait_for(path: Path, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------
# A killed process


@pytest.mark.slow  # two fine-tunes in subprocesses, ~15 s
def test_a_killed_fine_tune_is_found_marked_killed_and_resumed(tmp_path, digits_target):
    checkpoints = tmp_path / "ckpt"
    env = {"TLKIT_CHECKPOINTS": str(checkpoints)}
    command = [
        sys.executable,
        "-m",
        "tlkit",
        "finetune",
        str(digits_target),
        *FINETUNE,
        "--epochs",
        "30",
        "--strategy",
        "freeze-unfreeze",
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    process = subprocess.Popen(
        command, cwd=tmp_path, env={**clean, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(checkpoints, process)
        (run_dir,) = list(checkpoints.iterdir())
        wait_for(run_dir / "last.ckpt", process)  # the phase change after epoch 1 wrote it
    finally:
        process.kill()  # kill -9: no clean-up of any kind
        process.wait()
    run_id = run_dir.name
    assert statuses(tmp_path)[run_id] == "RUNNING"
    listed = tlkit("compare", cwd=tmp_path)  # any command that opens the store
    notice = [line for line in listed.stderr.splitlines() if run_id in line]
    assert notice, listed.stderr
    assert "died" in notice[0], listed.stderr
    assert "marked KILLED" in notice[0], listed.stderr
    resume = notice[0].split("resume with: ")[1].strip()
    assert resume.startswith("tlkit finetune")
    assert resume.endswith(f"--resume {run_id}")
    assert statuses(tmp_path)[run_id] == "KILLED"
    assert run_id not in tlkit("compare", cwd=tmp_path).stderr  # said once
    resumed = tlkit(*resume.split()[1:], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert statuses(tmp_path)[run_id] == "FINISHED"


# ----------------------------------------------------------------------------------------------
# A full disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 6 MB at tmp_path/small (skipped where this process may not mount one); yields (folder, resize)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def resize(megabytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(folder)], check=True)

    try:
        yield folder, resize
    finally:
        subprocess.run(["umount", "-l", str(folder)])


@pytest.mark.slow  # two fine-tunes in subprocesses, ~25 s
def test_full_disk_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, digits_target, small_disk):
    disk, resize = small_disk
    env = {"TLKIT_CHECKPOINTS": str(disk)}
    # gradual unfreezing: a checkpoint at each phase change, each larger than the last (more optimizer state);
    # 6 MB holds the first and not the second beside it
    failed = tlkit(
        "finetune",
        digits_target,
        *FINETUNE,
        "--epochs",
        "8",
        "--strategy",
        "gradual",
        "--unfreeze-every",
        "1",
        cwd=tmp_path,
        env=env,
    )
    line = one_line(failed, "no space left on the disk of", "MB free", "marked FAILED", "--resume")
    run_id = line.split("; run ")[1].split()[0]
    assert statuses(tmp_path)[run_id] == "FAILED", line
    last = disk / run_id / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)  # the previous checkpoint, whole
    assert state["epoch"] >= 0
    assert not list((disk / run_id).glob(".*partial*"))
    resize(64)  # space freed
    resume = line.split("continues from its last checkpoint with: ")[1].strip()
    resumed = tlkit(*resume.split()[1:], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert statuses(tmp_path)[run_id] == "FINISHED"


# a tmpfs and two ingests in subprocesses, ~6 s (the same helper: test_a_write_that_fails_leaves_the_old_file_whole)
@pytest.mark.slow
def test_ingest_on_a_full_disk_keeps_the_old_manifest(tmp_path, digits_target, small_disk, monkeypatch):
    disk, _ = small_disk
    manifest = disk / "m.json"
    assert tlkit("ingest", digits_target, "--out", manifest, cwd=tmp_path).returncode == 0
    before = manifest.read_bytes()
    (disk / "filler").write_bytes(b"\0" * (6 * 2**20 - len(before) - 16 * 4096))  # room for less than another manifest
    try:
        (disk / "filler2").write_bytes(b"\0" * 2**20)
    except OSError:
        pass
    result = tlkit("ingest", digits_target, "--out", manifest, "--seed", "1", cwd=tmp_path)
    one_line(result, "no space left on the disk of", str(disk))
    assert manifest.read_bytes() == before  # the old manifest, whole
    assert not list(disk.glob(".m.json*"))


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from tlkit.core import files

    target = files.write_text(tmp_path / "report.json", "old")
    real = Path.write_bytes

    def full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as failure:
        files.write_text(target, "new and longer")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert files.is_disk_full(failure.value)
    assert "MB free" in files.disk_full_message(failure.value)


# ----------------------------------------------------------------------------------------------
# A damaged store, a read-only folder


@pytest.fixture(scope="module")
def store_with_a_model(tmp_path_factory, digits_target):
    """A store (mlflow.db, mlruns/) holding one baseline; yields (folder, run id)."""
    from tlkit.config import BackboneConfig, BaselineConfig, ComputeConfig
    from tlkit.core import tracking
    from tlkit.runs.stages import run_baseline

    folder = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        tracking.configure(None, None)
        result = run_baseline(
            digits_target,
            BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32),
            BaselineConfig(),
            compute=ComputeConfig(num_workers=0),
        )
    return folder, result.run_id


def test_a_damaged_store_is_one_line_at_once(store_with_a_model, tmp_path, digits_target):
    folder, run_id = store_with_a_model
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    database = copy / "mlflow.db"
    database.write_bytes(database.read_bytes()[: database.stat().st_size // 2])
    image = sorted(Path(digits_target).rglob("*.png"))[0]
    for command in (
        ["predict", f"runs:/{run_id}", image],
        ["compare"],
        ["baseline", digits_target, "--model", TINY_MODEL],
    ):
        one_line(tlkit(*command, cwd=copy), "mlflow.db is damaged", "restore it from a backup", within=2.0)
    database.write_bytes(b"not a database at all" * 10)
    one_line(tlkit("compare", cwd=copy), "is damaged", within=2.0)


@pytest.mark.slow  # three commands in subprocesses, ~11 s
def test_a_read_only_folder_reads_and_says_what_it_cannot_write(store_with_a_model, tmp_path, digits_target):
    folder, run_id = store_with_a_model
    copy = tmp_path / "ro"
    shutil.copytree(folder, copy)
    (copy / "mlflow.db.lock").unlink(missing_ok=True)
    os.chmod(copy, 0o555)
    env = {"TLKIT_CACHE": str(tmp_path / "cache")}
    try:
        if os.access(copy, os.W_OK):  # root ignores permission bits: use a read-only bind mount instead
            mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(copy), str(copy)], capture_output=True)
            if mounted.returncode != 0:
                pytest.skip("cannot make a read-only folder here")
        listed = tlkit("compare", "--out", tmp_path / "board", cwd=copy, env=env)  # reads the store, writes elsewhere
        assert listed.returncode == 0, listed.stderr
        assert (tmp_path / "board" / "leaderboard.csv").is_file(), listed.stderr
        image = sorted(Path(digits_target).rglob("*.png"))[0]
        one_line(
            tlkit("predict", f"runs:/{run_id}", image, "--out", tmp_path / "p.csv", cwd=copy, env=env),
            "is read-only",
            "--tracking-uri",
        )
    finally:
        subprocess.run(["umount", str(copy)], capture_output=True)
        os.chmod(copy, 0o755)


# ----------------------------------------------------------------------------------------------
# Odd files and names


@pytest.fixture
def odd_folder(tmp_path, digits_target):
    """Digits with a file name that is not UTF-8, a symlink loop, a broken link and an animated GIF."""
    root = tmp_path / "odd"
    shutil.copytree(digits_target, root)
    first = sorted((root / "5").glob("*.png"))[0]
    os.rename(first, os.path.join(os.fsencode(root / "5"), b"caf\xe9-\xff.png"))
    os.symlink("..", root / "6" / "loop")
    os.symlink(root / "missing.png", root / "6" / "broken.png")
    frames = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (0, 255)]
    frames[0].save(root / "7" / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    return root


@pytest.mark.slow  # three commands in subprocesses, ~19 s
def test_odd_names_and_files_are_used_or_reported_never_a_crash(odd_folder, tmp_path):
    result = tlkit("ingest", odd_folder, "--out", tmp_path / "m.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout + result.stderr
    assert "symbolic link to a folder, not followed" in report
    assert "broken or looping symbolic link" in report
    assert "several frames" in report
    assert "first frame is used" in report
    names = [r["path"] for r in json.loads((tmp_path / "m.json").read_text())["images"]]
    odd = [n for n in names if "caf" in n]
    assert len(odd) == 1
    assert os.fsencode(odd[0]).endswith(b"caf\xe9-\xff.png")  # the JSON escape gives back the very bytes
    baseline = tlkit("baseline", odd_folder, "--classifier", "pixels", cwd=tmp_path)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    model = baseline.stdout.split("runs:/")[1].split(";")[0].split(")")[0].strip()
    predicted = tlkit("predict", f"runs:/{model}", odd_folder / "5", "--out", tmp_path / "p.csv", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert b"caf\xe9-\xff.png" in (tmp_path / "p.csv").read_bytes()  # the CSV carries the name's own bytes


# ----------------------------------------------------------------------------------------------
# One line, before the heavy imports


def test_settings_and_paths_fail_in_one_line_within_two_seconds(workdir, tmp_path, digits_target):
    (tmp_path / "empty").mkdir()
    one_line(tlkit("predict", "runs:/abc", tmp_path / "empty", cwd=tmp_path), "empty folder", within=2.0)
    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"
    (tmp_path / "typo.yaml").write_text(shipped.read_text().replace("{classifier: svm}", "{classifer: svm}", 1))
    one_line(tlkit("run", tmp_path / "typo.yaml", cwd=tmp_path), "classifer", within=2.0)
    csv = tmp_path / "all-train.csv"
    rows = [f"{p},{p.parent.name},train" for p in sorted(Path(digits_target).rglob("*.png"))]
    csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    os.chdir(tmp_path)
    assert_one_line_error(invoke(CliRunner(), "finetune", csv, *FINETUNE, "--epochs", "1"), "no val or test split")
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run


def test_damaged_model_folders_name_the_file(store_with_a_model, workdir, digits_target):
    folder, run_id = store_with_a_model
    image = sorted(Path(digits_target).rglob("*.png"))[0]
    model = workdir / "model"
    (found,) = list((folder / "mlruns").rglob("tlkit-model.json"))
    shutil.copytree(found.parent, model)
    (model / "backbone.safetensors").unlink()
    runner = CliRunner()
    assert_one_line_error(invoke(runner, "predict", model, image), "lacks backbone.safetensors", str(model))
    shutil.copy(found.parent / "backbone.safetensors", model)
    head = model / "head.safetensors"
    head.write_bytes(head.read_bytes()[:50])
    assert_one_line_error(invoke(runner, "predict", model, image), "head.safetensors", "damaged")


def test_predict_leaves_no_litter_and_export_asks_before_overwriting(
    store_with_a_model, tmp_path, digits_target, monkeypatch
):
    import tempfile

    folder, run_id = store_with_a_model
    monkeypatch.chdir(folder)
    # the store in `folder`, whatever an earlier test configured
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("TLKIT_CACHE", str(tmp_path / "cache"))
    image = sorted(Path(digits_target).rglob("*.png"))[0]
    before = set(os.listdir(tempfile.gettempdir()))
    runner = CliRunner()
    for _ in range(2):
        assert invoke(runner, "predict", f"runs:/{run_id}", image).exit_code == 0
    litter = {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("tlkit-")}
    assert not litter
    assert len(list((tmp_path / "cache" / "runs").iterdir())) == 1  # one copy of the model, reused
    out = tmp_path / "export"
    first = invoke(runner, "export", f"runs:/{run_id}", "--format", "torchscript", "--out", out)
    assert first.exit_code == 0, first.output
    assert str(out) in " ".join(first.stdout.split()), first.output
    assert_one_line_error(
        invoke(runner, "export", f"runs:/{run_id}", "--format", "torchscript", "--out", out), "exists", "--force"
    )
    assert (
        invoke(runner, "export", f"runs:/{run_id}", "--format", "torchscript", "--out", out, "--force").exit_code == 0
    )


def test_runs_record_their_process_and_command_without_passwords(tracked, monkeypatch):
    from tlkit.core import tracking

    monkeypatch.setenv("TLKIT_COMMAND", "tlkit tune data --storage postgresql://me:secret@db/optuna")
    with tracking.start_run("tune") as run_id:
        with tracking.start_run("trial") as trial_id:
            pass
    tags = tracked.get_run(run_id).data.tags
    assert tags["tlkit.command"] == "tlkit tune data --storage postgresql://***@db/optuna"
    assert tags["tlkit.pid"] == str(os.getpid())
    assert tags["tlkit.host"]
    assert tags["tlkit.process_start"]
    assert "tlkit.command" not in tracked.get_run(trial_id).data.tags  # the command started the top run only
    assert tracking.reap_dead_runs(tracking.resolve_tracking_uri()) == []  # this process is alive: nothing to reap


def test_ctrl_c_inside_a_database_write_still_ends_the_run_killed(tracked, monkeypatch):
    """Ctrl-C can land inside MLflow's write and spoil the connection: the run is still ended KILLED, on a new one."""
    import mlflow

    from tlkit.core import tracking

    real_end_run = mlflow.end_run

    def broken_end_run(status="FINISHED"):
        real_end_run.__globals__[
            "_active_run_stack"
        ].get().pop()  # MLflow pops the run before it writes, then the write fails
        raise RuntimeError("cannot start a transaction within a transaction")

    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("finetune") as run_id:
            monkeypatch.setattr(mlflow, "end_run", broken_end_run)
            raise KeyboardInterrupt
    monkeypatch.undo()
    assert tracked.get_run(run_id).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_ctrl_c_while_mlflow_creates_the_run_waits_and_ends_that_run_killed(tracked, monkeypatch):
    """A KeyboardInterrupt landing inside mlflow.start_run, after the run exists, would leave it RUNNING and unnoted
    (a fresh-clone CI run: a tune stopped as its study run was created, "nothing to resume"): it is held till
    tlkit is in charge of the run, then ends it KILLED."""
    import mlflow

    from tlkit.core import tracking
    from tlkit.core.outcome import EndedRun, ended_runs

    real_start_run = mlflow.start_run
    created = []

    def interrupted_start_run(*args, **kwargs):
        run = real_start_run(*args, **kwargs)
        created.append(run.info.run_id)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C as MLflow returns the new run
        return run

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(mlflow, "start_run", interrupted_start_run)
        with pytest.raises(KeyboardInterrupt) as raised:
            with tracking.start_run("tune"):
                pytest.fail("the interrupt was not delivered before the stage's work")
    finally:
        signal.signal(signal.SIGINT, previous)
    (run_id,) = created
    assert ended_runs(raised.value) == [EndedRun(run_id, "KILLED", recorded=True)]
    assert tracked.get_run(run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is previous


def test_held_signals_wait_and_are_delivered_once_by_deliver_or_by_an_error():
    from tlkit.core import signals

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with signals.held() as interrupts:
            signal.raise_signal(signal.SIGINT)  # held: no KeyboardInterrupt here
        assert interrupts.signals == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            interrupts.deliver()
        interrupts.deliver()  # delivered once
        with pytest.raises(KeyboardInterrupt) as raised:
            with signals.held():
                signal.raise_signal(signal.SIGINT)
                raise ValueError("the block failed")
        assert isinstance(raised.value.__context__, ValueError)  # the held Ctrl-C is not lost with the error
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_sigterm_put_off_by_a_fork_is_dropped_once_the_command_is_stopping(monkeypatch):
    """Lightning stops a fit on its own SIGTERM flag and a tune's trial ends KILLED; the SIGTERM that a fork put off
    must not land a second KeyboardInterrupt in Optuna's record of that trial (an UnboundLocalError in CI)."""
    from tlkit.core import signals

    monkeypatch.setattr(signals, "child_pids", lambda pid=None: [])
    with signals.terminating_as_interrupt() as received:
        handler = signal.getsignal(signal.SIGTERM)
        signals._FORKED[:] = [None]  # a DataLoader just forked
        handler(signal.SIGTERM, None)  # put off: delivered again in RETRY_AFTER_FORK_S
        signals.note_interrupted()  # meanwhile the fit stopped and its run was marked KILLED
        deadline = time.monotonic() + 20 * signals.RETRY_AFTER_FORK_S
        while time.monotonic() < deadline:  # the redelivery runs the handler here: no KeyboardInterrupt
            time.sleep(0.01)
    assert received == [signal.SIGTERM]
    assert not signals._INTERRUPTED  # a later command in this process starts afresh


# ----------------------------------------------------------------------------------------------
# A model URI is a name inside a run, never a path out of it


@pytest.mark.parametrize(
    "ref",
    ["runs:/{id}/../../../../victim", "runs:/{id}/model/../../../victim", "runs:/../../etc", "runs:/{id}/\\..\\victim"],
)
def test_a_model_uri_that_leaves_its_run_is_refused_before_anything_is_read(
    store_with_a_model, tmp_path, digits_target, monkeypatch, ref
):
    folder, run_id = store_with_a_model
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cache = tmp_path / "a" / "b" / "cache"  # <cache>/runs/ID/../../../../victim is tmp_path/a/victim
    monkeypatch.setenv("TLKIT_CACHE", str(cache))
    victims = [folder.parent / "victim", tmp_path / "a" / "victim", tmp_path / "victim"]
    for victim in victims:
        victim.mkdir(parents=True, exist_ok=True)
        (victim / "keep.txt").write_text("mine")
    image = sorted(Path(digits_target).rglob("*.png"))[0]
    runner = CliRunner()
    for command in (["predict", ref.format(id=run_id), image], ["evaluate", ref.format(id=run_id), digits_target]):
        assert_one_line_error(invoke(runner, *command), "run")
    for victim in victims:
        assert [p.name for p in victim.iterdir()] == ["keep.txt"]
        assert (victim / "keep.txt").read_text() == "mine"
    assert not (cache / "runs").exists()  # nothing was downloaded


def test_run_references_name_a_path_inside_the_run():
    from tlkit.core.tracking import parse_run_ref
    from tlkit.errors import TlkitError

    assert parse_run_ref("runs:/abc123/model") == ("abc123", "model")
    assert parse_run_ref("runs:/abc123/./model//bundle/") == ("abc123", "model/bundle")
    assert parse_run_ref("runs:/abc123") == ("abc123", "")
    for bad in ("runs:/abc/../x", "runs:/abc/model/../../x", "runs:/../etc", "runs:/abc/a\\b", "runs:/.."):
        with pytest.raises(TlkitError):
            parse_run_ref(bad)


# ----------------------------------------------------------------------------------------------
# Names that are not UTF-8, wherever tlkit writes or logs them


@pytest.fixture
def undecodable_names(tmp_path, digits_pair):
    """Two classes of digits where a class folder, a duplicate file and a damaged file have names that are not
    UTF-8: each one is named in the data report."""
    root = tmp_path / "names"
    shutil.copytree(digits_pair, root)
    os.rename(root / "8", os.path.join(os.fsencode(root), b"eight-\xe9"))
    first = sorted((root / "3").glob("*.png"))[0]
    shutil.copy(first, os.path.join(os.fsencode(root / "3"), b"caf\xe9.png"))  # a duplicate, reported
    with open(os.path.join(os.fsencode(root / "3"), b"broken-\xff.png"), "wb") as damaged:  # unreadable, reported
        damaged.write(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_names_that_are_not_utf8_survive_every_report_and_log(undecodable_names, workdir):
    runner = CliRunner()
    ingested = invoke(runner, "ingest", undecodable_names, "--out", workdir / "m.json")
    assert ingested.exit_code == 0, ingested.output
    assert "caf\\xe9.png" in ingested.stdout  # shown with its byte escaped
    baseline = invoke(runner, "baseline", undecodable_names, "--classifier", "pixels")
    assert baseline.exit_code == 0, baseline.output
    tuned = invoke(
        runner, "finetune", undecodable_names, *FINETUNE, "--epochs", "1", "--no-probe", "--strategy", "full"
    )
    assert tuned.exit_code == 0, tuned.output
    model = tuned.stdout.split("model: runs:/")[1].split(";")[0]
    eight = os.fsdecode(os.path.join(os.fsencode(undecodable_names), b"eight-\xe9"))
    predicted = invoke(runner, "predict", f"runs:/{model}", eight, "--top-k", "2", "--out", workdir / "p.csv")
    assert predicted.exit_code == 0, predicted.output
    assert "eight-\\xe9" in predicted.stdout
    assert b"eight-\xe9" in (workdir / "p.csv").read_bytes()
    evaluated = invoke(runner, "evaluate", f"runs:/{model}", undecodable_names)
    assert evaluated.exit_code == 0, evaluated.output
    reports = list((workdir / "mlruns").rglob("report.txt"))
    assert reports
    for report in reports:
        assert "caf\\xe9.png" in report.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Files are written with the modes the umask gives, and a full disk is named where it is


def test_files_tlkit_writes_get_the_mode_the_umask_gives(tmp_path):
    from tlkit.core import files

    old = os.umask(0o022)
    try:
        assert (files.write_text(tmp_path / "a.txt", "x").stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (files.write_text(tmp_path / "b.txt", "x").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_a_full_disk_is_named_where_the_write_failed_not_where_it_read(tmp_path):
    from tlkit.core import files

    copy_failure = OSError(errno.ENOSPC, "No space left on device", "/tmp/source.bin", None, str(tmp_path / "x.bin"))
    message = files.disk_full_message(copy_failure)
    assert f"the disk of {tmp_path} " in message
    assert "/tmp" not in message.split("(")[0].replace(str(tmp_path), "")


# ----------------------------------------------------------------------------------------------
# SIGTERM (timeout, docker stop, systemd, Kubernetes) does what Ctrl-C does


def _children_of(pid: int) -> list[int]:
    from tlkit.core.signals import child_pids

    return child_pids(pid)


def _workers_of(pid: int) -> list[int]:
    """The children of `pid` that are forks of it (DataLoader workers), not the programs it runs (MLflow's `git`)."""

    def command_line(p: int) -> bytes:
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return b""

    return [child for child in _children_of(pid) if command_line(child) == command_line(pid)]


@pytest.mark.slow  # a fine-tune and a tune in subprocesses, ~30 s
@pytest.mark.parametrize("command", ["finetune", "tune"])
def test_sigterm_marks_the_runs_killed_prints_the_resume_line_and_leaves_no_process(tmp_path, digits_target, command):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"COLUMNS": "200"}
    backbone = ["--model", TINY_MODEL, "--no-pretrained", "--img-size", "32"]
    if command == "finetune":
        args = [digits_target, *FINETUNE, "--epochs", "300"]
    else:
        args = [digits_target, *backbone, "--trials", "50"]
    args += ["--workers", "1"]  # a DataLoader worker: a child process that SIGTERM must stop too
    process = subprocess.Popen(
        [sys.executable, "-m", "tlkit", command, *map(str, args)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="surrogateescape",
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # a fit is under way: its run RUNNING, a DataLoader worker alive
        assert process.poll() is None, process.communicate()
        # a DataLoader worker first: by then the store exists (opening it while it is created races its migration)
        children = _workers_of(process.pid)
        if children and "RUNNING" in statuses(tmp_path).values():
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, out + err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1, err
    (line,) = lines
    assert "marked KILLED" in line
    if command == "finetune":
        resume = line.split("continue it with: ")[1]
        assert resume.startswith("tlkit finetune") and " --resume " in resume
    else:
        assert "the same command resumes the study" in line
    assert "RUNNING" not in statuses(tmp_path).values()
    assert "KILLED" in statuses(tmp_path).values()
    for child in children:  # Ctrl-C's reach: the DataLoader workers ended with the command
        assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"


def test_sigterm_raises_keyboard_interrupt_once_and_interrupts_the_children(monkeypatch):
    from tlkit.core import signals

    sent = []
    monkeypatch.setattr(signals, "child_pids", lambda pid=None: [4242])
    monkeypatch.setattr(signals.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    before = signal.getsignal(signal.SIGTERM)
    with signals.terminating_as_interrupt() as received:
        signals._FORKED.clear()  # no fork of this process since (the test process may have forked before)
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)  # a second one while cleaning up: ignored
    assert received == [signal.SIGTERM]
    assert sent == [(4242, signal.SIGINT)]
    assert signal.getsignal(signal.SIGTERM) == before


SIGTERM_DURING_A_FORK = """
import os, signal, sys, time

def sigterm_now():  # an after-fork hook of the parent, as logging's lock release is: SIGTERM lands inside it
    if os.getpid() == parent:
        os.kill(parent, signal.SIGTERM)
        sum(range(1000))  # bytecodes on which Python runs the handler, still inside the hook

parent = os.getpid()
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
os.register_at_fork(after_in_parent=sigterm_now)
from tlkit.core import signals

with signals.terminating_as_interrupt() as received:
    try:
        child = os.fork()
        if child == 0:
            try:
                time.sleep(5)
            except KeyboardInterrupt:  # Ctrl-C's SIGINT, passed on once the fork is over
                os._exit(3)
            os._exit(0)
        time.sleep(10)
        print("not interrupted")
    except KeyboardInterrupt:
        _, status = os.waitpid(child, 0)
        print("interrupted", received, os.waitstatus_to_exitcode(status))
"""


def test_a_sigterm_that_lands_in_a_fork_hook_still_interrupts_the_command_and_its_new_child():
    # Python runs a signal handler inside the hooks os.fork calls, where a KeyboardInterrupt is printed as
    # "Exception ignored" and lost (a tune went on after SIGTERM, once, in CI); tlkit delivers it again after the fork
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_A_FORK], capture_output=True, text=True, timeout=60, cwd=Path.cwd()
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    assert done.stdout.strip() == f"interrupted [{int(signal.SIGTERM)}] 3"  # the child stopped on its SIGINT


def test_a_sigterm_put_off_by_a_fork_is_delivered_again_once_it_is_over(monkeypatch):
    from tlkit.core import signals

    sent = []
    monkeypatch.setattr(signals, "child_pids", lambda pid=None: [4242])
    monkeypatch.setattr(signals.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    with signals.terminating_as_interrupt() as received:
        handler = signal.getsignal(signal.SIGTERM)
        signals._FORKED[:] = [None]  # what os.fork's first hook does
        handler(signal.SIGTERM, None)  # no KeyboardInterrupt yet, no SIGINT to a child that may be starting
        assert received == [signal.SIGTERM] and sent == []
        with pytest.raises(KeyboardInterrupt):
            time.sleep(30)  # the signal comes again from a timer thread
        assert sent == [(4242, signal.SIGINT)]


def test_the_best_epoch_checkpoint_is_written_whole_or_not_at_all(tmp_path):
    from types import SimpleNamespace

    from tlkit.train.callbacks import WholeModelCheckpoint

    class Trainer:
        is_global_zero, global_step, loggers = True, 3, []
        strategy = SimpleNamespace(barrier=lambda: None)

        def __init__(self, room: int):
            self.room = room

        def save_checkpoint(self, path, weights_only=False):
            data = b"new checkpoint " * 10
            Path(path).write_bytes(data[: self.room])
            if self.room < len(data):
                raise OSError(errno.ENOSPC, "No space left on device")

    best = tmp_path / "best.ckpt"
    best.write_bytes(b"old checkpoint")
    callback = WholeModelCheckpoint(dirpath=tmp_path, filename="best")
    with pytest.raises(OSError):
        callback._save_checkpoint(Trainer(room=20), str(best))  # the disk fills mid-write
    assert best.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]
    callback._save_checkpoint(Trainer(room=1000), str(best))
    assert best.read_bytes() == b"new checkpoint " * 10
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]


# ----------------------------------------------------------------------------------------------
# Nothing a command makes outlives it


@pytest.mark.slow  # a pipeline with a tune of 2 trials and a leaderboard, ~20 s
def test_a_pipeline_with_a_tune_leaves_nothing_in_the_temporary_folder(tracked, tmp_path, digits_target, monkeypatch):
    """Each tune trial used to leave a tlkit-train-* folder with a full checkpoint, each pipeline a tlkit-compare-*."""
    import tempfile

    import yaml

    from tlkit.pipelines.pipeline import run_pipeline

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    pipeline = tmp_path / "tune.yaml"
    space = {"lr": [1e-3, 3e-3], "epochs": 2, "augment": "none", "hflip": False}
    pipeline.write_text(
        yaml.safe_dump(
            {
                "name": "litter",
                "datasets": {"d": {"path": str(digits_target), "val": 0.2, "test": 0.3}},
                "backbone": {"model": TINY_MODEL, "pretrained": False, "img_size": 32},
                "compute": {"num_workers": 0},
                "stages": [{"id": "tuned", "stage": "tune", "data": "d", "trials": 2, "space": space}],
                "seeds": [0, 1],  # a swept pipeline: its leaderboard is drawn and logged
            }
        )
    )
    summary = run_pipeline(pipeline)
    assert summary.leaderboard is not None  # the leaderboard was drawn, logged, and its folder removed
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_a_run_the_store_cannot_mark_failed_is_not_said_to_be_marked(tracked, monkeypatch):
    """The database on a full disk: the run stays RUNNING (the next command marks it), and the line says so."""
    import mlflow
    from mlflow import MlflowClient

    from tlkit.cli.process import known_failure
    from tlkit.core import tracking
    from tlkit.core.outcome import EndedRun, ended_runs

    real_end_run = mlflow.end_run

    def full(*args, **kwargs):
        real_end_run.__globals__["_active_run_stack"].get().pop()
        raise OSError(errno.ENOSPC, "database or disk is full")

    def refuse(self, run_id, status=None):
        raise OSError(errno.ENOSPC, "database or disk is full")

    with pytest.raises(OSError) as raised:
        with tracking.start_run("finetune") as run_id:
            monkeypatch.setattr(mlflow, "end_run", full)
            monkeypatch.setattr(MlflowClient, "set_terminated", refuse)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert ended_runs(raised.value) == [EndedRun(run_id, "FAILED", recorded=False)]
    monkeypatch.setattr(mlflow, "end_run", real_end_run)
    assert tracked.get_run(run_id).info.status == "RUNNING"
    monkeypatch.setattr(sys, "argv", ["tlkit", "finetune", "data"])
    hint = known_failure(raised.value)
    assert "could not be marked FAILED" in hint
    assert "is marked FAILED" not in hint
    assert hint.endswith(f"tlkit finetune data --resume {run_id}")


def _sqlite_error(tmp_path: Path, make) -> sqlite3.Error:
    """The error a real SQLite database raises when `make(path)` has spoiled it, wrapped as SQLAlchemy wraps it."""
    path = tmp_path / "store.db"
    make(path)
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA max_page_count = 2")  # a tiny limit fills like a full disk
            db.execute("CREATE TABLE IF NOT EXISTS t (x)")
            db.executemany("INSERT INTO t VALUES (?)", [("x" * 4096,)] * 8)
            db.commit()
    except sqlite3.Error as err:
        return err
    raise AssertionError("SQLite raised nothing")


def _junk(path: Path) -> None:
    path.write_bytes(b"not a database at all" * 200)


def _read_only(path: Path) -> None:
    sqlite3.connect(path).close()
    path.chmod(0o444)


@pytest.mark.parametrize(
    ("spoil", "said"),
    [
        (lambda path: None, "no space left for the tracking store"),
        (_junk, "is damaged (file is not a database)"),
        (_read_only, "is read-only"),
    ],
)
def test_store_failures_are_told_by_their_sqlite_code_wherever_they_sit(tmp_path, spoil, said):
    from tlkit.cli.process import known_failure

    if spoil is _read_only and os.geteuid() == 0:
        pytest.skip("root writes a read-only file")
    error = _sqlite_error(tmp_path, spoil)

    class DriverError(Exception):  # SQLAlchemy's DBAPIError keeps the driver's error as `.orig`
        orig = error

    wrapped = RuntimeError("the store failed")
    wrapped.__cause__ = DriverError("(sqlite3.OperationalError) ...")
    assert said in known_failure(error)
    assert said in known_failure(wrapped)


def test_a_message_that_only_sounds_like_a_store_failure_is_not_one():
    from tlkit.cli.process import known_failure

    assert known_failure(ValueError("database disk image is malformed")) is None
    assert known_failure(RuntimeError("No space left on device")) is None
