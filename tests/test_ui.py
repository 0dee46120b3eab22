"""The MLflow side, for real: `tlkit ui` in a headless browser, and a pipeline logging to `mlflow server`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from tlkit.config import BackboneConfig, BaselineConfig, ComputeConfig
from tlkit.core import tracking
from tlkit.runs.stages import run_baseline

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = Path(os.environ.get("TLKIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


@contextmanager
def serving(command: list[str], port: int, cwd: Path | None = None, ping: str = "/health"):
    """Start a server process, wait for its health URL, yield its base URL, stop it with its children."""
    server = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                get(f"{base}{ping}")
                break
            except OSError:
                assert server.poll() is None, f"{command[2:4]} exited"
                assert time.monotonic() < deadline, "the server did not come up in 90 s"
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_ui_serves_runs_and_artifacts(tracked, digits_source):
    result = run_baseline(
        digits_source,
        BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32),
        BaselineConfig(),
        compute=ComputeConfig(num_workers=0),
    )
    port = free_port()
    with serving([sys.executable, "-m", "tlkit", "ui", "--port", str(port)], port) as base:
        experiments = json.loads(get(f"{base}/api/2.0/mlflow/experiments/search?max_results=50"))["experiments"]
        assert "tests" in {e["name"] for e in experiments}
        run = json.loads(get(f"{base}/api/2.0/mlflow/runs/get?run_id={result.run_id}"))["run"]
        assert any(m["key"] == "heldout_accuracy" for m in run["data"]["metrics"])
        png = get(f"{base}/get-artifact?path=plots/confusion_matrix.png&run_uuid={result.run_id}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    # Headless, and no background traffic: this machine's closed network refuses it, many times a second.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait_for(driver, texts: list[str], timeout: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in d.page_source for t in texts))


@pytest.mark.slow  # a minute of processes, servers or browsers: with the slow tests
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)
def test_sweep_runs_line_up_in_the_ui_in_a_real_browser(tracked, tmp_path, digits_target):
    pytest.importorskip("selenium")
    from test_pipeline import sweep_pipeline

    from tlkit.pipelines.pipeline import run_pipeline

    summary = run_pipeline(
        sweep_pipeline(tmp_path, digits_target),
        experiment="ui-sweep",
        overrides=[
            "stages=[{id: svm, stage: baseline, data: digits, baseline: {classifier: pixels}}]",
            "sweep={stages.svm.baseline.pixel_size: [8, 16]}",
        ],
    )
    experiment = tracked.get_experiment_by_name("ui-sweep").experiment_id
    points = [r for r in tracked.search_runs([experiment]) if r.data.tags.get("mlflow.parentRunId") == summary.run_id]
    names = sorted(r.info.run_name for r in points)
    assert names == ["pixel_size=16 seed=0", "pixel_size=16 seed=1", "pixel_size=8 seed=0", "pixel_size=8 seed=1"]
    port = free_port()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with serving([sys.executable, "-m", "tlkit", "ui", "--port", str(port)], port) as base:
        driver = _browser()
        try:
            driver.get(f"{base}/#/experiments/{experiment}/runs")
            _wait_for(driver, ["Training runs", "sweep-test"])  # the experiment opens as model training
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-runs.png"))
            ids = urllib.parse.quote(json.dumps([r.info.run_id for r in points]))
            driver.get(f"{base}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([experiment]))}")
            # runs side by side, with metric and setting rows
            _wait_for(driver, [*names, "svm.heldout_accuracy", "sweep.pixel_size"])
            time.sleep(3)  # let the parallel-coordinates plot draw before the picture
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-compare.png"))
        finally:
            driver.quit()
    assert (SCREENSHOTS / "mlflow-compare.png").stat().st_size > 10_000


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)
def test_tlkit_ui_points_at_the_runs_with_their_held_out_accuracy(tracked, digits_source, tmp_path):
    """What a newcomer sees at the page `tlkit ui` prints: the runs table (not GenAI traces), best first, with accuracy
    and data."""
    pytest.importorskip("selenium")
    from tlkit.config import SplitConfig
    from tlkit.runs.stages import run_ingest

    # a run with no held-out score: not in the ranking
    run_ingest(digits_source, SplitConfig(), out=tmp_path / "m.json")
    for classifier in ("pixels", "svm"):
        run_baseline(
            digits_source,
            BackboneConfig(model=TINY_MODEL, pretrained=False, img_size=32),
            BaselineConfig(classifier=classifier),
            compute=ComputeConfig(num_workers=0),
        )
    port = free_port()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tlkit", "ui", "--port", str(port), "--experiment", "tests"]
    with serving(command, port) as base:
        url = tracking.ui_url(base, "tests")  # what the command printed (it stores the same view)
        assert url.startswith(f"{base}/#/experiments/")
        assert "workflowType=machine_learning" in url
        driver = _browser()
        try:
            driver.get(url)
            _wait_for(driver, ["pixels + svm", f"{TINY_MODEL} + svm", "heldout_accuracy", "Dataset", "source ("])
            time.sleep(2)
            driver.save_screenshot(str(SCREENSHOTS / "tlkit-ui.png"))
            assert "Token Usage" not in driver.page_source  # not the GenAI overview
            from selenium.webdriver.common.by import By

            shown = driver.find_element(By.TAG_NAME, "body").text  # what is on the screen
            assert "ingest source" not in shown, shown
            assert "2 matching runs" in shown, shown  # the two baselines, not the ingest run
        finally:
            driver.quit()
    assert (SCREENSHOTS / "tlkit-ui.png").stat().st_size > 10_000


@pytest.mark.slow  # a minute of processes, servers or browsers: with the slow tests
def test_pipeline_logs_to_a_tracking_server(workdir, tmp_path, digits_target):
    from mlflow import MlflowClient
    from test_pipeline import sweep_pipeline

    from tlkit.pipelines.pipeline import run_pipeline

    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{store / 'server.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with serving(command, port, cwd=store) as base:
        summary = run_pipeline(
            sweep_pipeline(tmp_path, digits_target),
            tracking_uri=base,
            experiment="on-server",
            overrides=["sweep={}", "seeds=[0]"],
        )
        client = MlflowClient(base)
        experiment = client.get_experiment_by_name("on-server")
        runs = client.search_runs([experiment.experiment_id])
        assert {r.info.run_name for r in runs} >= {"sweep-test", "pre", "features", "svm", "tuned", "check", "label"}
        tuned = next(r for r in runs if r.info.run_name == "tuned")
        assert "heldout_accuracy" in tuned.data.metrics
        assert tuned.info.artifact_uri.startswith("mlflow-artifacts:")
        bundle = "model/artifacts/bundle"
        assert {a.path for a in client.list_artifacts(tuned.info.run_id, bundle)} >= {
            f"{bundle}/tlkit-model.json",
            f"{bundle}/backbone.safetensors",
        }
        # a pyfunc model too
        assert "model/MLmodel" in {a.path for a in client.list_artifacts(tuned.info.run_id, "model")}
        # the fine-tune loaded its backbone from the pretrain run's artifacts, through the server
        assert tuned.data.params["weights"] == f"runs:/{next(r.info.run_id for r in runs if r.info.run_name == 'pre')}"
        assert summary.tracking_uri == base
    assert not (workdir / "mlflow.db").exists()  # nothing went to the local default store
