"""Runs whose process died (kill -9, a crash, a power cut) -> marked KILLED by the next command on that host.

A run left RUNNING by a dead process would stay RUNNING in MLflow for ever. Each run records the host, pid and
process start time that made it (`process_tags`); the next command on that host finds the runs whose process is
gone, marks them KILLED and says how to resume them.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tlkit.core.outcome import with_resume

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
    # the same pid, started again, is another process
    return not started or not _process_start(pid) or _process_start(pid) == started


def process_tags() -> dict[str, str]:
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
        text += (
            f"; resume with: {with_resume(command, run_id)}"
            if command
            else f"; resume it with the command that started it and --resume {run_id}"
        )
    elif run.data.tags.get("tlkit.command"):
        text += f"; run it again with: {run.data.tags['tlkit.command']}"
    return text
