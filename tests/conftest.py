"""Shared fixtures: small real datasets (scikit-learn digits), awkward image files, an isolated MLflow store."""

from __future__ import annotations

import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tlkit.core import runtime
from tlkit.data.samples import write_digits

runtime.quiet()

TINY_MODEL = "test_resnet"  # timm's 0.4 M-parameter test network; pretrained=False everywhere


@pytest.fixture(autouse=True, scope="session")
def _cache_outside_the_checkout(tmp_path_factory):
    """Tests that do not run in `workdir` keep tlkit's cache (ingest answers, features) in a temporary folder."""
    os.environ["TLKIT_CACHE"] = str(tmp_path_factory.mktemp("tlkit-cache"))


@pytest.fixture(scope="session")
def digits_source(tmp_path_factory) -> Path:
    """Digits 0-2, 30 images per class, 32 px: a three-class source task."""
    out = tmp_path_factory.mktemp("digits") / "source"
    write_digits(out, classes="0-2", per_class=30, size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def digits_target(tmp_path_factory) -> Path:
    """Digits 5-7, 30 images per class: a different task on the same kind of images."""
    out = tmp_path_factory.mktemp("digits") / "target"
    write_digits(out, classes="5-7", per_class=30, size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def digits_pair(tmp_path_factory) -> Path:
    """Digits 3 and 8, 30 images per class: the two-class case every model must handle as well as many."""
    out = tmp_path_factory.mktemp("digits") / "pair"
    write_digits(out, classes=[3, 8], per_class=30, size=32, seed=0)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder: mlflow.db, mlruns/ and the feature cache land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("TLKIT_CACHE", raising=False)
    return tmp_path


@pytest.fixture
def tracked(workdir):
    """An MLflow store in tmp_path, configured; yields an MlflowClient on it."""
    from mlflow import MlflowClient

    from tlkit.core import tracking

    tracking.configure(None, "tests")
    yield MlflowClient(tracking.resolve_tracking_uri())


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def awkward_images(tmp_path) -> Path:
    """A class-folder tree with every mode ingest must convert, and files it must skip."""
    root = tmp_path / "awkward"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), "RGB")
    save(rgb, root / "a" / "rgb.png")
    save(rgb.convert("L"), root / "a" / "grey.png")
    save(rgb.convert("P"), root / "a" / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    save(rgba, root / "a" / "rgba.png")
    save(rgb.convert("CMYK"), root / "b" / "cmyk.jpg")
    sixteen = Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16))
    save(sixteen, root / "b" / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    save(rgb, root / "b" / "rotated.jpg", exif=exif.tobytes())
    save(rgb, root / "b" / "duplicate_of_rgb.png")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "notes.txt").write_text("not an image")
    buffer = io.BytesIO()
    rgb.resize((200, 200)).save(buffer, format="JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "stray.png").write_bytes((root / "a" / "rgb.png").read_bytes())
    return root


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server_on(backend: str, folder: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port with its runs in `backend`, artifacts under `folder`; yields its URL and
    stops it (by its process group) on the way out."""
    port = free_port()
    log_path = folder / "mlflow-server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                (folder / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log_path.read_text()[-2000:]}")
                time.sleep(1)
            yield url
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)


# A PostgreSQL server for the shared-study tests (test_tune_postgres, test_cluster)


def _pg(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 with databases `optuna` and `mlflow`; yields its base URL."""
    import psycopg

    initdb, pg_ctl = _pg("initdb"), _pg("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="tlkit-pg-", dir="/tmp"))
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "tlkit", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user="tlkit", dbname="postgres", autocommit=True
        ) as connection:
            connection.execute("CREATE DATABASE optuna")
            connection.execute("CREATE DATABASE mlflow")
        yield f"postgresql://tlkit@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
