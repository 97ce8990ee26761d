"""When a fit goes wrong after it has started: a full disk, a diverging loss, float32 overflow.

Each ends with one line on stderr (no traceback, no numpy warnings), a non-zero exit, the last
good checkpoint intact and named, and the MLflow run marked FAILED. See test_hostile_input.py
for bad input refused before anything is written, and test_kill_resume.py for kills.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from convtrain.cli import app
from convtrain.nn.losses import cross_entropy_sum, softmax, softmax_cross_entropy
from convtrain.nn.network import Network
from convtrain.nn.npz_files import read_json, read_npz
from tests.support.cli import error_line

ENV = {"COLUMNS": "120", "MLFLOW_TRACKING_URI": None, "CONVTRAIN_DEBUG": None}
TINY = ["--limit", "300", "--filters", "4", "--batch-size", "32", "--quiet"]


def invoke(*args):
    """Run the command; numpy's RuntimeWarnings count as output (a real process prints them
    to stderr, where only the one error line belongs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [str(a) for a in args], env=ENV)
    numeric = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not numeric, f"numpy warnings on stderr: {numeric}"
    return result


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The CLI keeps MLflow's INFO lines off stderr by setting MLFLOW_LOGGING_LEVEL before MLflow is
    # imported; in this test process another test may have imported it first.
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def trainer_state(path: Path) -> dict:
    Network.load(path)
    return read_json(read_npz(path, "checkpoint"), "trainer", path, "checkpoint")


def only_run(tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    return run


# ---- a full disk -------------------------------------------------------------------------------------

def test_a_full_disk_while_writing_a_checkpoint_stops_with_one_line_and_keeps_the_last_one(tmp_path, monkeypatch):
    """The epoch-2 checkpoint write runs out of space half-way (simulated by the write raising ENOSPC);
    the writes before it are the epoch-0 and epoch-1 checkpoints."""
    real_savez = np.savez
    writes = []
    kept = {}

    def savez(file, *args, **kwargs):
        writes.append(file)
        if len(writes) == 3:
            kept["bytes"] = (tmp_path / "out" / "checkpoint.npz").read_bytes()
            file.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_savez(file, *args, **kwargs)

    monkeypatch.setattr(np, "savez", savez)
    result = invoke("fit", *TINY, "--epochs", 3, "--out", "out")

    line = error_line(result)
    assert "No space left on device" in line and str(tmp_path / "out" / "checkpoint.npz") in line
    checkpoint = tmp_path / "out" / "checkpoint.npz"
    assert checkpoint.read_bytes() == kept["bytes"]  # the previous checkpoint, untouched
    assert trainer_state(checkpoint)["epoch"] == 1
    assert not list((tmp_path / "out").glob(".*.tmp")) and not (tmp_path / "out" / "model.npz").exists()
    run = only_run(tmp_path)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["convtrain.error"]


DISK_FULL_AFTER_EPOCH_1 = """
import sqlite3, sys
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

from convtrain.tracking.callback import MLflowCallback

full = []
real_execute, real_epoch_end = SQLiteDialect_pysqlite.do_execute, MLflowCallback.on_epoch_end

def do_execute(self, cursor, statement, parameters, context=None):
    # what SQLite answers when the disk under the store has no room left for a page
    if full and statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
        raise sqlite3.OperationalError("database or disk is full")
    return real_execute(self, cursor, statement, parameters, context)

def on_epoch_end(self, trainer, epoch, logs):
    real_epoch_end(self, trainer, epoch, logs)
    if epoch == 1:
        full.append(True)

SQLiteDialect_pysqlite.do_execute = do_execute
MLflowCallback.on_epoch_end = on_epoch_end
from convtrain.cli import main
sys.argv = ["convtrain", *sys.argv[1:]]
main()
"""


def test_a_full_disk_under_the_tracking_store_is_one_line_and_resume_sends_what_was_kept(tmp_path):
    """The store's disk fills up after epoch 1 (SQLite's own error, through SQLAlchemy and MLflow
    as it really arrives): one line saying so, the metrics kept, the run left open; once there is
    room, `--resume` sends the kept metrics and the model, then marks the run FINISHED."""
    import subprocess
    import sys

    from convtrain.training.run_folder import UNLOGGED_FILE

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "COLUMNS": "120"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", DISK_FULL_AFTER_EPOCH_1, "fit", *TINY, "--epochs", "3",
                           "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "stopped answering (the disk is full)" in lines[0] and "metrics are kept" in lines[0]
    unlogged = json.loads((tmp_path / "out" / UNLOGGED_FILE).read_text())
    assert {m["step"] for m in unlogged["metrics"] if m["key"] == "train_loss"} == {2, 3}
    run = only_run(tmp_path)
    assert run.info.status == "RUNNING"  # not FINISHED while metrics and the model are missing
    assert f"stays open until the rest is sent: convtrain fit --resume {tmp_path / 'out'}" in " ".join(done.stdout.split())

    result = invoke("fit", "--resume", "out")
    assert result.exit_code == 0, result.output
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "learning_rate"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3], key
    batches = [m.step for m in client.get_metric_history(run.info.run_id, "batch_loss")]
    assert len(batches) == len(set(batches)) and max(batches) > 20
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]
    assert not (tmp_path / "out" / UNLOGGED_FILE).exists()


