"""Sweep overhead: a 12-trial digits sweep (experiments/sweep-digits-filters.toml's grid) by
`convtrain sweep`, each trial's time beyond its training, and the trials per minute beside the
same grid as an Optuna + PyTorch script (sweep_torch.py).

The convtrain sweep runs in a new temporary folder (its own mlflow.db and optuna.db), one worker,
as a fresh process. A trial's overhead is its seconds (trials.csv) minus the sum of its run's
epoch_seconds in MLflow (the updates and the per-epoch validation scoring): the fit's start,
the store, the final evaluation, plots, model logging and the trial's bookkeeping.

    python benchmarks/bench_sweep.py --epochs 10 --threads 2
    python benchmarks/bench_sweep.py --epochs 2 --trials 3    # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spread import spread  # benchmarks/, beside this script

HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE.parent / "experiments"


def sweep_spec(folder: Path, epochs: int) -> Path:
    base = (EXPERIMENTS / "fit-digits.toml").resolve()
    text = (EXPERIMENTS / "sweep-digits-filters.toml").read_text()
    text = text.replace('base = "fit-digits.toml"', f'base = "{base}"').replace("epochs = 10", f"epochs = {epochs}")
    path = folder / "sweep.toml"
    path.write_text(text)
    return path


def convtrain_sweep(folder: Path, epochs: int, trials: int, env: dict) -> dict:
    spec = sweep_spec(folder, epochs)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convtrain", "sweep", str(spec), "--workers", "1", "--n-trials",
                    str(trials), "--quiet"], cwd=folder, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    [table] = folder.glob("runs/*/trials.csv")
    rows = list(csv.DictReader(table.open()))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    overheads, seconds = [], []
    for row in rows:
        training = sum(m.value for m in client.get_metric_history(row["mlflow_run_id"], "epoch_seconds"))
        seconds.append(float(row["seconds"]))
        overheads.append(float(row["seconds"]) - training)
    return {"wall": wall, "trials": len(rows), "seconds": seconds, "overheads": overheads}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    work = Path(tempfile.mkdtemp(prefix="bench_sweep."))
    try:
        ours = convtrain_sweep(work, args.epochs, args.trials, env)
        started = time.perf_counter()
        torch_run = subprocess.run([sys.executable, str(HERE / "sweep_torch.py"), "--epochs", str(args.epochs),
                                    "--trials", str(args.trials), "--threads", threads],
                                   env=env, check=True, capture_output=True, text=True)
        torch_wall = time.perf_counter() - started
        theirs = json.loads(torch_run.stdout.strip().splitlines()[-1])
        print(f"{args.trials} digits trials, {args.epochs} epochs each, {args.threads} threads; load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print("| | process wall s | trials per minute | trial s, median (min-max) | overhead beyond training s, "
              "median (min-max) |\n|---|---|---|---|---|")
        print(f"| convtrain sweep | {ours['wall']:.1f} | {60 * ours['trials'] / ours['wall']:.1f} | "
              f"{spread(ours['seconds'])} | {spread(ours['overheads'])} |")
        print(f"| Optuna + PyTorch | {torch_wall:.1f} | {60 * theirs['trials'] / torch_wall:.1f} | "
              f"{theirs['seconds'] / theirs['trials']:.2f} (mean) | |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
