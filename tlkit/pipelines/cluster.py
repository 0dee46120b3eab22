"""A pipeline's points on a Ray cluster: `tlkit run PIPELINE --ray ADDRESS` sends each (grid point, seed) to the
cluster as a task that asks for the cores (and GPU) its stages need; `tlkit tune --ray ADDRESS --ray-workers N`
runs N tune workers on one study.

What holds across machines, and how:
- Every point's runs nest under the one pipeline run, in a tracking server every node reaches (a local
  sqlite:/// store is refused when the cluster has more than one node); each run is tagged with the node
  it ran on (`tlkit.node`, `tlkit.node_ip`).
- A stage that several points share is computed once: the file lock of --jobs becomes a lock held by a
  small Ray actor on the head node (`_Coordinator`), which also counts finished stages for the
  '[done/total, minutes]' lines. A lock whose holder's node is gone is free again; a retried point
  takes over the locks its lost attempt held.
- A lost node or worker process: Ray runs the point again elsewhere (`ray.max_retries`, default 3). The
  new attempt first marks KILLED the runs the lost one left RUNNING, then runs the point again; finished
  stages are reused (as the same command would after a crash); a training stage that had saved an epoch
  continues from that checkpoint when the checkpoint folder is shared (same path on every node), in a new run
  tagged `tlkit.resumed_from`.
- Data is read from the same path on every node (a shared filesystem), not shipped through Ray's object
  store: image folders of thousands of JPEGs, their decoded caches and the feature cache are what the
  stages read many times, and a shared folder lets nodes reuse each other's caches. Before any point runs,
  a task on every node checks that it can read the folder tlkit runs in and every path the pipeline names;
  a node that cannot is named in a one-line error.
- A point that fails for a real reason (bad data) stops the others (their runs end KILLED) and fails the
  pipeline with that point's one-line error; Ctrl-C cancels every task the same way.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tlkit.core import runtime, tracking
from tlkit.errors import TlkitError
from tlkit.pipelines.points import PointRun, Progress, SummaryRow, run_point
from tlkit.pipelines.sweep import Point

if TYPE_CHECKING:
    from tlkit.pipelines.schema import RayConfig
    from tlkit.pipelines.tune import TuneJob
    from tlkit.runs.stages import RunOptions

EXTRA = "pip install 'tlkit[ray]'"
TRAINING_STAGES = ("pretrain", "finetune", "tune")
HEAD = "node:__internal_head__"  # the resource Ray gives its head node alone
CANCEL_WAIT_S = 60.0  # how long Ctrl-C waits for cancelled points to mark their runs KILLED
# Points finishing as another fails are let finish, not cancelled: Ray's cancel racing a task's completion can end
# the driver with "Tried to complete task that was not pending" (ray-project/ray#54738; seen with Ray 2.60 in
# tests/test_cluster.py, where two points end their last stage together). This narrows that window; it cannot close it.
CANCEL_GRACE_S = 1.0


def import_ray():
    """The `ray` module, or a one-line error naming the extra."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every point's lines, not "[repeated 3x across cluster]"
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a file or a CI log
    try:
        import ray
    except ImportError:
        raise TlkitError(f"--ray needs Ray, an optional extra: {EXTRA}") from None
    return ray


def _bootstrap(address: str) -> str | None:
    """HOST:PORT that `address` leads to: itself, or for auto $RAY_ADDRESS or the cluster this machine joined last."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto":
            current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
            address = current.read_text().strip() if current.is_file() else ""
    return address.split("://", 1)[-1] or None


def check_reachable(address: str, *, timeout: float = 5.0) -> None:
    """A one-line error when nothing answers at the cluster's address (Ray itself would wait for it for ever)."""
    target = _bootstrap(address)
    if target is None:
        return  # auto with no cluster known here: Ray says so at once
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        via = f" (where {address!r} leads)" if target != address.split("://", 1)[-1] else ""
        raise TlkitError(
            f"nothing answers at {target}{via}: {getattr(err, 'strerror', None) or err}; start the cluster with "
            "`ray start --head` or give its address (HOST:6379, ray://HOST:10001)"
        ) from None


