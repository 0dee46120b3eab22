"""`tlkit run --jobs N` against one point at a time: the whole pipeline, from scratch, as a user runs it.

Each run starts in a new folder (data written, features extracted, nothing reused), alternating the
job counts round by round (this machine's speed drifts between runs). The upper bound is N times
faster; on a CPU the jobs share its cores, so the gain is what a small model leaves unused on many
threads.

    python bench/jobs.py                                  # pipelines/photos.yaml, --jobs 1 vs 2, 1 round
    python bench/jobs.py --jobs 1 2 4 --rounds 3 --set "seeds=[0]"
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


def timed_run(pipeline: Path, jobs: int, overrides: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TLKIT_"))}
    with tempfile.TemporaryDirectory(prefix="tlkit-bench-jobs-") as tmp:
        args = [sys.executable, "-m", "tlkit", "run", str(pipeline), "--jobs", str(jobs)] + [
            a for o in overrides for a in ("--set", o)
        ]
        start = time.perf_counter()
        subprocess.run(args, cwd=tmp, env=env, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "photos.yaml")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="pipeline override, as tlkit run --set"
    )
    args = parser.parse_args()
    times: dict[int, list[float]] = {n: [] for n in args.jobs}
    for round_ in range(args.rounds):
        order = args.jobs if round_ % 2 == 0 else args.jobs[::-1]
        for n in order:
            times[n].append(timed_run(args.pipeline.resolve(), n, args.overrides))
            print(f"round {round_ + 1}, --jobs {n}: {times[n][-1] / 60:.2f} min", flush=True)
    base = statistics.median(times[args.jobs[0]])
    for n, values in times.items():
        median = statistics.median(values)
        bound = f"   (upper bound {n / args.jobs[0]:.0f}x)" if n != args.jobs[0] else ""
        print(f"--jobs {n}: median {median / 60:5.2f} min   {base / median:4.2f}x of --jobs {args.jobs[0]}{bound}")


if __name__ == "__main__":
    main()
