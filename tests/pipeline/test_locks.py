"""One run folder, one writer: a fit holds an exclusive lock on its output
folder from before its MLflow run exists until it ends; a second fit on that folder (`--out`
twice, `--resume` twice, `--resume <run id>` of the run using it) is refused with one line naming
the holder, and changes nothing. The kernel drops the lock when the holder dies, even by kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from convtrain.training.run_folder import LOCK_FILE, RunFolderLock
from tests.support.cli import error_line, invoke

TINY = ["--limit", "200", "--filters", "4", "--epochs", "1", "--quiet"]
ROOT = Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
from convtrain.training.run_folder import RunFolderLock
with RunFolderLock() as lock:
    lock.take(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def hold(in_tmp_cwd):
    """hold(folder): another process takes the folder's lock (as a running fit does); killed at the end."""
    holders = []

    def start(folder: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
        holders.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in holders:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_second_fit_on_a_held_out_folder_is_refused_before_its_run_exists(in_tmp_cwd, hold):
    holder = hold(in_tmp_cwd / "out")
    line = error_line(invoke("fit", *TINY, "--out", "out"))
    assert f"{in_tmp_cwd / 'out'} is in use by another fit" in line
    assert f"pid {holder.pid} on host {socket.gethostname()}" in line
    assert sorted(p.name for p in (in_tmp_cwd / "out").iterdir()) == [LOCK_FILE]  # nothing written
    assert not (in_tmp_cwd / "mlflow.db").exists()  # no run created


def test_resume_of_a_folder_in_use_changes_nothing_and_works_once_the_holder_is_killed(in_tmp_cwd, hold):
    import mlflow

    assert invoke("fit", *TINY, "--out", "out").exit_code == 0
    client = mlflow.MlflowClient(f"sqlite:///{in_tmp_cwd / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    out = in_tmp_cwd / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_FILE}

    holder = hold(out)
    for spec in ("out", run.info.run_id):  # the folder, and the run id naming the same folder
        line = error_line(invoke("fit", "--resume", spec, "--epochs", "2"))
        assert f"is in use by another fit (pid {holder.pid} on host" in line
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK_FILE}
    assert after == before
    assert client.get_run(run.info.run_id).info.status == "FINISHED"  # not reopened

    holder.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed holder
    holder.wait()
    assert invoke("fit", "--resume", "out", "--epochs", "2").exit_code == 0
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]


def test_the_lock_is_released_when_the_block_ends_and_a_refused_take_leaves_no_folder(tmp_path):
    folder = tmp_path / "new"
    with RunFolderLock() as lock:
        lock.take(folder)
        with pytest.raises(Exception, match="in use by another fit"):
            with RunFolderLock() as other:
                other.take(folder)
    with pytest.raises(RuntimeError):
        with RunFolderLock() as lock:
            lock.take(folder)
            raise RuntimeError("a fit refused after taking the lock")
    assert folder.is_dir()  # it existed before this take: kept
    with pytest.raises(RuntimeError):
        with RunFolderLock() as lock:
            lock.take(tmp_path / "fresh")
            raise RuntimeError("refused")
    assert not (tmp_path / "fresh").exists()  # created by the refused take: removed again
