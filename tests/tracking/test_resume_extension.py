"""Training a finished run longer (`--resume --epochs N`) logs every epoch's metrics once per step.

A fit whose end put an earlier epoch's weights back (patience) logged that epoch's metrics one
step past its last epoch, as the run's latest values; an extension would log its first new
epoch at that very step, a second value MLflow cannot take back. Such a run is refused before
it is reopened; a run whose latest values are its last epoch's trains on.
"""

from __future__ import annotations

from collections import Counter

import mlflow
import pytest

from convtrain import FitConfig, fit
from convtrain.errors import ConfigError
from tests.support.cli import error_line, invoke

# lr 0.3 makes the val loss jump about: this fit runs its 6 epochs (patience 3 is never used up)
# and its end puts epoch 4's weights back
RESTORES_AT_THE_END = dict(limit=400, filters=[4], epochs=6, batch_size=32, patience=3, lr=0.3)
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds")


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def steps_with_several_values(client, run_id) -> dict:
    several = {}
    for key in client.get_run(run_id).data.metrics:
        counts = Counter(m.step for m in client.get_metric_history(run_id, key))
        several.update({(key, step): n for step, n in counts.items() if n > 1})
    return several


def histories(client, run_id) -> dict:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in EPOCH_KEYS}


def test_a_run_holding_its_restored_model_past_the_last_epoch_is_not_trained_on(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = fit(FitConfig(**RESTORES_AT_THE_END, tracking_uri=uri, out="run"), progress=None)
    best, last = first.metrics["best_epoch"], first.history.epochs[-1]["epoch"]
    assert best < last == 6 and "stopped_epoch" not in first.metrics  # the case this test is about
    client = mlflow.MlflowClient(uri)
    before = client.get_run(first.run_id)
    assert before.data.metrics["val_loss"] == first.metrics["val_loss"]  # the restored model's, at step 7
    assert steps_with_several_values(client, first.run_id) == {}
    held = histories(client, first.run_id)

    with pytest.raises(ConfigError) as caught:
        fit(FitConfig(**{**RESTORES_AT_THE_END, "epochs": 12}, tracking_uri=uri, out="run"), resume="run",
            progress=None)
    message = str(caught.value)
    assert "\n" not in message and "cannot train past epoch 6" in message and f"epoch {best}'s" in message

    after = client.get_run(first.run_id)
    assert after.info.status == "FINISHED" and after.data.metrics == before.data.metrics
    assert histories(client, first.run_id) == held
    assert steps_with_several_values(client, first.run_id) == {}

    result = invoke("fit", "--resume", "run", "--epochs", "12")
    assert f"cannot train past epoch {last}" in error_line(result) and result.exit_code == 2
    assert histories(client, first.run_id) == held


def test_a_run_whose_latest_values_are_its_last_epoch_trains_on_once_per_step(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    short = dict(limit=300, filters=[4], batch_size=32, tracking_uri=uri, out="run")
    first = fit(FitConfig(**short, epochs=2), progress=None)
    longer = fit(FitConfig(**short, epochs=4), resume="run", progress=None)
    assert longer.run_id == first.run_id
    client = mlflow.MlflowClient(uri)
    assert steps_with_several_values(client, first.run_id) == {}
    assert [step for step, _ in histories(client, first.run_id)["val_loss"]] == [1, 2, 3, 4]


def test_extending_a_fit_early_stopping_ended_is_refused_in_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stopped = fit(FitConfig(limit=400, filters=[4], epochs=40, batch_size=32, patience=1, lr=0.3,
                            tracking_uri=uri, out="run"), progress=None)
    last = stopped.metrics["stopped_epoch"]
    assert last < 40  # the case this test is about
    client = mlflow.MlflowClient(uri)
    held = histories(client, stopped.run_id)
    note = client.get_run(stopped.run_id).data.tags["mlflow.note.content"]
    assert "**Continue**" not in note and "**Train longer**" in note and "--epochs N" in note

    for spec in ("run", stopped.run_id):
        result = invoke("fit", "--resume", spec, "--epochs", "700")
        line = error_line(result)
        assert result.exit_code == 2 and f"early stopping at epoch {last}" in line and "--epochs 700" in line
        assert "convtrain fit --config" in line
    run = client.get_run(stopped.run_id)
    assert run.info.status == "FINISHED" and histories(client, stopped.run_id) == held
    # resuming it at its own length still just finishes it
    again = invoke("fit", "--resume", "run", "--quiet")
    assert again.exit_code == 0, again.output


def test_a_run_that_can_train_on_offers_to_continue(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = fit(FitConfig(limit=300, filters=[4], batch_size=32, epochs=2, tracking_uri=uri, out="run"),
                 progress=None)
    note = mlflow.MlflowClient(uri).get_run(result.run_id).data.tags["mlflow.note.content"]
    assert "**Continue**" in note and "**Train longer**" not in note
