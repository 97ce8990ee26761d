"""Everything that can be checked is checked before the MLflow run, the folder or any file exists:
a resume that cannot work changes nothing, a tampered checkpoint is
one line, and an interrupt during set-up says that nothing was written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convtrain.nn.npz_files import json_entry, read_npz, write_npz_atomic
from tests.support.cli import error_line, invoke

TINY = ["--limit", "200", "--filters", "4", "--quiet"]
ROOT = Path(__file__).resolve().parents[2]


def nothing_written(folder: Path) -> bool:
    return sorted(p.name for p in folder.iterdir()) == []


# ---- refused before a run or a file exists ---------------------------------------------------------

def test_a_run_name_longer_than_mlflow_takes_is_refused_before_a_run_exists(in_tmp_cwd):
    line = error_line(invoke("fit", *TINY, "--epochs", "1", "--run-name", "r" * 300))
    assert "run_name: got 300 characters, expected at most 250" in line
    assert nothing_written(in_tmp_cwd)


def test_early_stopping_without_a_validation_split_is_refused_before_a_run_exists(in_tmp_cwd):
    line = error_line(invoke("fit", *TINY, "--epochs", "1", "--val-fraction", "0", "--patience", "1"))
    assert "needs a validation split" in line
    assert nothing_written(in_tmp_cwd)


def test_an_out_folder_through_a_symlink_loop_is_one_line(in_tmp_cwd):
    (in_tmp_cwd / "a").symlink_to("b")
    (in_tmp_cwd / "b").symlink_to("a")
    line = error_line(invoke("fit", *TINY, "--epochs", "1", "--out", "a/run"))
    assert "out: a/run goes through a symbolic link loop" in line
    assert sorted(p.name for p in in_tmp_cwd.iterdir()) == ["a", "b"]


# ---- a tampered checkpoint ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_fit(tmp_path_factory):
    """One tracked 1-epoch fit (its folder and store), copied by each test that tampers with it."""
    folder = tmp_path_factory.mktemp("finished")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "convtrain.cli", "fit", *TINY, "--epochs", "1", "--out", "out"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return folder


def tamper(checkpoint: Path, key: str, value) -> None:
    arrays = dict(read_npz(checkpoint, "checkpoint"))
    if "/" in key:  # callbacks/<name>: one callback's state
        states = json.loads(str(arrays["callbacks"][()]))
        states[key.split("/", 1)[1]] = value
        key, value = "callbacks", states
    arrays[key] = json_entry(value)
    write_npz_atomic(checkpoint, arrays)


@pytest.mark.parametrize("key, value, expected", [
    ("trainer", {}, "trainer 'epoch' is None"),
    ("trainer", [1, 2], "entry 'trainer' is a list"),
    ("trainer", {"epoch": "1", "step": 1, "batch_size": 64, "mid_epoch": False, "stop_training": False,
                 "batches_done": 0}, "trainer 'epoch' is '1'"),
    ("history", "x", "entry 'history' is a string"),
    ("history", {"epochs": [5]}, "history epoch 1 is a number"),
    ("callbacks", [], "entry 'callbacks' is a list"),
    ("callbacks/mlflow", 5, "callback state 'mlflow' is a number"),
    ("callbacks/batch_losses", {"points": "x"}, "'batch_losses' has points that are not [step, loss] pairs"),
])
def test_a_tampered_checkpoint_is_one_line_and_the_resume_changes_nothing(finished_fit, tmp_path, monkeypatch,
                                                                         key, value, expected):
    import mlflow

    shutil.copytree(finished_fit, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    checkpoint = tmp_path / "out" / "checkpoint.npz"
    tamper(checkpoint, key, value)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    before.pop(".convtrain.lock", None)

    line = error_line(invoke("fit", "--resume", "out", "--epochs", "2"))
    assert "out/checkpoint.npz" in line and expected in line
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if not k.startswith(".")} == before  # config.toml not rewritten
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    assert run.info.status == "FINISHED"  # not reopened, not marked FAILED


# ---- interrupted during set-up ------------------------------------------------------------------------

INTERRUPT_WHILE_LOADING = """
import os, signal, sys, time
import convtrain.data

SIGNAL = getattr(signal, sys.argv[1])

def load_dataset(*args, **kwargs):
    os.kill(os.getpid(), SIGNAL)
    time.sleep(30)  # the signal interrupts this
    raise AssertionError("the signal did not interrupt the fit")

convtrain.data.load_dataset = load_dataset
from convtrain.cli import main
sys.argv = ["convtrain", "fit", "--quiet"]
main()
"""


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_while_the_data_loads_says_nothing_was_written(tmp_path, signal_name):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", INTERRUPT_WHILE_LOADING, signal_name], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "interrupted: stopped by an interrupt while setting up the fit, before anything was written" in lines[0]
    assert nothing_written(tmp_path)
