"""SIGTERM -> what Ctrl-C does: a command stopped by `timeout`, `docker stop`, systemd, Kubernetes or Ray ends as
one stopped from the keyboard (its child processes stopped, its runs marked KILLED, the resume line printed).

Ctrl-C at a terminal sends SIGINT to every process of the foreground group: the command, its job processes and
their DataLoader workers, each of which then stops in its own way. SIGTERM reaches only the process it is sent to,
so the handler passes SIGINT on to this process's children first, then raises KeyboardInterrupt here. The command
line installs it (`terminating_as_interrupt`); importing tlkit installs nothing.
"""

from __future__ import annotations

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


@contextmanager
def terminating_as_interrupt() -> Iterator[list[int]]:
    """Inside, the first SIGTERM interrupts the children and raises KeyboardInterrupt in the main thread; a second
    one, while that clean-up runs, is ignored (a supervisor that will not wait sends SIGKILL next). Yields the list
    of signals received, empty until SIGTERM came."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread() or sys.platform == "win32":
        yield received  # signal handlers belong to the main thread (and Windows has no SIGTERM to catch from outside)
        return

    def on_sigterm(signum, frame) -> None:
        if received:
            return
        received.append(signum)
        interrupt_children()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
