"""An error or an interrupt that ends runs -> the runs it ended, carried on the exception; the command that resumes.

A run that ends because an exception leaves it (`tracking.start_run`) is noted on that exception, innermost run
first, so whoever catches it (the CLI's one-line error, the interrupted line) knows which runs ended and how; no
process-wide list is kept. This module imports nothing heavy: the CLI reads it without loading MLflow.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

_NOTES = "tlkit_ended_runs"  # the exception's attribute that holds them


@dataclass(frozen=True)
class EndedRun:
    run_id: str
    status: str  # "KILLED" (Ctrl-C, SIGTERM) or "FAILED" (an error)
    recorded: bool  # False: the store could not take the status; the run stays RUNNING until the next command


def note_ended(error: BaseException, run: EndedRun) -> None:
    """Record on `error`, as it leaves a run, that the run ended."""
    setattr(error, _NOTES, [*getattr(error, _NOTES, []), run])


def ended_runs(error: BaseException, status: str | None = None) -> list[EndedRun]:
    """The runs `error` ended (and the errors it replaced: its context), innermost first; of `status` when given."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    runs = [run for e in reversed(chain) for run in getattr(e, _NOTES, [])]
    return [r for r in runs if status is None or r.status == status]


def with_resume(command: str | Sequence[str], run_id: str) -> str:
    """The command line that continues run `run_id`: `command` with `--resume RUN_ID`, unless it names one already."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    return shlex.join(words if "--resume" in words else [*words, "--resume", run_id])