@contextmanager
def connected(address: str):
    """Connected to the cluster at `address` (auto, HOST:PORT or ray://HOST:10001) for the block."""
    ray = import_ray()
    check_reachable(address)
    env = {k: v for k, v in os.environ.items() if k.startswith(("TLKIT_", "MLFLOW_")) and k != "TLKIT_CPUS"}
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING", log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TlkitError(
            f"cannot connect to the Ray cluster at {address!r} ({first}); start one with `ray start --head` "
            "or give its address (auto, HOST:6379, ray://HOST:10001)"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def alive_nodes(ray) -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def check_store(tracking_uri: str, nodes: int) -> None:
    """A store that lives in this machine's files cannot be shared by the nodes of a real cluster."""
    local = tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
    if local and nodes > 1:
        raise TlkitError(
            f"the tracking store {tracking_uri} is a file on this machine, which the {nodes} nodes of the Ray cluster "
            "cannot share; start an MLflow server (mlflow server --backend-store-uri sqlite:///mlflow.db --host "
            "0.0.0.0) and pass --tracking-uri http://THIS_HOST:5000"
        )


def check_paths(ray, nodes: list[dict], paths: list[str]) -> None:
    """Every node can read every path (the folder tlkit runs in first), or a one-line error naming the node and the
    path."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    find_missing = ray.remote(num_cpus=0, max_retries=0)(_missing)
    refs = {
        node["NodeManagerAddress"]: find_missing.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(paths)
        for node in nodes
    }
    for address, ref in refs.items():
        missing = ray.get(ref, timeout=120)
        if missing:
            raise TlkitError(
                f"node {address} cannot read {missing[0]}; every node reads the data from the same path: put it on a "
                "filesystem all nodes mount there (or run without --ray)"
            )


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.access(p, os.R_OK)]


def point_paths(points: list[Point]) -> list[str]:
    """The folder tlkit runs in, then every dataset folder, weights, augmentation and space file the points name."""
    found = [os.getcwd()]
    for point in points:
        config = point.config
        for spec in config.datasets.values():
            found.append(str(Path(spec.folder).resolve()))
        for stage in config.stages:
            for value in (
                getattr(stage, "weights", None),
                getattr(getattr(stage, "train", None), "augment", None),
                getattr(stage, "space", None),
            ):
                if isinstance(value, str) and Path(value).is_absolute():
                    found.append(value)
        if config.backbone.weights and Path(config.backbone.weights).is_absolute():
            found.append(config.backbone.weights)
    return list(dict.fromkeys(found))


def point_resources(point: Point, settings: RayConfig, cluster_gpus: float) -> dict[str, float]:
    """What a point's task asks of the cluster: its cores, and a GPU when it trains and the cluster has one."""
    gpus = settings.num_gpus
    if gpus is None:
        trains = any(stage.stage in TRAINING_STAGES for stage in point.config.stages)
        gpus = 1.0 if trains and cluster_gpus > 0 and str(point.config.compute.devices) != "cpu" else 0.0
    return {"num_cpus": settings.num_cpus, "num_gpus": gpus}


def point_token(parent_run_id: str, point: Point) -> str:
    """Names a point of one pipeline run across its attempts (the tag `tlkit.ray_point`)."""
    return hashlib.sha256(f"{parent_run_id}\0{point.label}".encode()).hexdigest()[:16]


class _Coordinator:
    """Lives on the head node for one pipeline run: the stage locks, and the count of finished stages."""

    def __init__(self):
        self.held: dict[str, tuple[str, str]] = {}  # stage key -> (holder's token, holder's node id)
        self.done = 0
        self.done_by: dict[str, int] = {}  # point token -> stages its current attempt finished

    def acquire(self, key: str, token: str, node: str) -> bool:
        holder = self.held.get(key)
        if holder is None or holder[0] == token or not self._alive(holder[1]):
            self.held[key] = (token, node)
            return True
        return False

    def release(self, key: str, token: str) -> None:
        if self.held.get(key, ("", ""))[0] == token:
            del self.held[key]

    def release_all(self, token: str) -> None:
        """An attempt of a point starts: whatever an earlier, lost attempt of it held is free, and its stages count no
        more."""
        for key in [k for k, (holder, _) in self.held.items() if holder == token]:
            del self.held[key]
        self.done -= self.done_by.pop(token, 0)

    def step(self, token: str) -> int:
        self.done += 1
        self.done_by[token] = self.done_by.get(token, 0) + 1
        return self.done

    @staticmethod
    def _alive(node: str) -> bool:
        import ray

        return any(n["NodeID"] == node and n.get("Alive") for n in ray.nodes())


