"""`convtrain sweep` end to end: real fits on digits (tiny nets, 2 epochs), real MLflow store."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
from typer.testing import CliRunner

from convtrain.cli import app

SWEEP = """
[fit]
data = "digits"
limit = 400
epochs = 2
hidden = []
batch_size = 32
experiment = "sweeps"
[sweep]
name = "digits-grid"
method = "grid"
[space]
filters = [[4], [8]]
l2 = [1e-4, 1e-2]
"""


def cli(*args):
    runner = CliRunner()
    return runner.invoke(app, list(args), terminal_width=120)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def runs_of(uri, experiment="sweeps"):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("convtrain.sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_grid_sweep_makes_one_parent_four_children_and_a_best_config_that_reruns(workdir):
    (workdir / "sweep.toml").write_text(SWEEP)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    result = cli("sweep", "sweep.toml", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    assert "best: trial" in result.output

    parents, children = runs_of(uri)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["convtrain.sweep.trial"] for c in children) == ["0", "1", "2", "3"]
    assert {c.data.tags["convtrain.sweep"] for c in children} == {"digits-grid"}
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"

    best_child = max(children, key=lambda c: c.data.metrics["val_accuracy"])
    assert parent.data.metrics["best_val_accuracy"] == best_child.data.metrics["val_accuracy"]
    assert parent.data.tags["best.run_id"] in {c.info.run_id for c in children
                                               if c.data.metrics["val_accuracy"] == best_child.data.metrics["val_accuracy"]}
    assert parent.data.params["sweep.method"] == "grid"
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/best.toml", "sweep/optimization_history.png",
            "sweep/objective_by_parameter.png"} <= artifacts

    best_toml = workdir / "runs/digits-grid/best.toml"
    rerun = cli("fit", "--config", str(best_toml), "--no-track", "--out", str(workdir / "rerun"), "--quiet")
    assert rerun.exit_code == 0, rerun.output
    winner = mlflow.MlflowClient(uri).get_run(parent.data.tags["best.run_id"])
    assert f"{winner.data.metrics['val_accuracy']:.4f}" in rerun.output  # same seed, same config, same model


def test_two_workers_share_the_sweep_without_running_a_trial_twice(workdir):
    (workdir / "sweep.toml").write_text(SWEEP)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-m", "convtrain.cli", "sweep", "sweep.toml", "--workers", "2",
                           "--force-workers",  # two workers on any machine
                           "--tracking-uri", uri, "--quiet"], cwd=workdir, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 0, done.stdout + done.stderr

    study = optuna.load_study(study_name="digits-grid", storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = study.get_trials()
    assert Counter(t.state.name for t in trials) == {"COMPLETE": 4}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    workers = {t.system_attrs["convtrain.owner"]["pid"] for t in trials}
    assert len(workers) == 2
    parents, children = runs_of(uri)
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.params["threads"] for c in children} == {str(max(1, os.cpu_count() // 2))}


BAD_FILES = {
    "unknown parameter": ("[space]\nfilterz = [[4], [8]]\n", "did you mean 'filters'"),
    "empty range": ("[space]\nlr = {low = 0.1, high = 0.1}\n", "empty range"),
    "unknown method": ("[sweep]\nmethod = \"bayes\"\n[space]\nlr = [0.1]\n", "method: got 'bayes'"),
    "grid over a range": ("[sweep]\nmethod = \"grid\"\n[space]\nlr = {low = 0.01, high = 0.1}\n", "needs a finite set"),
    "empty space": ("[sweep]\nmethod = \"grid\"\n", "[space] is empty"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_sweep_files_fail_with_one_line_and_no_traceback(workdir, case):
    text, message = BAD_FILES[case]
    (workdir / "bad.toml").write_text(text)
    result = cli("sweep", "bad.toml")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


def test_a_missing_sweep_file_and_a_bad_storage_url_are_one_line_errors(workdir):
    result = cli("sweep", "nowhere.toml")
    assert result.exit_code != 0 and result.output.count("\n") == 1 and "not found" in result.output
    (workdir / "sweep.toml").write_text(SWEEP)
    result = cli("sweep", "sweep.toml", "--storage", "nosuchdb://x", "--tracking-uri",
                 f"sqlite:///{workdir / 'mlflow.db'}")
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    assert "study storage nosuchdb://x" in result.output


def test_a_trial_stopped_mid_fit_is_continued_from_its_checkpoint_in_the_same_child_run(workdir):
    """Ctrl-C in the second epoch of a trial; the re-run continues that trial's checkpoint
    (same folder, same MLflow child run, every epoch logged once) instead of starting over."""
    from convtrain.errors import TrainingInterrupted
    from convtrain.pipeline.fit import fit as real_fit
    from convtrain.sweep.launcher import run_sweep
    from convtrain.training.callbacks import Callback

    (workdir / "sweep.toml").write_text(SWEEP.replace("epochs = 2", "epochs = 3"))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    seen = []

    class CtrlCInEpochTwo(Callback):
        def on_batch_end(self, trainer, step, logs):
            if trainer.epoch == 1:  # epoch 1 is done and checkpointed
                raise KeyboardInterrupt

    def fit(config, **kwargs):
        seen.append((config.out, kwargs.get("resume")))
        if len(seen) == 2:  # the second trial
            kwargs["callbacks"] = [*kwargs["callbacks"], CtrlCInEpochTwo()]
        return real_fit(config, **kwargs)

    with pytest.raises(TrainingInterrupted):
        run_sweep("sweep.toml", tracking_uri=uri, quiet=True, fit=fit)
    stopped_out = seen[1][0]
    assert (Path(stopped_out) / "checkpoint.npz").is_file()

    outcome = run_sweep("sweep.toml", tracking_uri=uri, quiet=True, fit=fit)
    resumed = [(out, resume) for out, resume in seen[2:] if resume is not None]
    assert len(resumed) == 1 and resumed[0][0] == stopped_out and Path(resumed[0][1]) == Path(stopped_out)
    assert Counter(r.state for r in outcome.rows) == {"COMPLETE": 4, "FAIL": 1}

    _, children = runs_of(uri)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)  # no fifth run
    client = mlflow.MlflowClient(uri)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert sorted(steps) == [1, 2, 3]


def test_more_workers_than_cores_is_one_line_and_starts_nothing(workdir):
    (workdir / "sweep.toml").write_text(SWEEP)
    result = cli("sweep", "sweep.toml", "--workers", "500")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--workers: got 500" in lines[0] and "--force-workers" in lines[0], result.output
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()
