"""A tracked `convtrain fit` killed again and again, then resumed: nothing is lost or doubled.

One fit (digits as an .npz with a test split, 6 epochs, seed 7, one thread) is SIGKILLed at
fifteen moments, each chosen by an event of tests/support/killharness.py (half-way through a
checkpoint write, inside MLflow's log_batch transaction, between a gradient and its update, ...)
or by a seeded random delay, and each time resumed with `--resume` until a run finishes. After
every kill the checkpoint on disk must load and be the last one completed; at the end the
weights must equal an uninterrupted run's bit for bit, and the MLflow run must be the one the
first checkpoint recorded, FINISHED, with every per-epoch metric once per epoch.

SIGTERM and SIGINT are tested the same way: the fit stops after the batch it is in, writes a
mid-epoch checkpoint, marks the run KILLED, exits 130 with one line naming the resume command,
and the resumed fit ends with the same weights. (tests/pipeline/test_fit.py checks SIGTERM in a plain
subprocess; a sweep killed mid-trial is tests/sweep/test_study.py::
test_a_killed_sweep_process_resumes_and_reruns_only_the_killed_trial.)
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from convtrain.nn.network import Network
from convtrain.nn.npz_files import read_json, read_npz
from convtrain.pipeline.resume import checkpoint_config
from convtrain.tracking.metric_buffer import EPOCH_METRICS
from tests.support.killharness import Harness

pytestmark = pytest.mark.slow

EPOCHS = 6
LOG_EVERY = 5
TRAIN_ROWS = 1500  # of digits' 1797; the rest is the npz's test split


def fit_args(npz: Path, out: str, run_name: str) -> list[str]:
    return ["fit", "--data", "npz", "--data-path", npz, "--epochs", EPOCHS, "--seed", 7, "--threads", 1,
            "--batch-size", 64, "--log-every", LOG_EVERY, "--out", out, "--run-name", run_name, "--quiet"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from convtrain.data.digits import load_digits_data

    folder = tmp_path_factory.mktemp("kill")
    raw = load_digits_data()
    x, y = raw.x.astype(np.uint8), raw.y
    np.savez(folder / "digits.npz", x=x[:TRAIN_ROWS], y=y[:TRAIN_ROWS], x_test=x[TRAIN_ROWS:],
             y_test=y[TRAIN_ROWS:])
    return folder


@pytest.fixture(scope="module")
def harness(workdir):
    with Harness(workdir) as running:
        yield running


@pytest.fixture(scope="module")
def reference(workdir) -> dict[str, np.ndarray]:
    """Final weights of the same fit, uninterrupted, in a plain `python -m convtrain.cli` process."""
    command = [sys.executable, "-m", "convtrain.cli", *map(str, fit_args(workdir / "digits.npz", "reference",
                                                                          "reference")), "--no-track"]
    env = Harness(workdir, fork=False).env
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return params(workdir / "reference" / "model.npz")


def params(path: Path) -> dict[str, np.ndarray]:
    return Network.load(path).parameters()


def assert_same_weights(path: Path, expected: dict[str, np.ndarray]) -> None:
    got = params(path)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype
        assert np.array_equal(got[name], value), f"{name} differs from the uninterrupted run"


def checkpoint_state(path: Path) -> dict:
    """What a resume would read; fails the test if the file is not a complete checkpoint."""
    Network.load(path)  # weights, architecture, normalization
    checkpoint_config(path)
    arrays = read_npz(path, "checkpoint")
    state = read_json(arrays, "trainer", path, "checkpoint")
    state["run_id"] = read_json(arrays, "callbacks", path, "checkpoint").get("mlflow", {}).get("run_id")
    return state


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def mlflow_client(workdir: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


# ---- SIGKILL at fifteen moments --------------------------------------------------------------------

# (what the moment is, how the process is stopped there). "event:n" is the n-th such event in
# that process (see tests/support/killharness.py); ("after", event, seconds) kills at a random time.
def kill_plan(rng: random.Random) -> list[tuple[str, tuple]]:
    return [
        ("mid-batch in epoch 1, before its checkpoint", ("stop", f"mid-batch:{rng.randint(2, 20)}")),
        ("mid-batch in epoch 2", ("stop", f"mid-batch:{22 + rng.randint(2, 20)}")),
        ("half of a checkpoint's bytes written", ("stop", "checkpoint-half:1")),
        ("a checkpoint written but not yet renamed", ("stop", "checkpoint-full:1")),
        ("inside MLflow's log_batch transaction", ("stop", "mlflow-sql:1")),
        ("reading the checkpoint to resume", ("stop", "resume-read:1")),
        ("reopening the MLflow run", ("stop", "run-reopened:1")),
        ("evaluating the validation set", ("stop", "epoch-eval:2")),
        ("a checkpoint renamed, before MLflow is told", ("stop", "on-checkpoint:1")),
        ("a random moment while training", ("after", "fit-start", rng.uniform(0.05, 0.4))),
        ("another random moment while training", ("after", "fit-start", rng.uniform(0.05, 0.4))),
        ("half of model.npz written", ("stop", "model-half:1")),
        ("logging the artifacts", ("stop", f"artifact:{rng.randint(1, 4)}")),
        ("logging the pyfunc model", ("stop", "log-model:1")),
        ("marking the run FINISHED", ("stop", "terminated:1")),
    ]


def test_sigkill_at_fifteen_moments_then_resume_equals_the_uninterrupted_run(workdir, harness, reference):
    npz = workdir / "digits.npz"
    out = workdir / "killed"
    checkpoint = out / "checkpoint.npz"
    fresh = fit_args(npz, "killed", "killed")
    run_id = None          # of the MLflow run the first checkpoint recorded
    epoch_on_disk = -1     # epoch of the checkpoint on disk, never going back
    resume_forms = iter(["folder", "file", "run id"] * 10)
    killed_at = []

    for moment, how in kill_plan(random.Random(2424)):
        if checkpoint.exists():
            form = next(resume_forms)
            target = {"folder": out, "file": checkpoint, "run id": run_id}[form]
            args = ["fit", "--resume", target, "--quiet"]
        else:
            args = fresh
        if how[0] == "stop":
            outcome = harness.run(args, stop_at=how[1])
            assert outcome.killed and outcome.last.name == how[1].split(":")[0], (moment, outcome.stderr)
        else:
            outcome = harness.run(args, kill_after=how[1:])
            assert outcome.killed, (moment, outcome.returncode, outcome.stderr)
        killed_at.append((moment, outcome.last.name))

        if not checkpoint.exists():
            assert epoch_on_disk == -1, f"{moment}: the checkpoint disappeared"
            # nothing to resume yet: --resume says so in one line, and a fresh start is allowed
            refused = harness.run(["fit", "--resume", out])
            assert refused.returncode == 1 and "holds no checkpoint.npz" in one_error_line(refused.stderr)
            continue
        state = checkpoint_state(checkpoint)  # (a): loadable after every kill
        assert state["epoch"] >= epoch_on_disk, f"{moment}: the checkpoint went back in time"
        if how[0] == "stop" and outcome.last.name in ("checkpoint-half", "checkpoint-full"):
            assert state["epoch"] == outcome.last.epoch - 1, f"{moment}: the previous checkpoint was not kept"
        if how[0] == "stop" and outcome.last.name == "on-checkpoint":
            assert state["epoch"] == outcome.last.epoch
        epoch_on_disk = state["epoch"]
        run_id = run_id or state["run_id"]
        assert state["run_id"] == run_id, f"{moment}: the checkpoint moved to another MLflow run"

    finished = harness.run(["fit", "--resume", out, "--quiet"])
    assert finished.returncode == 0, finished.stderr
    assert run_id in finished.stdout

    # the kills hit every part of a fit
    assert len({moment for moment, _ in killed_at}) >= 15
    reached = Counter(event for _, event in killed_at)
    for event in ("mid-batch", "checkpoint-half", "checkpoint-full", "mlflow-sql", "model-half", "artifact"):
        assert reached[event] >= 1, killed_at

    # (b) the same weights as the uninterrupted run, bit for bit
    assert_same_weights(out / "model.npz", reference)
    assert checkpoint_state(checkpoint)["epoch"] == EPOCHS
    assert not list(out.glob(".*.tmp")), "killed writes left temp files behind"

    # (c) one MLflow run carried the fit from its first checkpoint to the end, nothing logged twice
    client = mlflow_client(workdir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert Path(run.data.tags["convtrain.checkpoint"]) == checkpoint.resolve()
    for key in EPOCH_METRICS:
        if key in ("train_cost", "val_cost") and key not in run.data.metrics:
            continue
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), f"{key}: steps {sorted(steps)}"
    batch_steps = [m.step for m in client.get_metric_history(run_id, "batch_loss")]
    assert sorted(batch_steps) == sorted(set(batch_steps)), "batch_loss logged twice for a step"
    for key in [k for k in run.data.metrics if k.startswith("test_")]:
        assert len(client.get_metric_history(run_id, key)) == 1, f"{key} logged more than once"
    assert "test_accuracy" in run.data.metrics
    # even the kill in epoch 1 left a checkpoint (epoch 0's): no second run was ever started
    others = [r for r in client.search_runs([run.info.experiment_id], "attributes.run_name = 'killed'")
              if r.info.run_id != run_id]
    assert others == []


def test_a_fit_killed_before_its_first_batch_resumes_into_the_same_run(workdir, harness, reference):
    """The epoch-0 checkpoint (written right after the MLflow run is created) makes a kill before
    any epoch ends resumable: same run id, and the uninterrupted run's weights at the end."""
    out = workdir / "early"
    # killed as soon as the epoch-0 checkpoint is in place: before MLflow got the params, the
    # datasets or the checkpoint tag, and before the first batch
    killed = harness.run(fit_args(workdir / "digits.npz", "early", "early"), stop_at="on-checkpoint:1")
    assert killed.killed and "run-created" in killed.names() and "fit-start" not in killed.names(), killed.stderr
    state = checkpoint_state(out / "checkpoint.npz")
    assert (state["epoch"], state["step"], state["mid_epoch"]) == (0, 0, False)
    client = mlflow_client(workdir)
    assert client.get_run(state["run_id"]).info.status == "RUNNING"  # SIGKILL: nobody could mark it

    resumed = harness.run(["fit", "--resume", out, "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    assert "run-created" not in resumed.names() and state["run_id"] in resumed.stdout
    assert_same_weights(out / "model.npz", reference)
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id],
                                                       "attributes.run_name = 'early'")] == [state["run_id"]]
    assert sorted(m.step for m in client.get_metric_history(state["run_id"], "train_loss")) == \
        list(range(1, EPOCHS + 1))
    assert run.data.params["epochs"] == str(EPOCHS)
    assert len(run.inputs.dataset_inputs) == 3  # training, validation, test: logged by the resumed fit