def run_points(points: list[Point], how: PointRun, *, settings: RayConfig, ray) -> list[list[SummaryRow]]:
    """Each point's summary rows, in the order of `points`, computed as tasks on the connected cluster (`how`: the
    pipeline's plan, progress, store (resolved), experiment and run, which the points nest under)."""
    tracking_uri, parent_run_id, console = str(how.tracking_uri), str(how.parent_run_id), how.console
    nodes = alive_nodes(ray)
    resources_total = ray.cluster_resources()
    gpus = float(resources_total.get("GPU", 0))
    # on the head node, which the cluster cannot lose and go on (its GCS is there): not on a worker node that may be
    # lost
    coordinator = ray.remote(num_cpus=0, max_restarts=0)(_Coordinator).options(resources={HEAD: 0.001}).remote()
    task = ray.remote(_run_point_task)
    job = {
        "plan": how.plan,
        "parent_run_id": parent_run_id,
        "experiment": how.experiment,
        "tracking_uri": tracking_uri,
        "reuse": how.reuse,
        "total": how.progress.total,
        "start": how.progress.start,
        "cwd": os.getcwd(),
        "coordinator": coordinator,
    }
    refs = []
    for point in points:
        resources = point_resources(point, settings, gpus)
        refs.append(
            task.options(
                **resources, max_retries=settings.max_retries, retry_exceptions=False, name=f"tlkit point {point.label}"
            ).remote(point, job, resources["num_cpus"])
        )
    console.print(
        f"{len(points)} points on the Ray cluster ({len(nodes)} node{'s' if len(nodes) > 1 else ''}, "
        f"{resources_total.get('CPU', 0):g} CPUs, {gpus:g} GPUs); a line per finished stage",
        highlight=False,
    )
    labels = {ref: point.label for ref, point in zip(refs, points)}
    rows, pending = {}, list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                rows[ref] = _result(ray, ref, labels[ref], settings.max_retries)
    except BaseException:
        _cancel(ray, refs)
        end_runs(tracking_uri, f"tags.`tlkit.ray_pipeline` = '{parent_run_id}'")  # whatever a lost task left RUNNING
        raise
    return [rows[ref] for ref in refs]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _result(ray, ref, label: str, retries: int):
    """The task's result, or its error as a one-line TlkitError (the first line of the task's own error)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if err.cause is not None else err
        if isinstance(cause, TlkitError):
            raise TlkitError(str(cause) if str(cause).startswith(f"{label}: ") else f"{label}: {cause}") from None
        raise TlkitError(f"{label}: {type(cause).__name__}: {_first_line(cause)}") from None
    except ray.exceptions.RayError as err:
        raise TlkitError(
            f"{label}: its task was lost {retries + 1} times ({type(err).__name__}: {_first_line(err)}); "
            "check the cluster's nodes (ray status) and run again: finished stages are reused"
        ) from None


def _cancel(ray, refs: list) -> None:
    """Stop every unfinished task as Ctrl-C stops a local point: it gets KeyboardInterrupt and ends its runs KILLED."""
    try:
        _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
    except Exception:  # noqa: BLE001
        unfinished = list(refs)
    for ref in unfinished:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001
            pass
    try:
        ray.wait(unfinished, num_returns=len(unfinished), timeout=CANCEL_WAIT_S)
    except Exception:  # noqa: BLE001
        pass


def end_runs(tracking_uri: str, tag_filter: str) -> list[str]:
    """Mark KILLED the RUNNING runs matching `tag_filter` (their process is lost or cancelled). Returns those
    runs and the ones already KILLED (a reaper on the same host may have been first), newest first."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    store = MlflowClient(tracking_uri)
    ended = []
    try:
        ids = [e.experiment_id for e in store.search_experiments()]
        found = (
            store.search_runs(
                ids,
                f"attributes.status != 'FINISHED' and {tag_filter}",
                max_results=1000,
                order_by=["attributes.start_time DESC"],
            )
            if ids
            else []
        )
        for run in found:
            if run.info.status == "RUNNING":
                store.set_terminated(run.info.run_id, "KILLED")
            if run.info.status in ("RUNNING", "KILLED"):
                ended.append(run.info.run_id)
    except MlflowException:
        pass
    return ended


