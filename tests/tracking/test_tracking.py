"""What one `convtrain fit` leaves in MLflow, against the default SQLite file and a real server.

The same checks run on both stores: exactly one run, every per-epoch metric once per epoch,
params equal to the resolved config, the artifacts, the datasets, and a pyfunc model that
predicts what convtrain predicts. The server tests start `mlflow server` on a free loopback
port and stop it at the end; one of them kills it in the middle of a fit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from convtrain.config import FitConfig
from tests.support.cli import free_port, invoke

EPOCH_METRICS = ["train_loss", "train_cost", "train_accuracy", "val_loss", "val_accuracy",
                 "val_balanced_accuracy", "learning_rate", "epoch_seconds", "images_per_second"]


# ---- a real MLflow server -----------------------------------------------------------------------

class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port> with its own SQLite file, in its own process group."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        self.process = None

    def launch(self) -> "MlflowServer":
        from convtrain.tracking.ui import server_environment

        self.folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts")]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=server_environment())
        return self

    def wait_ready(self, timeout: float = 120.0) -> "MlflowServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        pytest.fail(f"mlflow server did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        from convtrain.tracking.ui import stop_process_group

        if self.process is not None:
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, signal.SIGKILL)
            stop_process_group(self.process, timeout=5)
            self.process = None


@pytest.fixture(scope="module")
def mlflow_servers(tmp_path_factory):
    """Servers started side by side (start-up is the slow part): one shared by the tests of
    this module, and one for each test that kills its server."""
    servers = {name: MlflowServer(tmp_path_factory.mktemp(f"mlflow-{name}")).launch()
               for name in ("shared", "doomed", "outage")}
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def mlflow_server(mlflow_servers):
    return mlflow_servers["shared"]


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path, monkeypatch):
    """(tracking URI, experiment, extra CLI flags), with the cwd in a fresh temp folder.
    Each test has its own experiment, as the server is shared by the module's tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = request.node.name.replace("[", "-").rstrip("]")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}", experiment, ["--experiment", experiment]
    server = request.getfixturevalue("mlflow_server")
    return server.url, experiment, ["--experiment", experiment, "--tracking-uri", server.url]


# ---- the checks --------------------------------------------------------------------------------------

def check_logged_fit(uri: str, run_id: str, out_dir: Path, epochs: int, x_check: np.ndarray) -> None:
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from convtrain.nn.network import Network

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), key
    batch_steps = [m.step for m in client.get_metric_history(run_id, "batch_loss")]
    assert batch_steps and len(batch_steps) == len(set(batch_steps))

    config = FitConfig.from_toml(out_dir / "config.toml")
    assert config.epochs == epochs
    assert run.data.params == config.flat_params()

    tags = run.data.tags
    for key in ("convtrain.version", "convtrain.host", "convtrain.build.openmp", "convtrain.checkpoint"):
        assert tags.get(key), key
    assert Path(tags["convtrain.checkpoint"]) == out_dir / "checkpoint.npz"

    contexts = {i.dataset.name: [t.value for t in i.tags] for i in run.inputs.dataset_inputs}
    assert contexts == {"digits-training": ["training"], "digits-validation": ["validation"]}
    for given in run.inputs.dataset_inputs:  # built-in data: the code is its source, named as the run's
        assert given.dataset.source_type == "code"
        assert json.loads(given.dataset.source)["tags"]["mlflow.source.name"] == "convtrain"

    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.toml", "plots", "checkpoint"} <= top
    assert {Path(a.path).name for a in client.list_artifacts(run_id, "plots")} == {
        "learning_curves.png", "confusion_matrix.png", "filters_conv1.png"}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/checkpoint.npz"]

    with _use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/{client.get_run(run_id).info.run_name}")
    assert model.metadata.signature is not None
    network = Network.load(out_dir / "model.npz")
    expected = network.predict_proba(x_check)
    predicted = model.predict(x_check)  # one column per class, named by the class names
    assert list(predicted.columns) == [str(c) for c in network.class_names]
    np.testing.assert_allclose(predicted.to_numpy(), expected, rtol=0, atol=0)


