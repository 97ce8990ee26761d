"""The tracked fit's split: `convtrain fit --timings` on the built-in digits, tracked to the
default SQLite store, as a first fit in a new folder (the store is created) and then as fits
in that folder (the store exists), each a fresh process. Prints each phase's median seconds
and the process's wall time (launch to exit) beyond the training loop (training and per-epoch
evaluation).

    python benchmarks/bench_tracked_fit.py --rounds 5
    python benchmarks/bench_tracked_fit.py --rounds 1 --epochs 2    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spread import spread  # benchmarks/, beside this script

PHASES = ("start-up", "data", "store", "training", "evaluation", "plots", "model logging", "other", "total")


def timed_fit(folder: Path, epochs: int, env: dict) -> dict[str, float]:
    """One fit's --timings split, and "process": its wall time from launch to exit, which holds
    the interpreter's start and teardown beside the phases."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "convtrain", "fit", "--timings", "--quiet", "--epochs", str(epochs)],
                          cwd=folder, env=env, check=True, capture_output=True, text=True)
    split = {"process": time.perf_counter() - started}
    for phase in PHASES:
        found = re.search(rf"^{re.escape(phase)}\s+([\d.]+) s", done.stdout, re.M)
        split[phase] = float(found.group(1)) if found else float("nan")
    return split


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="default: fit's own default length on digits")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    work = Path(tempfile.mkdtemp(prefix="bench_tracked_fit."))
    try:
        first, again = [], []
        for round_ in range(args.rounds):
            folder = work / f"new-{round_}"
            folder.mkdir()
            first.append(timed_fit(folder, args.epochs, env))   # creates mlflow.db
            again.append(timed_fit(folder, args.epochs, env))   # reuses it
        print(f"digits, {args.epochs} epochs, {args.rounds} rounds; load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print("| phase | first fit, new store s | fit with an existing store s |\n|---|---|---|")
        for phase in (*PHASES, "process"):
            print(f"| {phase} | {statistics.median(r[phase] for r in first):.2f} | "
                  f"{statistics.median(r[phase] for r in again):.2f} |")
        for name, runs in (("first fit", first), ("existing store", again)):
            beyond = [r["process"] - r["training"] - r["evaluation"] for r in runs]
            print(f"{name}: process wall beyond the training loop {spread(beyond, ' s')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
