"""`convtrain sweep ... | head -2`: the reader goes away after two lines and the sweep still
runs every trial, exits 0 and finishes its parent run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[2]
SWEEP = """
[fit]
data = "digits"
limit = 300
epochs = 2
hidden = []
batch_size = 32
experiment = "sweeps"
[sweep]
name = "piped"
method = "grid"
[space]
filters = [[4], [8]]
"""


def test_a_sweep_whose_stdout_closes_early_runs_to_the_end(tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sweep = subprocess.Popen([sys.executable, "-m", "convtrain.cli", "sweep", "sweep.toml"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        first = [sweep.stdout.readline() for _ in range(2)]  # what `head -2` reads
        sweep.stdout.close()  # ... before it exits: every later write meets a closed pipe
        _, stderr = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert first[0].startswith(b"sweep piped (created)"), first
    assert sweep.returncode == 0, stderr.decode()
    assert stderr.decode().strip() == ""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("piped", "FINISHED"), ("piped-trial-000", "FINISHED"), ("piped-trial-001", "FINISHED")]
