"""`tlkit ui` serves the project's store: started for real on a free loopback port."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import TINY_MODEL
from tlkit.config import BackboneConfig, BaselineConfig, ComputeConfig
from tlkit.stages import run_baseline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def test_ui_serves_runs_and_artifacts(tracked, digits_source):
    result = run_baseline(digits_source, BackboneConfig(model=TINY_MODEL, img_size=32), BaselineConfig(), compute=ComputeConfig(num_workers=0))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tlkit", "ui", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                get(f"{base}/health")
                break
            except OSError:
                assert server.poll() is None, "the UI server exited"
                assert time.monotonic() < deadline, "the UI did not come up in 90 s"
                time.sleep(0.5)
        experiments = json.loads(get(f"{base}/api/2.0/mlflow/experiments/search?max_results=50"))["experiments"]
        assert "tests" in {e["name"] for e in experiments}
        run = json.loads(get(f"{base}/api/2.0/mlflow/runs/get?run_id={result.run_id}"))["run"]
        assert any(m["key"] == "test_accuracy" for m in run["data"]["metrics"])
        png = get(f"{base}/get-artifact?path=plots/confusion_matrix.png&run_uuid={result.run_id}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