# ---- Ctrl-C after the training loop --------------------------------------------------------------------

@pytest.mark.parametrize("where", ["plots", "test evaluation", "model logging"])
def test_ctrl_c_after_training_says_what_was_saved_and_resume_finishes_the_run(tmp_path, monkeypatch, where):
    """Ctrl-C outside the training loop (the default SIGINT handler raises KeyboardInterrupt
    there): one line naming the model and checkpoint and the resume command, run KILLED."""
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")  # as the CLI does, for the import below
    import convtrain.tracking.model
    from convtrain.pipeline import finish as finish_module
    from convtrain.training import plots

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    target, name, stage = {"plots": (plots, "learning_curves", "writing the plots"),
                           "test evaluation": (finish_module, "_final_evaluation", "evaluating the final model"),
                           "model logging": (convtrain.tracking.model, "log_model", "logging the results to MLflow")}[where]
    real = getattr(target, name)
    monkeypatch.setattr(target, name, interrupt)
    result = invoke("fit", *TINY, "--epochs", 2, "--out", "out")

    assert result.exit_code == 130
    line = error_line(result)
    out = tmp_path / "out"
    assert f"while {stage}" in line and f"the model is saved in {out / 'model.npz'}" in line
    assert f"the last checkpoint is {out / 'checkpoint.npz'}" in line
    assert line.endswith(f"continue with: convtrain fit --resume {out}")
    assert trainer_state(out / "checkpoint.npz")["epoch"] == 2
    assert only_run(tmp_path).info.status == "KILLED"

    monkeypatch.setattr(target, name, real)
    assert invoke("fit", "--resume", "out").exit_code == 0
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert (out / "plots" / "learning_curves.png").is_file()


def test_sigterm_after_training_ends_like_ctrl_c(tmp_path, monkeypatch):
    """`kill` while the plots are written: the same one line and KILLED run as Ctrl-C, not a
    silent exit that leaves the run RUNNING."""
    import signal

    from convtrain.training import plots

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this sleep
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(plots, "learning_curves", terminated)
    result = invoke("fit", *TINY, "--epochs", 1, "--out", "out")
    assert result.exit_code == 130
    line = error_line(result)
    assert "while writing the plots" in line and line.endswith(f"convtrain fit --resume {tmp_path / 'out'}")
    assert only_run(tmp_path).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the fit put the handler back


# ---- divergence --------------------------------------------------------------------------------------

def test_divergence_in_the_first_epoch_stops_cleanly_and_names_the_initial_checkpoint(tmp_path):
    result = invoke("fit", *TINY, "--epochs", 2, "--lr", "1e6", "--out", "out")
    line = error_line(result)
    assert "the training loss became" in line and "at epoch 1, batch " in line
    assert "out/checkpoint.npz (epoch 0)" in line and "lower learning rate" in line
    checkpoint = tmp_path / "out" / "checkpoint.npz"
    assert trainer_state(checkpoint)["epoch"] == 0 and not (tmp_path / "out" / "model.npz").exists()
    weights = Network.load(checkpoint).parameters()
    assert all(np.isfinite(w).all() for w in weights.values())  # the initial weights, not NaNs
    assert only_run(tmp_path).info.status == "FAILED"


