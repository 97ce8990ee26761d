"""A new SQLite tracking store is created whole or not at all.

MLflow creates a store in dozens of separately committed migrations: processes creating it at
once, or a kill during creation, used to leave `_alembic_tmp_*` tables that broke every later
fit in that folder. Here creators are forked from this process (mlflow already imported, so a
creator starts in milliseconds and the kills land inside the creation, not the import), released
together or killed at increasing moments, and every later opening and a real `convtrain fit` must
work.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def open_store(uri: str) -> None:
    """What every fit does first with its store: open it and list the experiments."""
    from convtrain.tracking.store import client_for

    client_for(uri).search_experiments(max_results=1)


def _open_when_released(uri: str, released) -> None:
    released.wait()
    open_store(uri)


def _fork_context():
    import mlflow  # noqa: F401  imported before forking, so the creators start at once

    return multiprocessing.get_context("fork")


def tables(store: Path) -> set[str]:
    with sqlite3.connect(store) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def fit_in(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "convtrain.cli", "fit", "--epochs", "1", "--limit", "200",
                           "--filters", "4", "--quiet"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    context = _fork_context()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    released = context.Event()
    creators = [context.Process(target=_open_when_released, args=(uri, released)) for _ in range(6)]
    for creator in creators:
        creator.start()
    released.set()
    for creator in creators:
        creator.join(timeout=120)
    assert [c.exitcode for c in creators] == [0] * len(creators)
    assert not {t for t in tables(tmp_path / "mlflow.db") if t.startswith("_alembic_tmp_")}
    assert not list(tmp_path.glob("mlflow.db.*.building*"))  # no half-built copies left behind


def test_fits_started_at_once_in_a_new_folder_all_finish_in_one_store(tmp_path):
    """The README's first command, three times at once in a fresh folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "convtrain.cli", "fit", "--epochs", "1", "--limit", "200", "--filters", "4",
               "--quiet"]
    fits = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(3)]
    outputs = [fit.communicate(timeout=300) for fit in fits]
    assert [fit.returncode for fit in fits] == [0, 0, 0], [err for _, err in outputs]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert len({r.info.run_name for r in runs}) == 3 and len(list((tmp_path / "runs").iterdir())) == 3


def schema(store: Path) -> tuple:
    """The tables and the migration a store is at: equal for every whole store of one MLflow."""
    with sqlite3.connect(store) as db:
        return tables(store), db.execute("SELECT version_num FROM alembic_version").fetchall()


def test_a_creator_killed_at_any_moment_leaves_no_store_or_a_whole_one(tmp_path):
    context = _fork_context()
    store = tmp_path / "mlflow.db"
    uri = f"sqlite:///{store}"
    started = time.monotonic()  # how long one creation takes here: the kills are spread over it
    creator = context.Process(target=open_store, args=(uri,))
    creator.start()
    creator.join(timeout=120)
    assert creator.exitcode == 0
    creation = time.monotonic() - started
    whole = schema(store)
    outcomes = []
    for step in range(8):
        store.unlink()
        creator = context.Process(target=open_store, args=(uri,))
        creator.start()
        time.sleep(creation * step / 8)  # the moment of the kill, not a check: every moment must be safe
        os.kill(creator.pid, signal.SIGKILL)
        creator.join()
        if store.exists():
            assert schema(store) == whole, f"a kill {step / 8:.0%} into the creation left a half-made store"
            outcomes.append("whole")
        else:
            outcomes.append("absent")
            store.touch()  # unlinked by the next step; the last one leaves an empty file to build on
    assert "absent" in outcomes  # some kills did land during creation
    result = fit_in(tmp_path)  # builds the store again where the last kill left none
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("mlflow.db.*.building*"))  # what the killed builders left is gone
