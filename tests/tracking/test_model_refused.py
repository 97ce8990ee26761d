"""A model the store refuses ends the run anyway; a registered model is registered once.

An outage keeps a run open until `--resume` sends its model (tests/tracking/test_tracking.py);
a refusal that a resume would only repeat (an MlflowException that is no connection problem)
ends the run FINISHED, with the reason in a tag and in the description, and the fit exits 0
with a warning. `--register-model` registers a run's logged model once, however often the
finished run is resumed; a resume that trains on logs new weights, which become a new version.
"""

from __future__ import annotations

import mlflow
import pytest
from mlflow.exceptions import MlflowException

import convtrain.tracking.model
from convtrain.tracking.run_model import MODEL_REFUSED_TAG
from tests.support.cli import invoke

TINY = ("--limit", "300", "--filters", "4", "--batch-size", "32", "--epochs", "1")
NOTE = "mlflow.note.content"


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def refuse(*args, **kwargs):
    raise MlflowException("Invalid value for the model: refused by this store", error_code="INVALID_PARAMETER_VALUE")


def runs(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_refused_model_ends_the_run_marked_and_a_resume_does_not_leave_it_open(tmp_path, monkeypatch):
    monkeypatch.setattr(convtrain.tracking.model, "log_model", refuse)
    result = invoke("fit", *TINY, "--out", "out")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "warning pyfunc model not logged (Invalid value for the model" in text and "ends without it" in text
    client, (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert "refused by this store" in run.data.tags[MODEL_REFUSED_TAG]
    assert "not logged to MLflow" in run.data.tags[NOTE]

    again = invoke("fit", "--resume", "out")  # the same refusal: the run ends again, not RUNNING
    assert again.exit_code == 0, again.output
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    fixed = invoke("fit", "--resume", "out")  # once the store takes it, the note goes
    assert fixed.exit_code == 0, fixed.output
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and MODEL_REFUSED_TAG not in run.data.tags
    assert "not logged to MLflow" not in run.data.tags[NOTE]


SWEEP = """
[fit]
limit = 300
filters = [4]
epochs = 1
batch_size = 32
experiment = "sweeps"
[sweep]
name = "refused"
method = "grid"
[space]
l2 = [1e-4, 1e-2]
"""


def test_a_sweep_whose_models_are_refused_leaves_no_child_running(tmp_path, monkeypatch):
    monkeypatch.setattr(convtrain.tracking.model, "log_model", refuse)
    (tmp_path / "sweep.toml").write_text(SWEEP)
    result = invoke("sweep", "sweep.toml")
    assert result.exit_code == 0, result.output
    _, found = runs(tmp_path)
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and {r.info.status for r in found} == {"FINISHED"}
    assert all(MODEL_REFUSED_TAG in r.data.tags for r in children)


def test_resuming_a_finished_run_registers_its_model_once(tmp_path):
    first = invoke("fit", *TINY, "--out", "out", "--register-model", "digits-net")
    assert first.exit_code == 0, first.output
    for _ in range(2):
        again = invoke("fit", "--resume", "out", "--register-model", "digits-net")
        assert again.exit_code == 0, again.output
        assert "digits-net version 1" in again.stdout
    client, (run,) = runs(tmp_path)
    assert [str(v.version) for v in client.search_model_versions("name = 'digits-net'")] == ["1"]

    # trained on: new weights, a new logged model, its own version
    longer = invoke("fit", "--resume", "out", "--epochs", "2", "--register-model", "digits-net")
    assert longer.exit_code == 0, longer.output
    versions = client.search_model_versions("name = 'digits-net'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert {v.run_id for v in versions} == {run.info.run_id}