def _start_task(cwd: str, cores: float, tracking_uri: str, experiment: str) -> dict[str, str]:
    """A Ray worker process set up as a job of --jobs is; returns the tags naming its node."""
    import ray

    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths (data, .tlkit/cache, checkpoints) as on the driver
    runtime.quiet()
    runtime.tune_allocator()
    runtime.use_cpus(max(1, int(cores)))
    runtime.hide_progress_bars()
    tracking.configure(tracking_uri, experiment, reap_quietly=True)  # a lost attempt is its retry's to report
    return {
        "tlkit.node": ray.get_runtime_context().get_node_id()[:16],
        "tlkit.node_ip": ray.util.get_node_ip_address(),
        "tlkit.node_host": socket.gethostname(),
    }


def _run_point_task(point: Point, job: dict[str, Any], cores: float) -> list[SummaryRow]:
    """One point, in a Ray worker process: as a job of --jobs runs it, with the coordinator for locks and counts."""
    import ray

    tags = _start_task(job["cwd"], cores, job["tracking_uri"], job["experiment"])
    node = ray.get_runtime_context().get_node_id()
    token = point_token(job["parent_run_id"], point)
    coordinator = job["coordinator"]
    # an earlier attempt of this point, lost with its node
    lost = end_runs(job["tracking_uri"], f"tags.`tlkit.ray_point` = '{token}'")
    ray.get(coordinator.release_all.remote(token))
    tags.update({"tlkit.ray_point": token, "tlkit.ray_pipeline": job["parent_run_id"]})
    if lost:
        tags["tlkit.retry_of"] = ",".join(lost)

    @contextmanager
    def claim(key: str):
        while not ray.get(coordinator.acquire.remote(key, token, node)):
            time.sleep(0.5)
        try:
            yield
        finally:
            ray.get(coordinator.release.remote(key, token))

    count: Callable[[], int] = lambda: ray.get(coordinator.step.remote(token))  # noqa: E731
    progress = Progress(job["total"], start=job["start"], count=count)
    how = PointRun(
        plan=job["plan"],
        progress=progress,
        tracking_uri=job["tracking_uri"],
        reuse=job["reuse"],
        console=Console(markup=False, soft_wrap=True),
        claim=claim,
        parent_run_id=job["parent_run_id"],
        lines=True,
        resume_from=lost,
    )
    try:
        with tracking.tagging(tags):
            return run_point(point, how, {})
    except TlkitError as err:  # the points' lines interleave: say which point
        raise TlkitError(f"{point.label}: {err}") from None


def run_tune_workers(ray, workers: int, job: TuneJob, run: RunOptions, experiment: str, *, cores: float = 1) -> list:
    """`workers` tune workers on one study, as tasks on the connected cluster (the Optuna storage coordinates
    them, as it does workers started by hand); each worker's outcome, one of them the retrained best recipe.
    `run.tracking_uri` must be resolved: the workers record in the same store."""
    nodes = alive_nodes(ray)
    tracking_uri = str(run.tracking_uri)
    check_store(tracking_uri, len(nodes))
    from tlkit.pipelines.tune import default_storage

    storage = job.settings.storage or default_storage(tracking_uri)
    if storage.startswith("sqlite:") and len(nodes) > 1:
        raise TlkitError(
            f"the study's storage {storage} is a file on this machine, which the {len(nodes)} nodes of the Ray "
            "cluster cannot share; give --storage postgresql://USER:PASSWORD@HOST/DB (pip install 'tlkit[postgres]')"
        )
    paths = [
        os.getcwd(),
        *(str(Path(v).resolve()) for v in (job.data,) if isinstance(v, (str, Path)) and Path(v).exists()),
    ]
    check_paths(ray, nodes, paths)
    task = ray.remote(_tune_worker_task).options(num_cpus=cores, max_retries=0)
    job = replace(job, settings=job.settings.model_copy(update={"storage": storage}))
    run = replace(run, progress=False)
    refs = [task.remote(job, run, experiment=experiment, cwd=os.getcwd(), cores=cores, index=i) for i in range(workers)]
    try:
        return [_result(ray, ref, f"tune worker {index}", retries=0) for index, ref in enumerate(refs)]
    except BaseException:
        _cancel(ray, refs)
        raise


def _tune_worker_task(job: TuneJob, run: RunOptions, *, experiment: str, cwd: str, cores: float, index: int):
    from tlkit.pipelines.tune import run_tune

    tags = _start_task(cwd, cores, str(run.tracking_uri), experiment)
    console = Console(markup=False, soft_wrap=True)
    with tracking.tagging(tags):
        return run_tune(job, run=run, report=lambda t: console.print(f"worker {index}: {t.text()}", highlight=False))
