"""`convtrain.fit` as a library call: results, nested runs, run status on failure and on signals,
and the tracking callback's buffering when the store stops answering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from convtrain.config import FitConfig
from convtrain.pipeline.fit import fit
from convtrain.pipeline.resume import resolve_fit_config
from convtrain.training.callbacks import Callback
from convtrain.training.run_folder import RunFolder

pytestmark = pytest.mark.usefixtures("in_tmp_cwd")

TINY = dict(limit=300, filters=[4], epochs=2, batch_size=32)


def client(tmp_path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def digits_npz(tmp_path):
    """Digits as a user's .npz with its own test arrays, so the fit reports test_* metrics."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images[:, None].astype(np.float32), digits.target
    path = tmp_path / "digits.npz"
    np.savez(path, x=x[:1400], y=y[:1400], x_test=x[1400:], y_test=y[1400:],
             class_names=np.array([f"digit {d}" for d in range(10)]))
    return path


def test_fit_returns_everything_and_logs_test_metrics(tmp_path, digits_npz):
    config = FitConfig(data="npz", data_path=str(digits_npz), filters=[8], epochs=2, run_name="npz")
    result = fit(config, progress=None)
    assert result.out_dir == tmp_path / "runs" / "npz"
    assert result.model_path == result.out_dir / "model.npz"
    assert result.checkpoint_path == result.out_dir / "checkpoint.npz"
    assert result.config.out == str(result.out_dir)
    assert [e["epoch"] for e in result.history.epochs] == [1, 2]
    for key in ("test_loss", "test_accuracy", "test_balanced_accuracy", "val_accuracy", "best_epoch"):
        assert key in result.metrics
    assert result.metrics["test_accuracy"] > 0.5
    assert result.network.class_names[3] == "digit 3"

    run = client(tmp_path).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"npz-training", "npz-validation", "npz-test"}


def test_nested_child_run_with_tags(tmp_path):
    import mlflow

    c = client(tmp_path)
    experiment_id = c.create_experiment("sweeps")
    parent = c.create_run(experiment_id, run_name="parent").info.run_id
    result = fit(FitConfig(**TINY, experiment="sweeps"), parent_run_id=parent,
                     tags={"convtrain.sweep": "s1", "convtrain.trial": 3}, progress=None)
    child = c.get_run(result.run_id)
    assert child.info.experiment_id == experiment_id
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["convtrain.trial"] == "3"
    children = mlflow.MlflowClient(c.tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_id for r in children] == [result.run_id]


class Explode(Callback):
    def on_epoch_end(self, trainer, epoch, logs):
        raise RuntimeError("disk on fire")


