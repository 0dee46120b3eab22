"""Whole-process wall-clock time of short commands, as a user starts them (fresh Python each time).

Against the floor of what they must import: `python -c "import torch, timm, mlflow"` for predict
(a model must run and the run is tracked), `import mlflow` for a cached extract (the run is tracked).

    python bench/startup.py            # 5 interleaved rounds, medians
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TLKIT = [sys.executable, "-m", "tlkit"]


def timed(args: list[str], cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlkit-bench-startup-") as tmp:
        cwd = Path(tmp)
        subprocess.run(
            [*TLKIT, "data", "digits", "digits", "--classes", "0-4", "--per-class", "40"],
            cwd=cwd,
            check=True,
            capture_output=True,
        )
        backbone = ["--model", "resnet18", "--no-pretrained", "--img-size", "64"]
        # fills the cache
        subprocess.run([*TLKIT, "extract", "digits", *backbone], cwd=cwd, check=True, capture_output=True)
        out = subprocess.run(
            [*TLKIT, "baseline", "digits", *backbone], cwd=cwd, check=True, capture_output=True, text=True
        ).stdout
        run_id = re.search(r"MLflow run (\w+)", out).group(1)
        image = str(next((cwd / "digits").rglob("*.png")))
        commands = {
            "tlkit --help": [*TLKIT, "--help"],
            "tlkit extract (cached)": [*TLKIT, "extract", "digits", *backbone],
            "tlkit predict (1 image)": [*TLKIT, "predict", f"runs:/{run_id}", image],
            "floor: import mlflow": [sys.executable, "-c", "import mlflow"],
            "floor: import torch, timm, mlflow": [sys.executable, "-c", "import torch, timm, mlflow"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):  # interleaved: this machine's speed drifts between runs
            for name, command in commands.items():
                times[name].append(timed(command, cwd))
    for name, values in times.items():
        print(
            f"{name:36s} median {statistics.median(values):5.2f} s   min {min(values):5.2f} s   "
            f"({' '.join(f'{v:.2f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
