"""tlkit as a user starts it, in its own process: what reaches the terminal, commands run in
parallel on a new store, and what Ctrl-C says."""

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL

TLKIT = [sys.executable, "-m", "tlkit"]
NOISE = (
    "Creating initial MLflow database",
    "INFO mlflow",
    "weights_only",
    "litlogger",
    "GPU available",
    "TPU available",
    "LeafSpec",
    "_pytree",
    "Warning",
    "Traceback",
)
TRAIN = ("--model", TINY_MODEL, "--no-pretrained", "--img-size", "32", "--workers", "0")


def run(args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [*TLKIT, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def assert_quiet(output: str) -> None:
    for noise in NOISE:
        assert noise not in output, f"{noise!r} reached the user:\n{output}"


def test_first_command_and_a_finetune_print_only_tlkit_lines(tmp_path, digits_source):
    """A fresh store (MLflow's table creation), a two-phase fine-tune with checkpoints (Lightning's banners)."""
    result = run(["finetune", digits_source, *TRAIN, "--epochs", "3", "--strategy", "freeze-unfreeze"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert_quiet(result.stdout + result.stderr)
    assert "heldout_accuracy" in result.stdout
    assert (tmp_path / "mlflow.db").exists()


def test_library_callers_get_no_lightning_chatter_either(tmp_path, digits_source):
    script = (
        "from tlkit.core import tracking\n"
        "from tlkit.config import BackboneConfig, TrainConfig\n"
        "from tlkit.runs.stages import RunOptions, run_train\n"
        "tracking.configure(None, 'lib')\n"
        f"backbone = BackboneConfig(model={TINY_MODEL!r}, pretrained=False, img_size=32)\n"
        f"r = run_train({str(digits_source)!r}, backbone, "
        "TrainConfig(epochs=2, strategy='freeze-unfreeze', augment='none'), run=RunOptions(progress=False))\n"
        "print('accuracy', r.metrics['heldout_accuracy'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_quiet(result.stdout + result.stderr)
    assert result.stdout.startswith("accuracy")


@pytest.mark.slow  # a minute of processes, servers or browsers: with the slow tests
def test_parallel_commands_on_a_new_store_all_succeed(tmp_path, digits_source):
    """Several processes creating mlflow.db at once crashed in MLflow's schema migration; now one creates it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    commands = [
        ["baseline", digits_source, "--classifier", "pixels"],
        ["baseline", digits_source, "--classifier", "pixels", "--seed", "1"],
        ["extract", digits_source, *TRAIN],
        ["ingest", digits_source, "--out", "m.json"],
    ]
    processes = [
        subprocess.Popen(
            [*TLKIT, *map(str, c)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in commands
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    assert all(code == 0 for code, _ in results), results
    assert not any("Traceback" in err for _, err in results)


def test_ctrl_c_names_the_run_and_the_command_that_resumes_it(tmp_path, digits_source):
    args = [*TLKIT, "finetune", str(digits_source), *TRAIN, "--epochs", "400", "--strategy", "freeze-unfreeze"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not glob.glob(str(tmp_path / ".tlkit/checkpoints/*/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.3)  # the first checkpoint: training is under way
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("interrupted: run "), err
    run_id = lines[0].split()[2]
    assert lines[0].endswith(
        f"continue it with: tlkit finetune {digits_source} {' '.join(TRAIN)} --epochs 400 --strategy freeze-unfreeze "
        f"--resume {run_id}"
    )


def imported_by(args, cwd: Path) -> set[str]:
    """The heavy libraries a CLI command imports, run as a user runs it, in a fresh process."""
    script = (
        "import sys\n"
        "from tlkit.cli import main\n"
        f"sys.argv = ['tlkit', *{[str(a) for a in args]!r}]\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
        "print('IMPORTED', *sorted(m for m in ('lightning', 'torchmetrics', 'torch', 'timm', 'albumentations', "
        "'sklearn') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"TLKIT_CACHE": str(cwd / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split("IMPORTED")[-1].split())


@pytest.mark.slow  # a minute of processes, servers or browsers: with the slow tests
def test_predict_and_a_cached_extract_import_only_what_they_need(tmp_path, digits_source):
    """Lightning costs seconds to import: predict never needs it, and features from the cache need no model at all."""
    from tlkit.core import runtime

    extract = ["extract", digits_source, *TRAIN]
    computed = imported_by(extract, tmp_path)
    assert {"torch", "timm"} <= computed
    if not runtime.may_have_gpu():  # one CPU: a plain loop; Lightning's predict loop is for GPUs and several devices
        assert "lightning" not in computed
    assert imported_by(extract, tmp_path) == set()  # the cache, and the backbone's card: no torch, no timm
    baseline = run(["baseline", digits_source, *TRAIN[:-2]], tmp_path)
    assert baseline.returncode == 0, baseline.stderr
    run_id = baseline.stdout.split("MLflow run ")[1].split()[0]
    image = next(Path(digits_source).rglob("*.png"))
    used = imported_by(["predict", f"runs:/{run_id}", image], tmp_path)
    assert "torch" in used
    assert not used & {"lightning", "torchmetrics"}
    assert not imported_by(["ingest", digits_source, "--out", "m.json"], tmp_path) & {"lightning", "torch", "timm"}


@pytest.mark.slow  # three fine-tune processes, ~20 s
def test_a_fine_tune_piped_to_a_file_writes_a_line_per_epoch_as_it_goes(tmp_path, digits_source):
    """Output to a file (nohup, CI, tee): plain lines, flushed while training runs, no control characters."""
    log = tmp_path / "log.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TLKIT_PROGRESS"))}
    with open(log, "w") as out:
        process = subprocess.Popen(
            # select: val scores every epoch (with random weights and a test split, refit would train on val)
            [
                *TLKIT,
                "finetune",
                str(digits_source),
                *TRAIN,
                "--epochs",
                "40",
                "--strategy",
                "full",
                "--use-val",
                "select",
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while "epoch 2/40" not in log.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()
                time.sleep(0.2)
            assert process.poll() is None  # read while the command still runs
        finally:
            process.kill()
            process.wait()
    text = log.read_text()
    first = next(line for line in text.splitlines() if line.startswith("epoch 1/40"))
    assert "elapsed, eta" in first
    assert "train_loss" in first
    assert "val_accuracy" in first
    assert "\x1b" not in text
    assert "\r" not in text  # no colours, no cursor moves, no redrawn bars
    quiet = subprocess.run(
        [*TLKIT, "finetune", str(digits_source), *TRAIN, "--epochs", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "TLKIT_PROGRESS": "off"},
        timeout=300,
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "epoch 1/1" not in quiet.stdout, quiet.stderr
    wrong = subprocess.run(
        [*TLKIT, "finetune", str(digits_source), *TRAIN],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "TLKIT_PROGRESS": "bars"},
        timeout=300,
    )
    assert wrong.returncode == 1
    assert wrong.stderr.strip().startswith("error: TLKIT_PROGRESS='bars'")
    assert len(wrong.stderr.splitlines()) == 1