def test_divergence_after_a_resume_names_epoch_batch_and_the_last_good_checkpoint(tmp_path):
    assert invoke("fit", *TINY, "--epochs", 1, "--out", "out").exit_code == 0
    checkpoint = tmp_path / "out" / "checkpoint.npz"
    good = checkpoint.read_bytes()

    result = invoke("fit", "--resume", "out", "--epochs", 3, "--lr", "1e6")
    line = error_line(result)
    assert "at epoch 2, batch " in line
    assert "the last good checkpoint is " in line and "out/checkpoint.npz (epoch 1)" in line
    assert checkpoint.read_bytes() == good  # nothing overwritten with NaNs
    weights = Network.load(checkpoint).parameters()
    assert all(np.isfinite(w).all() for w in weights.values())
    run = only_run(tmp_path)
    assert run.info.status == "FAILED" and "epoch 2" in run.data.tags["convtrain.error"]


# ---- float32 overflow ----------------------------------------------------------------------------------

HUGE_SCORES = np.array([[1e4, -1e4, 0.0],
                        [3e4, 3e4, -3e4],
                        [-1e30, 1e30, 0.0],
                        [88.8, 0.0, -88.8],     # exp(88.8) alone overflows float32
                        [-200.0, -200.0, -200.0]], dtype=np.float32)
LABELS = np.array([1, 2, 0, 2, 1])


def reference_loss(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy in float64 by log-sum-exp (exact enough for these rows)."""
    s = scores.astype(np.float64)
    top = s.max(axis=1)
    return top + np.log(np.exp(s - top[:, None]).sum(axis=1)) - s[np.arange(len(y)), y]


def test_softmax_and_cross_entropy_never_overflow_in_float32():
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # (exp underflowing to 0 is fine)
        probabilities = softmax(HUGE_SCORES.copy())
        loss, dscores = softmax_cross_entropy(HUGE_SCORES.copy(), LABELS)
        total = cross_entropy_sum(HUGE_SCORES.copy(), LABELS)
    expected = reference_loss(HUGE_SCORES, LABELS)
    assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(axis=1), 1.0)
    assert math.isfinite(loss) and loss == pytest.approx(expected.mean(), rel=1e-5)
    assert total == pytest.approx(expected.sum(), rel=1e-5)
    assert dscores.dtype == np.float32 and np.isfinite(dscores).all()
    assert np.allclose(dscores.sum(axis=1), 0.0, atol=1e-6)


def test_a_network_with_huge_scores_still_has_a_finite_loss_and_evaluates_to_finite_numbers(tmp_path):
    """Scores of thousands (an over-confident net): the loss is large but finite, training and
    `convtrain evaluate` report numbers, and the JSON stays valid (no Infinity)."""
    from convtrain.config import FitConfig
    from convtrain.nn.optim import SGD, make_schedule
    from convtrain.training.trainer import Trainer

    assert invoke("fit", *TINY, "--epochs", 1, "--no-track", "--out", "out").exit_code == 0
    network = Network.load(tmp_path / "out" / "model.npz")
    network.parameters()["fc.weight"][...] *= 1e3
    network.save(tmp_path / "loud.npz")

    from convtrain.data import load_dataset

    splits = load_dataset("digits", limit=300)
    x, y = network.normalize(splits.x_val), splits.y_val
    with np.errstate(over="raise"):
        scores = network.forward(x)
        config = FitConfig(lr=1e-9)
        trainer = Trainer(network, SGD(network.parameters(), lr=1e-9), make_schedule(config), epochs=1,
                          batch_size=len(y), l2=0.0)
        loss, _, _ = trainer.train_step(x, y, 1e-9)
    assert np.abs(scores).max() > 1e3
    assert loss is not None and math.isfinite(loss) and loss > 10

    result = invoke("evaluate", "loud.npz", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == ""  # no RuntimeWarning
    report = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert math.isfinite(report["loss"]) and report["loss"] > 10
