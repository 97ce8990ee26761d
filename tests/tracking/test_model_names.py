"""Every run or sweep name gives a model name MLflow accepts, so a fit's model is logged and its
run ends FINISHED whatever it is called."""

from __future__ import annotations

import pytest

from convtrain.tracking.model import model_name
from tests.support.cli import invoke

NAMES = ["lr0.05", "v1.2", "v1.2-trial-3", "a/b:c%d", "it's \"quoted\"", "...", "", None, "résumé 2",
         "x" * 250, "-lead.trail-", "tab\there", "..hidden", "50%", "s3://bucket/key"]


@pytest.mark.parametrize("name", NAMES)
def test_any_run_name_makes_a_model_name_mlflow_accepts(name):
    from mlflow.utils.validation import _validate_logged_model_name

    made = model_name(name)
    _validate_logged_model_name(made)  # raises MlflowException for a name MLflow refuses
    assert made and made == model_name(made)  # stable: a resumed run finds the same name


def test_decimal_points_read_as_such():
    assert model_name("lr0.05") == "lr0_05" and model_name("v1.2") == "v1_2"
    assert model_name("digits-bn") == "digits-bn" and model_name(None) == "model"


def test_a_fit_named_lr0_05_logs_its_model_and_finishes(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    result = invoke("fit", "--limit", "300", "--filters", "4", "--epochs", "1", "--batch-size", "32",
                    "--run-name", "lr0.05", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "", result.stderr  # no "pyfunc model not logged" warning
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    assert run.info.run_name == "lr0.05" and run.info.status == "FINISHED"
    models = client.search_logged_models([run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("lr0_05", run.info.run_id)]