# ---- SIGTERM / SIGINT ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT,)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_the_batch_boundary_and_resume_equals_the_uninterrupted_run(
        workdir, harness, reference, signals):
    name = signal.Signals(signals[0]).name.lower()
    out = workdir / name
    # the signal arrives while batch 9 of epoch 2 is being computed (update 31)
    stopped = harness.run(fit_args(workdir / "digits.npz", name, name), stops=[("mid-batch:31", signals)])
    assert stopped.returncode == 130, stopped.stderr
    line = one_error_line(stopped.stderr)
    assert "epoch 2, batch 9/" in line and f"convtrain fit --resume {out}" in line
    assert stopped.names().count("mid-batch") == 31  # no batch started after the signal

    state = checkpoint_state(out / "checkpoint.npz")
    assert (state["epoch"], state["step"], state["mid_epoch"], state["batches_done"]) == (1, 31, True, 9)
    client = mlflow_client(workdir)
    run = client.get_run(state["run_id"])
    assert run.info.status == "KILLED"

    resumed = harness.run(["fit", "--resume", out, "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(out / "model.npz", reference)
    assert client.get_run(state["run_id"]).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(state["run_id"], "train_loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))


def test_a_second_ctrl_c_while_the_checkpoint_is_written_keeps_the_previous_one(workdir, harness):
    out = workdir / "twice"
    # the first Ctrl-C in batch 9 of epoch 2, the second half-way through the checkpoint it asks for
    stopped = harness.run(fit_args(workdir / "digits.npz", "twice", "twice"),
                          stops=[("mid-batch:31", (signal.SIGINT,)), ("checkpoint-half:3", (signal.SIGINT,))])
    assert stopped.returncode == 130, stopped.stderr
    line = one_error_line(stopped.stderr)
    assert "second interrupt" in line and f"convtrain fit --resume {out}" in line
    assert stopped.names().count("checkpoint-full") == 2  # epoch 0's and 1's; the third was abandoned
    state = checkpoint_state(out / "checkpoint.npz")
    assert (state["epoch"], state["mid_epoch"]) == (1, False)  # epoch 1's, untouched
    assert not list(out.glob(".*.tmp"))
    assert mlflow_client(workdir).get_run(state["run_id"]).info.status == "KILLED"
