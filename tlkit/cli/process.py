"""A command's process: configured at its start, SIGTERM as Ctrl-C, and every failure one line with its exit code."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

import typer

from tlkit.cli.output import WarningLine, error_line, errors
from tlkit.core import signals
from tlkit.core.outcome import ended_runs, with_resume
from tlkit.errors import TlkitError


def command(func):
    """Run a command with tlkit's runtime settings; user errors become one line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from tlkit.core import runtime

        runtime.quiet()
        tlkit_log = logging.getLogger("tlkit")
        if not any(isinstance(h, WarningLine) for h in tlkit_log.handlers):
            tlkit_log.addHandler(WarningLine())
            tlkit_log.propagate = False
        runtime.tune_allocator()
        # the command line, recorded on its runs (tracking.reap_dead_runs)
        if Path(sys.argv[0]).name in ("tlkit", "__main__.py"):
            os.environ["TLKIT_COMMAND"] = shlex.join(["tlkit", *sys.argv[1:]])
        stopping = contextlib.ExitStack()
        terminated = stopping.enter_context(signals.terminating_as_interrupt())  # SIGTERM does what Ctrl-C does
        try:
            runtime.progress_mode()  # a bad TLKIT_PROGRESS is said before any work
            if "tracking_uri" in kwargs:  # a damaged store is said before MLflow (1.5 s) and the rest load
                from tlkit.core.files import check_sqlite_store

                check_sqlite_store(kwargs["tracking_uri"])
            return func(*args, **kwargs)
        except TlkitError as err:
            error_line(str(err))
            raise typer.Exit(1) from None
        except Exception as err:  # noqa: BLE001  the failures of a machine or a store, not of tlkit: one line too
            message = known_failure(err)
            if message is None:
                raise
            error_line(message)
            raise typer.Exit(1) from None
        except (KeyboardInterrupt, SystemExit) as stop:  # Lightning ends a fit interrupted by Ctrl-C with SystemExit
            if isinstance(stop, SystemExit) and not _killed(stop):
                raise
            errors.print(_interrupted_message(stop), highlight=False, soft_wrap=True)
            raise typer.Exit(128 + (terminated[0] if terminated else signal.SIGINT)) from None
        finally:
            stopping.close()

    return wrapper


# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF): what went wrong with a store's file
_SQLITE_READONLY, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 8, 11, 13, 26


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the errors behind it (causes, contexts, a database driver's original error)."""
    chain: list[BaseException] = []
    seen: list[BaseException | None] = [err]
    while seen and len(chain) < 20:
        e = seen.pop(0)
        if e is None or e in chain:
            continue
        chain.append(e)
        original = getattr(e, "orig", None)  # SQLAlchemy's DBAPIError holds the driver's error here
        seen += [e.__cause__, e.__context__, original if isinstance(original, BaseException) else None]
    return chain


def _sqlite_code(chain: list[BaseException]) -> int | None:
    import sqlite3

    for e in chain:
        code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
        if isinstance(e, sqlite3.Error) and isinstance(code, int):
            return code & 0xFF
    return None


def known_failure(err: BaseException) -> str | None:
    """One line for the failures that come from the machine or the tracking store (a full disk, a damaged or
    read-only database), told by their type wherever in the chain of exceptions they sit; None for anything else
    (a bug: its traceback)."""
    from tlkit.core.files import disk_full_message, is_disk_full

    chain = _chain(err)
    resume = _resume_hint(err)
    for e in chain:
        if isinstance(e, OSError) and is_disk_full(e):
            return disk_full_message(e) + resume
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename:
            return (
                f"cannot write {e.filename} ({e.strerror}); run tlkit in a folder you can write, or point its output "
                "(--out, --tracking-uri, TLKIT_CACHE) elsewhere"
            )
    code = _sqlite_code(chain)
    if code not in (_SQLITE_FULL, _SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_READONLY):
        return None
    from tlkit.core import tracking  # loaded already: the error came from its store

    store = tracking.target_uri()
    if code == _SQLITE_FULL:
        return f"no space left for the tracking store {store}; free some space and run the command again" + resume
    if code == _SQLITE_READONLY:
        return (
            f"the tracking store {store} is read-only; run tlkit where you can write, or pass --tracking-uri for a "
            "store you can write"
        )
    what = "database disk image is malformed" if code == _SQLITE_CORRUPT else "file is not a database"
    return (
        f"the tracking store {store} is damaged ({what}); restore it from a backup, or start a new store with "
        "--tracking-uri sqlite:///new.db (or move the damaged file away)"
    )


def _resume_hint(err: BaseException) -> str:
    """For a fine-tune or pretrain that `err` ended: the run's state and the command that continues it."""
    failed = ended_runs(err, "FAILED")
    argv = sys.argv[1:]
    if not failed or not argv or argv[0] not in ("finetune", "pretrain"):
        return ""
    recorded = [r for r in failed if r.recorded]
    run = (recorded or failed)[-1]  # the outermost
    state = (
        "is marked FAILED"
        if run.recorded
        else "could not be marked FAILED (the store could not write; the next tlkit command marks it KILLED)"
    )
    again = with_resume(["tlkit", *argv], run.run_id)
    return f"; run {run.run_id} {state} and continues from its last checkpoint with: {again}"


def _killed(stop: BaseException) -> list[str]:
    """The runs the interrupt `stop` marked KILLED, innermost first."""
    return [r.run_id for r in ended_runs(stop, "KILLED") if r.recorded]


def _interrupted_message(stop: BaseException) -> str:
    """One line: which run was marked KILLED and the exact command that continues it."""
    killed = _killed(stop)
    if not killed:
        return "interrupted before any MLflow run started; nothing to resume"
    run_id, argv = killed[-1], sys.argv[1:]  # the outermost run
    command = argv[0] if argv else ""
    if command in ("finetune", "pretrain"):  # resuming again keeps the id that was given
        return (
            f"interrupted: run {run_id} is marked KILLED in MLflow; continue it with: "
            f"{with_resume(['tlkit', *argv], run_id)}"
        )
    if command == "tune":
        return (
            f"interrupted: study run {run_id} and its open trial are marked KILLED; the same command resumes the "
            f"study: {shlex.join(['tlkit', *argv])}"
        )
    if command == "run":  # without --fresh, which would recompute the stages that did finish
        again = [a for a in argv if a != "--fresh"]
        return (
            f"interrupted: pipeline run {run_id} and its open runs are marked KILLED; run the same command again and "
            f"finished stages are reused: {shlex.join(['tlkit', *again])}"
        )
    return f"interrupted: run {run_id} is marked KILLED in MLflow"
