"""A pipeline's points in parallel: `tlkit run --jobs N` runs up to N (grid point, seed) pairs at once,
each in a process of its own with its share of the cores (torch threads, DataLoader workers).

Small models on small batches use cores poorly: on 2 cores an EfficientNet-Lite0 training step at
96 px takes 105 ms on 2 threads and 169 ms on 1 thread with another job beside it, so two jobs do 1.24x
the steps; the whole photos pipeline runs 1.13-1.21x faster (bench/jobs.py), start-up and the last point
alone taking the rest.

Every point still nests under the one pipeline run (its MLflow parent is passed in), and a stage that
several points share (the same inputs, so the same `tlkit.stage_key`) is still computed once: a job
holds a lock named by the key while it looks for a finished run and computes, so another job that
needs the same stage waits for it and then reuses its run, as one sequential process would.
A failing point stops the others (their runs end KILLED); Ctrl-C stops them all.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from tlkit.core import runtime, tracking
from tlkit.errors import TlkitError
from tlkit.pipelines.points import PointRun, Progress, SummaryRow, run_point
from tlkit.pipelines.sweep import Plan, Point

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks
    fcntl = None  # type: ignore[assignment]

_JOB: dict = {}  # what the initializer hands every task of this job process


def run_points(points: list[Point], how: PointRun, *, jobs: int) -> list[list[SummaryRow]]:
    """Each point's summary rows, in the order of `points`, computed by `jobs` processes (`how`: the pipeline's
    plan, progress, store, experiment and run, which the points nest under)."""
    console, tracking_uri, parent_run_id = how.console, how.tracking_uri, how.parent_run_id
    if fcntl is None:
        raise TlkitError("--jobs needs file locks (Linux or macOS); run without --jobs here")
    # not fork: torch's thread pools and MLflow's connections do not survive a fork
    context = multiprocessing.get_context("spawn")
    counter, stop = context.Value("i", 0), context.Event()
    cores = max(1, runtime.cpu_share() // jobs)
    locks = tempfile.mkdtemp(prefix="tlkit-jobs-")
    console.print(
        f"{len(points)} points, {jobs} at a time ({cores} core{'s' if cores > 1 else ''} each); a line per finished "
        "stage",
        highlight=False,
    )
    job = {
        "counter": counter,
        "stop": stop,
        "locks": Path(locks),
        "total": how.progress.total,
        "start": how.progress.start,
        "tracking_uri": tracking.resolve_tracking_uri(tracking_uri),
        "experiment": how.experiment,
        "reuse": how.reuse,
    }
    try:
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_start_job, initargs=(cores, job)
        ) as pool:
            futures = [pool.submit(_run_job, point, how.plan, parent_run_id) for point in points]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                failed = next(
                    (f for f in futures if f.done() and not f.cancelled() and f.exception() is not None), None
                )
                if failed is not None:
                    _stop_jobs(stop, futures, interrupt=True)
                    if isinstance(failed.exception(), BrokenProcessPool):
                        raise TlkitError(
                            "a job's process ended abruptly (out of memory, or killed); its point's runs may be left "
                            f"RUNNING; run again with fewer --jobs than {jobs}"
                        ) from None
                    raise failed.exception() or RuntimeError("a job failed")
            except KeyboardInterrupt:  # the jobs got Ctrl-C from the terminal too: let them mark their runs KILLED
                _stop_jobs(stop, futures, interrupt=False)
                raise
            return [f.result() for f in futures]
    except BaseException:
        # The pool has shut down: every job process is gone. A job whose Ctrl-C landed inside a database write
        # may have left its run RUNNING; its process is gone, so mark it KILLED now rather than at the next command.
        tracking.reap_dead_runs(tracking.resolve_tracking_uri(tracking_uri), quiet=True)
        raise
    finally:
        shutil.rmtree(locks, ignore_errors=True)


def _stop_jobs(stop, futures, *, interrupt: bool) -> None:
    """Start nothing more; with `interrupt`, stop the running points as Ctrl-C would (their runs end KILLED)."""
    stop.set()
    for future in futures:
        future.cancel()
    if interrupt:
        for child in multiprocessing.active_children():
            try:
                if child.pid is not None:
                    os.kill(child.pid, signal.SIGINT)
            except ProcessLookupError:
                pass


def _start_job(cores: int, job: dict) -> None:
    """A job process starts: `cores` threads, no bars, the pipeline's store and experiment; `job` holds what its
    tasks share (the counter of finished stages, the stop event, the lock folder, the progress clock, reuse)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops a point, not an idle job waiting for one (see _run_job)
    runtime.quiet()
    runtime.tune_allocator()
    runtime.use_cpus(cores)
    runtime.hide_progress_bars()
    tracking.configure(job["tracking_uri"], job["experiment"])
    _JOB.update(job)


def _count() -> int:
    """One more stage done, over all the jobs: the new total."""
    counter = _JOB["counter"]
    with counter.get_lock():
        counter.value += 1
        return counter.value


@contextmanager
def _claim(key: str):
    """Hold `key` against the other jobs: the first to ask computes the stage, the others wait here."""
    with open(_JOB["locks"] / key, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_job(point: Point, plan: Plan, parent_run_id: str | None) -> list[SummaryRow]:
    if _JOB["stop"].is_set():  # another point failed or Ctrl-C: this one was queued already
        raise TlkitError("stopped before it started")
    progress = Progress(_JOB["total"], start=_JOB["start"], count=_count)
    how = PointRun(
        plan=plan,
        progress=progress,
        tracking_uri=_JOB["tracking_uri"],
        reuse=_JOB["reuse"],
        console=Console(markup=False, soft_wrap=True),
        claim=_claim,
        parent_run_id=parent_run_id,
        lines=True,
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_point(point, how, {})
    except TlkitError as err:  # the jobs' lines interleave: say which point
        raise TlkitError(f"{point.label}: {err}") from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