def test_a_crash_marks_the_run_failed_with_the_message(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        fit(FitConfig(**TINY, run_name="crash"), callbacks=[Explode()], progress=None)
    run = client(tmp_path).search_runs([client(tmp_path).get_experiment_by_name("convtrain").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert "disk on fire" in run.data.tags["convtrain.error"]


def test_early_stopping_reports_the_best_epoch(tmp_path):
    result = fit(FitConfig(**{**TINY, "epochs": 8}, lr=0.5, patience=1, track=False), progress=None)
    best = result.history.best_epoch
    assert result.metrics["best_epoch"] == best
    assert result.metrics["val_loss"] == pytest.approx(result.history.best["val_loss"])
    assert result.run_id is None and not (tmp_path / "mlflow.db").exists()


def test_bad_data_fails_before_anything_is_written(tmp_path):
    from convtrain.errors import DataError

    with pytest.raises(DataError):
        fit(FitConfig(data="npz", data_path="missing.npz"), progress=None)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_resolve_fit_config_precedence(tmp_path):
    (tmp_path / "f.toml").write_text("[optim]\nepochs = 5\nlr = 0.2\n")
    config, checkpoint = resolve_fit_config(config_path=tmp_path / "f.toml", overrides={"lr": 0.3, "seed": None})
    assert (config.epochs, config.lr, config.seed, checkpoint) == (5, 0.3, 0, None)


def test_resume_from_out_dir_takes_the_saved_config_and_new_epochs(tmp_path):
    first = fit(FitConfig(**TINY, track=False, run_name="base"), progress=None)
    config, checkpoint = resolve_fit_config(overrides={"epochs": 3}, resume=str(first.out_dir))
    assert checkpoint == first.out_dir / "checkpoint.npz"
    assert (config.epochs, config.limit, config.filters) == (3, 300, [4])
    resumed = fit(config, resume=checkpoint, progress=None)
    assert [e["epoch"] for e in resumed.history.epochs] == [1, 2, 3]
    assert resumed.out_dir == first.out_dir


def test_conv_algo_is_a_run_setting_a_resume_may_change(tmp_path):
    from convtrain.nn.network import Network

    first = fit(FitConfig(**TINY, conv_algo="winograd", track=False, run_name="wg"), progress=None)
    assert first.network.conv_algos() == {"conv1": "winograd"}
    config, checkpoint = resolve_fit_config(overrides={"epochs": 3, "conv_algo": "im2col"},
                                            resume=str(first.out_dir))
    resumed = fit(config, resume=checkpoint, progress=None)
    assert resumed.network.conv_algos() == {"conv1": "im2col"}
    assert [e["epoch"] for e in resumed.history.epochs] == [1, 2, 3]
    # the saved model does not keep the algorithm: it loads and runs with im2col
    loaded = Network.load(resumed.model_path)
    x = np.random.default_rng(0).standard_normal((5, *loaded.input_shape)).astype(np.float32)
    im2col = loaded.forward(x)
    loaded.set_conv_algo("winograd")
    np.testing.assert_allclose(loaded.forward(x), im2col, rtol=1e-4, atol=1e-5)


def test_a_resumed_fit_leaves_the_run_one_model_holding_the_final_weights(tmp_path):
    """A fit resumed after (or while) logging its model must not add a second model to the run:
    `runs:/<id>/<name>` resolves to the first one the store lists."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    from convtrain.tracking.model import WEIGHTS_TAG, weights_digest

    store = client(tmp_path)
    first = fit(FitConfig(**TINY, run_name="once"), progress=None)
    experiment = store.get_run(first.run_id).info.experiment_id

    def models():
        found = store.search_logged_models([experiment], filter_string="name = 'once'")
        return [m for m in found if m.source_run_id == first.run_id]

    (logged,) = models()
    assert logged.status == LoggedModelStatus.READY

    # killed after logging the model, before FINISHED: the resume keeps the model it finds
    config, checkpoint = resolve_fit_config(resume=str(first.out_dir))
    again = fit(config, resume=checkpoint, progress=None)
    assert again.run_id == first.run_id
    assert [m.model_id for m in models()] == [logged.model_id]

    # killed while logging (a PENDING model is left), then resumed to train one epoch longer:
    # the stale and the half-logged model go, the new weights are the run's only model
    store.create_logged_model(experiment, name="once", source_run_id=first.run_id, model_type="convtrain")
    config, checkpoint = resolve_fit_config(overrides={"epochs": 3}, resume=str(first.out_dir))
    longer = fit(config, resume=checkpoint, progress=None)
    (final,) = models()
    assert final.model_id != logged.model_id and final.status == LoggedModelStatus.READY
    assert final.tags[WEIGHTS_TAG] == weights_digest(longer.network)
    x = np.random.default_rng(0).uniform(0, 16, (3, 1, 8, 8)).astype(np.float32)
    served = mlflow.pyfunc.load_model(f"runs:/{first.run_id}/once").predict(x)
    np.testing.assert_allclose(served.to_numpy(), longer.network.predict_proba(x), rtol=1e-6)
    assert store.get_run(first.run_id).info.status == "FINISHED"


# ---- the tracking callback when the store stops answering ----------------------------------------------

class FlakyClient:
    """Stands in for MlflowClient: log_batch fails while `down`."""

    def __init__(self):
        self.down = False
        self.metrics = []
        self.tags = {}
        self.status = None

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if self.down:
            raise ConnectionError("connection refused")
        self.metrics += list(metrics)
        self.tags.update({t.key: t.value for t in tags})

    def set_terminated(self, run_id, status):
        if self.down:
            raise ConnectionError("connection refused")
        self.status = status


def test_metrics_wait_in_the_buffer_until_the_store_answers_again(tmp_path, monkeypatch):
    from convtrain.tracking import metric_buffer
    from convtrain.tracking.callback import MLflowCallback
    from convtrain.tracking.tracked_run import TrackedRun

    monkeypatch.setattr(metric_buffer, "_RETRY_SECONDS", (0.0, 0.0))
    fake, notes = FlakyClient(), []
    run = TrackedRun(fake, "sqlite:///x.db", "run1", "1", notify=notes.append)
    callback = MLflowCallback(run, log_every=2)
    logs = {"train_loss": 1.0, "val_loss": 2.0, "learning_rate": 0.1}
    callback.on_epoch_end(None, 1, logs)
    fake.down = True
    callback.on_batch_end(None, 2, {"loss": 0.5})
    callback.on_epoch_end(None, 2, logs)
    assert run.metrics.pending and len(notes) == 1 and "stopped answering" in notes[0]
    fake.down = False
    callback.on_epoch_end(None, 3, logs)
    assert not run.metrics.pending and "answers again" in notes[-1]
    steps = sorted((m.key, m.step) for m in fake.metrics)
    assert steps == sorted([(k, e) for k in logs for e in (1, 2, 3)] + [("batch_loss", 2)])


def test_what_never_got_through_is_saved_and_reported(tmp_path):
    from convtrain.tracking.callback import MLflowCallback
    from convtrain.tracking.tracked_run import TrackedRun

    fake = FlakyClient()
    run = TrackedRun(fake, "sqlite:///x.db", "run1", "1", notify=lambda _: None)
    callback = MLflowCallback(run)
    fake.down = True
    callback.on_epoch_end(None, 1, {"train_loss": 1.0})
    problems = run.finish("FINISHED", out_dir=tmp_path)
    assert any("1 metric values could not be logged" in p for p in problems)
    # not marked FINISHED while metrics are missing: it stays open for `--resume` to complete
    assert any(f"stays open until the rest is sent: convtrain fit --resume {tmp_path}" in p for p in problems)
    assert fake.status is None
    saved = json.loads((RunFolder(tmp_path).unlogged).read_text())
    assert saved["metrics"] == [{"key": "train_loss", "value": 1.0, "step": 1, "timestamp": saved["metrics"][0]["timestamp"]}]


def test_a_sweeps_short_epochs_are_sent_together_and_what_waits_is_in_the_checkpoint(monkeypatch):
    from convtrain.tracking import metric_buffer
    from convtrain.tracking.callback import UNSENT_KEY, MLflowCallback
    from convtrain.tracking.tracked_run import TrackedRun

    clock = [100.0]
    monkeypatch.setattr(metric_buffer.time, "monotonic", lambda: clock[0])
    fake, sends = FlakyClient(), []
    fake.log_batch = lambda run_id, metrics=(), **_: sends.append([(m.key, m.step) for m in metrics])
    run = TrackedRun(fake, "sqlite:///x.db", "run1", "1", notify=lambda _: None)
    callback = MLflowCallback(run)
    with metric_buffer.epochs_sent_together(1.0):
        for epoch in (1, 2, 3):  # 0.3 s each: all within a second of the buffer's start
            clock[0] += 0.3
            callback.on_epoch_end(None, epoch, {"train_loss": 1.0 / epoch})
        assert sends == []
        unsent = callback.state_dict()[UNSENT_KEY]
        assert [(row["key"], row["step"]) for row in unsent] == [("train_loss", e) for e in (1, 2, 3)]
        clock[0] += 0.3  # a second since the buffer began: this epoch's end sends all four
        callback.on_epoch_end(None, 4, {"train_loss": 0.25})
        assert sends == [[("train_loss", e) for e in (1, 2, 3, 4)]]
        assert UNSENT_KEY not in callback.state_dict()
        clock[0] += 0.3
        callback.on_epoch_end(None, 5, {"train_loss": 0.2})
        assert len(sends) == 1  # waits again ...
        run.finish("FINISHED")
        assert sends[-1] == [("train_loss", 5)]  # ... and the end of the fit sends what waits
    clock[0] += 0.01  # outside the block each epoch is sent at its end
    callback.on_epoch_end(None, 6, {"train_loss": 0.1})
    assert sends[-1] == [("train_loss", 6)]


def test_resumed_callback_skips_what_the_run_already_holds():
    from convtrain.tracking.callback import MLflowCallback
    from convtrain.tracking.metric_buffer import MetricBuffer
    from convtrain.tracking.tracked_run import TrackedRun

    fake = FlakyClient()
    buffer = MetricBuffer(fake, "sqlite:///x.db", "run1", logged_epochs=2, logged_batch_step=20)
    callback = MLflowCallback(TrackedRun(fake, "sqlite:///x.db", "run1", "1", metrics=buffer), log_every=1)
    callback.on_batch_end(None, 20, {"loss": 1.0})
    callback.on_epoch_end(None, 2, {"train_loss": 1.0})
    assert fake.metrics == []
    callback.on_batch_end(None, 21, {"loss": 1.0})
    callback.on_epoch_end(None, 3, {"train_loss": 1.0})
    assert sorted((m.key, m.step) for m in fake.metrics) == [("batch_loss", 21), ("train_loss", 3)]


# ---- signals in a real process ------------------------------------------------------------------------

def test_sigterm_stops_at_a_batch_marks_killed_and_resume_finishes(tmp_path):
    env = {**os.environ, "COLUMNS": "120", "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    command = [sys.executable, "-m", "convtrain.cli", "fit", "--epochs", "400", "--filters", "4",
               "--limit", "400", "--run-name", "sig", "--threads", "1"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        for line in process.stdout:  # wait until training runs
            if line.startswith("epoch"):
                break
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0]
    assert f"convtrain fit --resume {tmp_path / 'runs' / 'sig'}" in lines[0]
    c = client(tmp_path)
    run = c.search_runs([c.get_experiment_by_name("convtrain").experiment_id])[0]
    assert run.info.status == "KILLED"
    logged = {m.step for m in c.get_metric_history(run.info.run_id, "train_loss")}

    from typer.testing import CliRunner

    from convtrain.cli import app

    result = CliRunner().invoke(app, ["fit", "--resume", run.info.run_id, "--epochs", str(max(logged) + 1),
                                      "--quiet"], env={"COLUMNS": "120", "MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 0, result.output
    finished = c.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, max(logged) + 2))


def test_run_tags_name_version_build_host_and_the_git_commit(tmp_path):
    import subprocess

    import convtrain
    from convtrain.tracking.runs import context_tags

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q",
                    "--allow-empty", "-m", "start"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    tags = context_tags({"extra": 1})
    assert tags["mlflow.source.git.commit"] == head
    assert tags["convtrain.version"] == convtrain.__version__
    assert tags["convtrain.build.openmp"] in ("true", "false")
    assert tags["convtrain.host"] and tags["extra"] == "1"


def test_without_a_test_split_the_final_evaluation_reuses_the_scored_validation(tmp_path, monkeypatch):
    from convtrain.pipeline import finish
    from convtrain.training.metrics import confusion_matrix
    from convtrain.training.trainer import Trainer

    final_scorings, seen = [], {}
    score = Trainer.evaluate

    def counting(self, x, y, **options):
        if options.get("normalize"):  # only the final evaluation scores raw images
            final_scorings.append(len(y))
        return score(self, x, y, **options)

    evaluation = finish._final_evaluation

    def checked(trainer, network, splits):
        seen["evaluation"] = evaluation(trainer, network, splits)
        seen["fresh"] = score(trainer, splits.x_val, splits.y_val, normalize=True, return_predictions=True)[1]
        seen["y"] = splits.y_val
        return seen["evaluation"]

    monkeypatch.setattr(Trainer, "evaluate", counting)
    monkeypatch.setattr(finish, "_final_evaluation", checked)
    fit(FitConfig(**TINY, track=False), progress=None)
    assert final_scorings == []
    assert seen["evaluation"].split == "val"
    assert np.array_equal(seen["evaluation"].confusion, confusion_matrix(seen["y"], seen["fresh"], 10))
