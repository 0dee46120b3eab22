"""`tlkit run --ray` on a two-node Ray cluster against `--jobs 1` and `--jobs 2` on this machine: one pipeline,
from scratch each time, as a user runs it.

The pipeline: digits (3 classes, 60 images each, 32 px), timm's tiny test network, a source pretraining that
all points share and a fine-tune per point; 2 learning-rate ratios x `--seeds` seeds. The cluster is Ray's test
cluster on this machine (a head and a worker node, one CPU each, on loopback); a cluster needs a tracking server,
so `--jobs 2` also runs against the same kind of `mlflow server`, to tell Ray's cost from the server's.
Rounds alternate the order (this machine's speed drifts); medians.

    python bench/cluster.py                 # 6 points, 1 round
    python bench/cluster.py --seeds 4 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray keeps to 127.0.0.1 (as on macOS)


def pipeline(folder: Path, seeds: int) -> Path:
    config = {
        "name": "bench-cluster",
        "datasets": {
            "digits": {
                "path": str(folder / "digits"),
                "val": 0.2,
                "test": 0.3,
                "seed": 0,
                "digits": {"classes": "0-2", "per_class": 60, "size": 32, "seed": 0},
            }
        },
        "backbone": {"model": "test_resnet", "img_size": 32},
        "compute": {"num_workers": 0, "precision": "32-true"},
        "sweep": {"stages.tuned.train.lr_mult": [2, 4]},
        "seeds": list(range(seeds)),
        "stages": [
            {"id": "pre", "stage": "pretrain", "data": "digits", "train": {"epochs": 3, "seed": 0, "augment": "none"}},
            {
                "id": "tuned",
                "stage": "finetune",
                "data": "digits",
                "weights": "pre",
                "train": {"epochs": 30, "freeze_epochs": 1, "augment": "none", "batch_size": 16},
            },
        ],
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            (folder / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return server, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def timed(args: list[str], env: dict) -> float:
    with tempfile.TemporaryDirectory(prefix="tlkit-bench-cluster-") as tmp:
        path = pipeline(Path(tmp), SEEDS)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "tlkit", "run", str(path), *args], cwd=tmp, env=env, capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
        return seconds


SEEDS = 2


def main() -> None:
    global SEEDS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="points = 2 x seeds")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    SEEDS = args.seeds
    os.environ.update(LOOPBACK_ONLY)
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TLKIT_"))}, **LOOPBACK_ONLY}
    work = Path(tempfile.mkdtemp(prefix="tlkit-bench-server-"))
    server, url = mlflow_server(work)
    loopback = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "temp_dir": str(work / "ray")}
    cluster = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False})
    try:
        cluster.add_node(**loopback)
        cluster.wait_for_nodes()
        ways = {
            "--jobs 1 (sqlite)": ["--jobs", "1"],
            "--jobs 2 (sqlite)": ["--jobs", "2"],
            "--jobs 2 (mlflow server)": ["--jobs", "2", "--tracking-uri", url],
            "--ray, 2 nodes x 1 CPU (mlflow server)": ["--ray", cluster.address, "--tracking-uri", url],
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for round_ in range(args.rounds):
            order = list(ways) if round_ % 2 == 0 else list(ways)[::-1]
            for name in order:
                times[name].append(timed(ways[name], env))
                print(f"round {round_ + 1}, {name}: {times[name][-1]:.1f} s", flush=True)
    finally:
        cluster.shutdown()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    points = 2 * args.seeds
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["--jobs 1 (sqlite)"]
    print(f"\n{points} points, medians of {args.rounds} round(s):")
    for name, median in medians.items():
        print(f"  {name:42s} {median:6.1f} s   {base / median:4.2f}x of --jobs 1")
    extra = medians["--ray, 2 nodes x 1 CPU (mlflow server)"] - medians["--jobs 2 (mlflow server)"]
    print(
        f"Ray's cost over --jobs 2 on the same server: {extra:+.1f} s in all, {extra / points * 2:+.1f} s per point "
        "(two run at once: each slot ran points/2 of them)"
    )


if __name__ == "__main__":
    main()