def only_run(uri: str, experiment_name: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def digits_images():
    from convtrain.data import load_dataset

    return load_dataset("digits").x_val[:25]


# ---- the tests -------------------------------------------------------------------------------------------

def test_fit_epochs_2_logs_one_complete_run(store, tmp_path, digits_images):
    uri, experiment, flags = store
    result = invoke("fit", "--epochs", 2, "--run-name", "first", *flags)
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output and "\r" not in result.output  # readable in CI logs
    out_dir = tmp_path / "runs" / "first"
    assert (out_dir / "model.npz").is_file() and (out_dir / "checkpoint.npz").is_file()
    run = only_run(uri, experiment)
    assert run.info.run_name == "first"
    assert run.info.run_id in result.output
    check_logged_fit(uri, run.info.run_id, out_dir, 2, digits_images)
    if uri.startswith("sqlite"):
        assert (tmp_path / "mlflow.db").is_file()  # the default store in the working directory


def test_resume_continues_the_same_run_without_duplicates(store, tmp_path, digits_images):
    """Stop after 2 of 4 epochs (as SIGINT does), then `--resume RUN_ID` finishes in the same run."""
    from convtrain.errors import TrainingInterrupted
    from convtrain.pipeline.fit import fit
    from convtrain.training.callbacks import Callback

    uri, experiment, _ = store

    class StopMidEpoch(Callback):
        def on_batch_end(self, trainer, step, logs):
            if trainer.epoch == 2 and step % 5 == 0:  # mid-way through epoch 3
                trainer.request_stop()

    config = FitConfig(epochs=4, run_name="stopped", tracking_uri=uri, experiment=experiment, limit=600)
    with pytest.raises(TrainingInterrupted) as stopped:
        fit(config, callbacks=[StopMidEpoch()], progress=None)
    run = only_run(uri, experiment)
    assert run.info.status == "KILLED"
    assert Path(run.data.tags["convtrain.checkpoint"]) == Path(stopped.value.checkpoint)

    flags = ["--tracking-uri", uri] if uri.startswith("http") else []
    result = invoke("fit", "--resume", run.info.run_id, *flags)
    assert result.exit_code == 0, result.output
    resumed = only_run(uri, experiment)
    assert resumed.info.run_id == run.info.run_id
    check_logged_fit(uri, run.info.run_id, tmp_path / "runs" / "stopped", 4, digits_images)


def test_server_down_at_start_fails_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = invoke("fit", "--epochs", 1, "--tracking-uri", dead)
    assert result.exit_code == 1
    assert time.monotonic() - started < 20
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be reached" in lines[0] and "--no-track" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_server_killed_mid_run_loses_no_training_work(tmp_path, monkeypatch, mlflow_servers):
    from convtrain.nn.network import Network
    from convtrain.pipeline.fit import fit
    from convtrain.training.run_folder import UNLOGGED_FILE
    from convtrain.training.callbacks import Callback

    monkeypatch.chdir(tmp_path)
    server = mlflow_servers["doomed"]

    class KillServerAfterFirstEpoch(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1:
                server.stop(signal.SIGKILL)

    started = time.monotonic()
    config = FitConfig(epochs=3, run_name="orphan", tracking_uri=server.url, limit=400)
    result = fit(config, callbacks=[KillServerAfterFirstEpoch()], progress=None)
    assert time.monotonic() - started < 60  # the dead server is probed, not waited for
    assert len(result.history.epochs) == 3
    assert Network.load(result.model_path).num_classes == 10
    assert result.checkpoint_path.is_file()
    assert any("could not be logged" in p for p in result.problems)
    import json

    unlogged = json.loads((result.out_dir / UNLOGGED_FILE).read_text())
    assert unlogged["run_id"] == result.run_id
    assert {m["step"] for m in unlogged["metrics"] if m["key"] == "train_loss"} == {2, 3}

    # The server comes back only after the fit ended: `--resume` sends what was kept, then the
    # model, and only then marks the run FINISHED (it stayed open until then).
    assert any(f"stays open until the rest is sent: convtrain fit --resume {result.out_dir}" in p
               for p in result.problems)
    server.launch().wait_ready()
    import mlflow

    client = mlflow.MlflowClient(server.url)
    assert client.get_run(result.run_id).info.status == "RUNNING"
    resumed = invoke("fit", "--resume", result.out_dir, "--tracking-uri", server.url)
    assert resumed.exit_code == 0, resumed.output
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [1, 2, 3], key
    assert [m.source_run_id for m in client.search_logged_models([run.info.experiment_id])] == [result.run_id]
    assert not (result.out_dir / UNLOGGED_FILE).exists()


KILLED_DURING_AN_OUTAGE = """
import os, signal, sys
from convtrain import FitConfig, fit
from convtrain.training.callbacks import Callback

server_pid, url = int(sys.argv[1]), sys.argv[2]

class Outage(Callback):
    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == 1:  # the store dies; epochs 2 and 3 wait in the buffer
            os.killpg(server_pid, signal.SIGKILL)

    def on_checkpoint(self, trainer, path):
        if trainer.epoch == 3:  # kill -9 right after epoch 3's checkpoint: no chance to save anything
            os.kill(os.getpid(), signal.SIGKILL)

fit(FitConfig(epochs=5, limit=400, log_every=1, run_name="outage", tracking_uri=url, out="out"),
    callbacks=[Outage()], progress=None)
"""


def test_metrics_kept_back_by_an_outage_survive_kill_9_and_resume_sends_each_once(tmp_path, monkeypatch, mlflow_servers):
    """The server dies after epoch 1, the fit is killed -9 after epoch 3 (its metrics for epochs
    2-3 were only in memory), the server comes back: `--resume` sends them from the checkpoint,
    trains epochs 4-5, and the run holds every epoch and every batch step exactly once."""
    import mlflow

    from convtrain.tracking.metric_buffer import EPOCH_METRICS as LOGGED_PER_EPOCH
    from convtrain.training.checkpoint import TrainingCheckpoint

    server = mlflow_servers["outage"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("MLFLOW_TRACKING_URI", None)
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_AN_OUTAGE, str(server.process.pid), server.url],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    server.process.wait(timeout=30)  # the fit killed it
    server.process = None
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "stopped answering" in killed.stderr
    assert TrainingCheckpoint.load(tmp_path / "out" / "checkpoint.npz").state["epoch"] == 3

    server.launch().wait_ready()
    client = mlflow.MlflowClient(server.url)
    run_id = TrainingCheckpoint.load(tmp_path / "out" / "checkpoint.npz").callback_state("mlflow")["run_id"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1]  # all the store got
    monkeypatch.chdir(tmp_path)
    resumed = invoke("fit", "--resume", "out", "--tracking-uri", server.url)
    assert resumed.exit_code == 0, resumed.output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    per_epoch = [key for key in LOGGED_PER_EPOCH if key in run.data.metrics]
    assert {"train_loss", "val_loss", "val_accuracy", "epoch_seconds"} <= set(per_epoch)
    for key in per_epoch:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4, 5], key
    last_step = TrainingCheckpoint.load(tmp_path / "out" / "checkpoint.npz").state["step"]
    batches = sorted(m.step for m in client.get_metric_history(run_id, "batch_loss"))
    assert batches == list(range(1, last_step + 1))


def test_runs_left_running_by_a_dead_fit_are_marked_killed_by_the_next_one(tmp_path, monkeypatch):
    """kill -9 leaves a run RUNNING; the next fit on this machine closes it (KILLED, with a
    note on how to resume), and leaves alone what it cannot know is dead."""
    import json

    import mlflow

    from convtrain.tracking.processes import this_process
    from convtrain.tracking.runs import ORPHAN_NOTE_TAG, PROCESS_TAG

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("orphans")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {**this_process(), "pid": int(gone.stdout), "start": 1}  # a process that has ended
    owners = {"dead": dead, "alive": this_process(), "elsewhere": {**dead, "host": "another-machine"},
              "untagged": None}
    runs = {}
    for name, owner in owners.items():
        tags = {PROCESS_TAG: json.dumps(owner)} if owner else {}
        runs[name] = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    result = invoke("fit", "--epochs", 1, "--limit", 300, "--filters", 4, "--experiment", "orphans",
                    "--tracking-uri", uri, "--quiet")
    assert result.exit_code == 0, result.output
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING", "untagged": "RUNNING"}
    note = client.get_run(runs["dead"]).data.tags[ORPHAN_NOTE_TAG]
    assert f"convtrain fit --resume {runs['dead']}" in note
    fits = client.search_runs([experiment_id], filter_string="tags.`convtrain.process` != ''")
    mine = [r for r in fits if r.info.run_id not in runs.values()]
    assert len(mine) == 1 and mine[0].info.status == "FINISHED"
    assert json.loads(mine[0].data.tags[PROCESS_TAG])["host"] == socket.gethostname()
