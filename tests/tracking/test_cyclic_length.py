"""A run's params and description say the length and rates it trained.

With `--schedule cyclic --cycles N` the schedule, not --epochs, sets the length, and the rates
run from eta_min to eta_max (--lr is not used): `params.epochs` and `params.updates` are the
trained length, `lr` is not logged, and the description says the same.
"""

from __future__ import annotations

import mlflow
import pytest

from tests.support.cli import invoke


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_cyclic_run_logs_the_epochs_updates_and_rates_it_trained(tmp_path):
    # a written config spells out every setting, lr and epochs too (as the CIFAR-BN example does)
    (tmp_path / "cyclic.toml").write_text('[optim]\nschedule = "cyclic"\ncycles = 1\nn_s = 20\neta_min = 0.001\n'
                                          'eta_max = 0.1\nlr = 0.05\nepochs = 12\n')
    result = invoke("fit", "--config", "cyclic.toml", "--limit", "300", "--filters", "4", "--batch-size", "32",
                    "--out", "out", "--quiet")
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trained = len(client.get_metric_history(run.info.run_id, "epoch_seconds"))
    batches = len(client.get_metric_history(run.info.run_id, "learning_rate"))
    params = run.data.params
    assert params["epochs"] == str(trained) != "12" and params["updates"] == "40"
    assert "lr" not in params and (params["eta_min"], params["eta_max"]) == ("0.001", "0.1")
    note = run.data.tags["mlflow.note.content"]
    assert "lr 0.001 to 0.1 (cyclic)" in note and "lr 0.05" not in note
    assert f"{trained} epochs (40 updates) planned, {trained} run" in note
    assert batches >= 1
    assert "more cycles: add `--cycles N`" in note and "--epochs N" not in note  # --epochs conflicts with cycles


def test_a_constant_run_logs_its_lr_and_epochs():
    result = invoke("fit", "--limit", "300", "--filters", "4", "--batch-size", "32", "--epochs", "2", "--lr", "0.05",
                    "--out", "out", "--quiet")
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient("sqlite:///mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.05" and "updates" not in run.data.params
    assert "lr 0.05," in run.data.tags["mlflow.note.content"]
    assert "2 epochs planned, 2 run" in run.data.tags["mlflow.note.content"]
