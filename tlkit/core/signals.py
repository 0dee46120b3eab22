"""SIGTERM -> what Ctrl-C does: a command stopped by `timeout`, `docker stop`, systemd, Kubernetes or Ray ends as
one stopped from the keyboard (its child processes stopped, its runs marked KILLED, the resume line printed).

Ctrl-C at a terminal sends SIGINT to every process of the foreground group: the command, its job processes and
their DataLoader workers, each of which then stops in its own way. SIGTERM reaches only the process it is sent to,
so the handler passes SIGINT on to this process's children first, then raises KeyboardInterrupt here. The command
line installs it (`terminating_as_interrupt`); importing tlkit installs nothing.

A fork (a DataLoader starting its workers) puts a SIGTERM off by a tenth of a second. Python runs a signal
handler inside the hooks that `os.fork` calls (logging's lock release), and a new child runs its own hooks in its
first moments; a KeyboardInterrupt raised in either place cannot be caught: it is printed as "Exception ignored"
and lost (the command went on; seen in fresh-clone CI runs, a tune starting a trial's worker). So the first
SIGTERM after a fork is delivered again once no fork has happened for RETRY_AFTER_FORK_S.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def child_pids(pid: int | None = None) -> list[int]:
    """The live child processes of `pid` (default: this process): from /proc on Linux, else multiprocessing's."""
    pid = os.getpid() if pid is None else pid
    tasks = Path(f"/proc/{pid}/task")
    if tasks.is_dir():
        children: set[int] = set()
        for task in tasks.iterdir():
            try:
                children.update(int(c) for c in (task / "children").read_text().split())
            except (OSError, ValueError):
                continue
        return sorted(children)
    if pid != os.getpid():
        return []
    return [p.pid for p in multiprocessing.active_children() if p.pid is not None]


def interrupt_children() -> list[int]:
    """SIGINT to each child process, as the terminal's Ctrl-C would send it; the pids signalled."""
    signalled = []
    for child in child_pids():
        try:
            os.kill(child, signal.SIGINT)
            signalled.append(child)
        except (ProcessLookupError, PermissionError):
            continue
    return signalled


_FORKED: list[None] = []  # not empty once this process forked since its SIGTERM handler last looked
MAX_DEFERRALS = 20  # forks that keep coming (never seen) do not put a SIGTERM off for more than 2 s
_FORK_HOOKS: list[bool] = []  # registered once in a process, by the first `terminating_as_interrupt`
RETRY_AFTER_FORK_S = 0.1  # a fork's hooks, in parent and child, take well under a millisecond


def _watch_forks() -> None:
    # `before` hooks run in reverse order of registration, so this one, registered after logging's, runs first.
    # It is a C callable (a list method): there is no Python frame in it where a signal handler could run.
    # os.register_at_fork has no way to unregister: it stays for the life of the process, only noting forks.
    if not _FORK_HOOKS and hasattr(os, "register_at_fork"):
        noted = functools.partial(_FORKED.__setitem__, slice(None), [None])  # _FORKED[:] = [None]
        os.register_at_fork(before=noted, after_in_child=_FORKED.clear)
        _FORK_HOOKS.append(True)


def _deliver_later(signum: int) -> threading.Timer:
    """`signum` to the main thread again in RETRY_AFTER_FORK_S (unless the timer is cancelled)."""
    timer = threading.Timer(RETRY_AFTER_FORK_S, signal.pthread_kill, (threading.main_thread().ident, signum))
    timer.daemon = True
    timer.start()
    return timer


_INTERRUPTED: list[None] = []  # not empty once a run of this command was ended by an interrupt (`note_interrupted`)


def note_interrupted() -> None:
    """The command is stopping on an interrupt: a SIGTERM put off by a fork is not delivered again. Lightning stops a
    fit on its own SIGTERM flag, and Optuna stores a trial's interrupt and records the trial before raising it
    again; a second KeyboardInterrupt landing in that record-keeping replaces the first with Optuna's own error (seen
    in fresh-clone CI runs: a tune's trial marked KILLED, then an UnboundLocalError and a traceback)."""
    _INTERRUPTED[:] = [None]


def _stopping() -> bool:
    """Whether this command is stopping: a run ended by an interrupt, or this thread is handling a KeyboardInterrupt
    or SystemExit (or an error raised while doing so)."""
    if _INTERRUPTED:
        return True
    err = sys.exc_info()[1]
    while err is not None:
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            return True
        err = err.__context__
    return False


@contextmanager
def terminating_as_interrupt() -> Iterator[list[int]]:
    """Inside, the first SIGTERM interrupts the children and raises KeyboardInterrupt in the main thread; a second
    one, while that clean-up runs, is ignored (a supervisor that will not wait sends SIGKILL next). Yields the list
    of signals received, empty until SIGTERM came."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread() or sys.platform == "win32":
        yield received  # signal handlers belong to the main thread (and Windows has no SIGTERM to catch from outside)
        return

    deferred: list[threading.Timer] = []  # a SIGTERM came after a fork and is delivered again by these

    def on_sigterm(signum, frame) -> None:
        if received and not deferred:
            return
        received[:] = [signum]
        # in os.fork's hooks, or its child may still be in its own: the interrupt would be lost
        if _FORKED and len(deferred) < MAX_DEFERRALS:
            _FORKED.clear()
            deferred.append(_deliver_later(signum))
            return
        deferred.clear()
        interrupt_children()
        if not _stopping():  # a Lightning fit may have stopped on its own SIGTERM flag in the meantime
            raise KeyboardInterrupt

    _watch_forks()
    _INTERRUPTED.clear()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        for timer in deferred:  # the command stopped another way meanwhile: no SIGTERM after the handler is gone
            timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        _INTERRUPTED.clear()


class Held:
    """The Ctrl-C and SIGTERM that came while `held` held them; `deliver` lets them through."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def deliver(self) -> None:
        """Each held signal to its own handler, now (a KeyboardInterrupt raised here)."""
        pending, self.signals = self.signals, []
        for signum in pending:
            signal.raise_signal(signum)  # Python runs the handler before raise_signal returns


@contextmanager
def held() -> Iterator[Held]:
    """Inside, Ctrl-C and SIGTERM wait, so that a KeyboardInterrupt cannot land between two steps that must happen
    together (MLflow creating a run and tlkit taking charge of ending it). Those that came are delivered when the
    block ends by an error, otherwise by `Held.deliver`. Only signals with a Python handler are held (a SIGTERM left
    at its default still ends the process at once), and only in the main thread, where Python runs handlers."""
    holding = Held()
    if threading.current_thread() is not threading.main_thread():
        yield holding
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in saved.items():
        if callable(handler):
            signal.signal(signum, lambda s, frame: holding.signals.append(s))
    try:
        yield holding
    except BaseException:
        _restore(saved)
        holding.deliver()
        raise
    _restore(saved)


def _restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        if signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)
