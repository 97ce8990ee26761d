"""A sweep as a reviewer sees it in MLflow: each child's latest objective is the one the study
recorded (also after early stopping restored an earlier epoch), the parent describes the
sweep, the best trial's model is registered once, and retraining the winner lands under the
sweep's parent run."""

from __future__ import annotations

import csv

import mlflow
import pytest
from typer.testing import CliRunner

from convtrain.cli import app
from convtrain.sweep.launcher import run_sweep
from convtrain.tracking.description import NOTE_TAG

# lr 0.3 makes the val loss jump about, so early stopping restores an earlier epoch in some trials
SWEEP = """
[fit]
data = "digits"
limit = 400
epochs = 8
patience = 2
batch_size = 32
experiment = "sweeps"
[sweep]
name = "digits-es"
method = "grid"
objective = "val_loss"
register_model = "digits-es-best"
[space]
filters = [[4], [8]]
lr = [0.3, 0.05]
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "sweep.toml").write_text(SWEEP)
    return tmp_path


def test_children_parent_and_trials_csv_agree_on_the_objective(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    outcome = run_sweep("sweep.toml", tracking_uri=uri, quiet=True)
    client = mlflow.MlflowClient(uri)
    with open(workdir / "runs/digits-es/trials.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["state"] == "COMPLETE"]
    assert len(rows) == 4

    restored = 0
    for row in rows:
        child = client.get_run(row["mlflow_run_id"])
        assert child.data.metrics["val_loss"] == float(row["val_loss"])
        assert child.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        restored += child.data.metrics["best_epoch"] < max(m.step for m in client.get_metric_history(
            child.info.run_id, "epoch_seconds"))
    assert restored  # the early-stopping case is among the trials

    parent = client.get_run(outcome.parent_run_id)
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert parent.data.metrics["best_val_loss"] == float(best["val_loss"]) == outcome.best.value
    assert parent.data.tags["best.run_id"] == best["mlflow_run_id"]
    best_child = client.get_run(best["mlflow_run_id"])
    assert best_child.data.metrics["val_loss"] == parent.data.metrics["best_val_loss"]

    text = parent.data.tags[NOTE_TAG]
    assert "grid, minimize `val_loss`, 4 trials" in text and "| filters |" in text and "| lr |" in text
    assert "4 complete" in text
    assert f"[trial {best['trial']}](#/experiments/{parent.info.experiment_id}/runs/{best['mlflow_run_id']})" in text
    assert f"convtrain fit --config {outcome.best_config.resolve()}" in text

    versions = client.search_model_versions("name = 'digits-es-best'")
    assert [v.run_id for v in versions] == [best["mlflow_run_id"]]
    run_sweep("sweep.toml", tracking_uri=uri, quiet=True)  # nothing left to run: no second version
    assert len(client.search_model_versions("name = 'digits-es-best'")) == 1

    # retraining the winner lands under the sweep's parent run, named after the sweep
    result = CliRunner().invoke(app, ["fit", "--config", str(outcome.best_config), "--out", str(workdir / "again"),
                                      "--quiet"], terminal_width=120)
    assert result.exit_code == 0, result.output
    again = [r for r in client.search_runs([parent.info.experiment_id], filter_string="attributes.run_name = 'digits-es-best'")]
    assert len(again) == 1 and again[0].data.tags["mlflow.parentRunId"] == outcome.parent_run_id
    assert again[0].data.metrics["val_loss"] == parent.data.metrics["best_val_loss"]  # same config and seed
