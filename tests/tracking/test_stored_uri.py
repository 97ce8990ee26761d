"""A tracking URI read from a file is data, not configuration.

`--resume` continues a run in its checkpoint's store only when that store is the current one
(the --tracking-uri flag, else MLFLOW_TRACKING_URI, else ./mlflow.db), compared in resolved form;
otherwise it is refused in one line naming both, before either store is contacted or created.
The unlogged-metrics file's URI is treated the same way.
"""

from __future__ import annotations

import json
import socket

import mlflow
import pytest

from convtrain.nn.npz_files import json_entry
from convtrain.training.checkpoint import TrainingCheckpoint
from convtrain.training.run_folder import RunFolder
from tests.support.cli import error_line, invoke

TINY = ("--limit", "300", "--filters", "4", "--batch-size", "32", "--epochs", "1")


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def store_in_checkpoint(folder, uri: str) -> None:
    """What a hand-edited checkpoint would say: its run lives in the store at `uri`."""
    path = RunFolder(folder).checkpoint
    checkpoint = TrainingCheckpoint.load(path)
    callbacks = json.loads(str(checkpoint.arrays["callbacks"][()]))
    callbacks["mlflow"]["tracking_uri"] = uri
    checkpoint.arrays["callbacks"] = json_entry(callbacks)
    checkpoint.save(path)


def only_run(client):
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


def test_a_checkpoint_naming_another_sqlite_store_is_refused_and_the_store_not_created(tmp_path):
    assert invoke("fit", *TINY, "--out", "out").exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    evil = tmp_path / "elsewhere" / "evil.db"
    store_in_checkpoint("out", f"sqlite:///{evil}")
    result = invoke("fit", "--resume", "out")
    line = error_line(result)
    assert result.exit_code == 1
    assert f"sqlite:///{evil}" in line and f"sqlite:///{tmp_path / 'mlflow.db'}" in line
    assert f"pass --tracking-uri sqlite:///{evil}" in line
    assert not evil.exists() and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_checkpoint_naming_a_server_is_refused_without_contacting_it(tmp_path):
    assert invoke("fit", *TINY, "--out", "out").exit_code == 0
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        store_in_checkpoint("out", url)
        result = invoke("fit", "--resume", "out")
        line = error_line(result)
        assert url in line and f"--tracking-uri {url}" in line
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()
    # the run in the real store was not touched
    run = only_run(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert run.info.status == "FINISHED"


def test_a_run_in_another_store_resumes_only_when_that_store_is_chosen_again(tmp_path, monkeypatch):
    (tmp_path / "other").mkdir()
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    assert invoke("fit", *TINY, "--out", "out", "--tracking-uri", other).exit_code == 0
    # the checkpoint's own config names `other` too: not taken as this resume's choice
    line = error_line(invoke("fit", "--resume", "out", "--epochs", "2"))
    assert other in line and f"sqlite:///{tmp_path / 'mlflow.db'}" in line
    assert not (tmp_path / "mlflow.db").exists()

    # the same store, spelled relative to the working folder: accepted
    resumed = invoke("fit", "--resume", "out", "--epochs", "2", "--tracking-uri", "sqlite:///other/mlflow.db")
    assert resumed.exit_code == 0, resumed.output
    # the environment's store counts as the current one as well
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    resumed = invoke("fit", "--resume", "out", "--epochs", "3", env={"MLFLOW_TRACKING_URI": other})
    assert resumed.exit_code == 0, resumed.output
    run = only_run(mlflow.MlflowClient(other))
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in mlflow.MlflowClient(other).get_metric_history(run.info.run_id, "train_loss")) \
        == [1, 2, 3]


def test_unlogged_metrics_kept_for_another_store_are_not_sent(tmp_path):
    assert invoke("fit", *TINY, "--out", "out").exit_code == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = only_run(client)
    unlogged = RunFolder(tmp_path / "out").unlogged
    unlogged.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": "http://127.0.0.1:9/",
                                    "metrics": [{"key": "train_loss", "value": 9.0, "step": 99,
                                                 "timestamp": 0}]}))
    result = invoke("fit", "--resume", "out")
    assert result.exit_code == 0, result.output
    assert "holds metrics for another tracking store" in result.stderr
    assert 99 not in [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
