"""What a reviewer meets on a fit's MLflow run page: the saved model's metrics as the run's
latest values, the description, the named logged model with its metrics, registered versions
(SQLite and a real server), and the tags of a run that failed or was interrupted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convtrain import FitConfig, fit
from convtrain.tracking.description import NOTE_TAG
from tests.tracking.test_tracking import MlflowServer

# lr 0.3 makes the val loss jump about: early stopping ends this fit at epoch 6 and restores epoch 4
STOPS_EARLY = dict(limit=400, filters=[4], epochs=12, batch_size=32, patience=2, lr=0.3)


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-runpage")).launch()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def client_for(uri):
    import mlflow

    return mlflow.MlflowClient(uri)


@pytest.fixture
def digits_npz(tmp_path):
    """digits with a test split (the validation part of the built-in one), as a user's .npz."""
    from convtrain.data import load_dataset

    d = load_dataset("digits")
    path = tmp_path / "digits.npz"
    np.savez(path, x=d.x_train[:400], y=d.y_train[:400], x_test=d.x_val, y_test=d.y_val)
    return path, len(d.x_val)


def test_the_run_holds_the_restored_model_and_describes_itself(tmp_path, digits_npz):
    path, n_test = digits_npz
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = fit(FitConfig(**{**STOPS_EARLY, "limit": None}, data="npz", data_path=str(path), run_name="early",
                           tracking_uri=uri), progress=None)
    history = result.history.epochs
    best, last = result.metrics["best_epoch"], history[-1]["epoch"]
    assert best < last and result.metrics["stopped_epoch"] == last  # the case this test is about

    client = client_for(uri)
    run = client.get_run(result.run_id)
    latest = run.data.metrics
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy"):
        assert latest[key] == result.metrics[key] == history[best - 1][key]
        values = {}
        for m in client.get_metric_history(result.run_id, key):
            values.setdefault(m.step, []).append(m.value)
        # the per-epoch history stays; the restored value comes one step past the last epoch
        assert values == {**{e["epoch"]: [e[key]] for e in history}, last + 1: [history[best - 1][key]]}
    assert latest["best_epoch"] == best and latest["stopped_epoch"] == last
    assert latest["test_accuracy"] == result.metrics["test_accuracy"]

    text = run.data.tags[NOTE_TAG]
    assert "`npz`" in text and f"train 360, validation 40, test {n_test:,}" in text
    from convtrain.tracking.description import architecture_rows

    for name, kind, shape, count in architecture_rows(result.network):
        assert f"| {name} | {kind} | {shape} | {count:,} |" in text
    assert "SGD, lr 0.3, momentum 0.9, L2 0.0001, batch 32" in text and "constant lr 0.3" in text
    assert f"stopped at epoch {last}; the saved model is epoch {best}'s" in text
    assert f"| accuracy | {result.metrics['train_accuracy']:.4f} | {result.metrics['val_accuracy']:.4f} | " \
           f"{result.metrics['test_accuracy']:.4f} |" in text
    assert "images/s" in text and "wall time" in text
    assert f"convtrain fit --config {result.out_dir}/config.toml --out {result.out_dir}-again" in text
    # early stopping ended it: resuming trains no further epoch, so a new fit is offered instead
    assert f"convtrain fit --resume {result.run_id}" not in text
    assert f"convtrain fit --config {result.out_dir}/config.toml --epochs N --out {result.out_dir}-longer" in text
    experiment = client.get_experiment(run.info.experiment_id)
    assert "convtrain experiment `convtrain`" in experiment.tags[NOTE_TAG]

    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.name == "early" and model.source_run_id == result.run_id
    on_model = {m.key: m.value for m in model.metrics}
    assert on_model["val_loss"] == result.metrics["val_loss"] and on_model["test_loss"] == result.metrics["test_loss"]
    assert on_model["best_epoch"] == best

    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        predicted = mlflow.pyfunc.load_model(run.data.tags["convtrain.model_uri"]).predict(path_images(path))
    assert list(predicted.columns) == [str(c) for c in result.network.class_names]
    np.testing.assert_allclose(predicted.to_numpy(), result.network.predict_proba(path_images(path)), rtol=1e-6)


def path_images(path):
    return np.load(path)["x_test"][:3]


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_register_model_adds_a_version_per_fit(tmp_path, request, where):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if where == "sqlite" else request.getfixturevalue("server").url
    experiment = f"register-{where}"
    runs = [fit(FitConfig(limit=300, filters=[4], epochs=1, run_name=f"reg-{n}", experiment=experiment,
                          tracking_uri=uri, register_model="digits-net", out=str(tmp_path / f"r{n}")),
                progress=None) for n in (1, 2)]
    assert [r.registered_model for r in runs] == [f"digits-net version {v}" for v in (1, 2)]
    client = client_for(uri)
    versions = sorted(client.search_model_versions("name = 'digits-net'"), key=lambda v: int(v.version))
    mine = [v for v in versions if v.run_id in {r.run_id for r in runs}]
    assert [v.run_id for v in mine] == [r.run_id for r in runs]
    assert int(mine[1].version) == int(mine[0].version) + 1
    for version, run in zip(mine, runs):
        (model,) = client.search_logged_models([run.experiment_id], filter_string=f"source_run_id = '{run.run_id}'")
        assert version.source == f"models:/{model.model_id}"
        listed = json.loads(model.tags["mlflow.modelVersions"])  # what the Models table shows
        assert [(e["name"], str(e["version"])) for e in listed] == [("digits-net", str(version.version))]
        assert "registered as `digits-net version" in client.get_run(run.run_id).data.tags[NOTE_TAG]
        # linking the metrics to the model added no second value to the run's one-epoch history
        assert [m.step for m in client.get_metric_history(run.run_id, "val_loss")] == [1]
        assert len(client.get_metric_history(run.run_id, "best_epoch")) == 1




@pytest.mark.parametrize("error, status, tag", [(RuntimeError("disk on fire"), "FAILED", "convtrain.error"),
                                                (KeyboardInterrupt(), "KILLED", "convtrain.note")])
def test_a_resumed_run_that_finishes_drops_the_tags_of_its_failed_attempt(tmp_path, error, status, tag):
    from convtrain.errors import TrainingInterrupted
    from convtrain.training.callbacks import Callback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = FitConfig(limit=300, filters=[4], epochs=3, run_name="flaky", tracking_uri=uri, out=str(tmp_path / "f"))
    class Stopper(Callback):
        key = "stopper"

        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 2:
                raise error

    with pytest.raises((RuntimeError, KeyboardInterrupt, TrainingInterrupted)):
        fit(config, callbacks=[Stopper()], progress=None)
    client = client_for(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    assert run.info.status == status
    if status == "KILLED":  # the same note, with the resume command, as a run whose process was killed
        assert f"continue it with convtrain fit --resume {run.info.run_id}" in run.data.tags[tag]
    else:
        assert "disk on fire" in run.data.tags[tag]

    fit(config, resume=tmp_path / "f", progress=None)
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and tag not in finished.data.tags


def test_the_architecture_rows_name_the_layers_that_run_winograd():
    from convtrain.nn.network import Network
    from convtrain.tracking.description import architecture_rows

    network = Network.build(input_shape=(3, 32, 32), num_classes=10, filters=[32, 64], kernel_sizes=[5, 3])
    assert network.set_conv_algo("auto") == {"conv1": "im2col", "conv2": "winograd"}
    kinds = {name: kind for name, kind, _, _ in architecture_rows(network)}
    assert kinds["conv2"] == "Conv2D, 64 filters 3x3, winograd" and kinds["conv1"] == "Conv2D, 32 filters 5x5"
    network.set_conv_algo("im2col")
    assert "winograd" not in " ".join(kind for _, kind, _, _ in architecture_rows(network))


def test_the_architecture_rows_show_a_residual_blocks_layers_then_its_sum():
    from convtrain.nn.layer_specs import BatchNorm, Conv2D, GlobalAvgPool, ReLU, Residual
    from convtrain.nn.network import Network
    from convtrain.tracking.description import architecture_rows

    network = Network([Conv2D(4, 3, padding=1), ReLU(),
                       Residual([Conv2D(8, 3, stride=2, padding=1, bias=False), BatchNorm(), ReLU(),
                                 Conv2D(8, 3, padding=1, bias=False), BatchNorm()]), GlobalAvgPool()],
                      input_shape=(3, 8, 8), num_classes=5)
    rows = architecture_rows(network)
    names = [name for name, *_ in rows]
    assert names == ["input", "conv1", "conv1_relu", "res1.conv1", "res1.bn1", "res1.conv1_relu", "res1.conv2",
                     "res1.bn2", "res1.shortcut.conv", "res1.shortcut.bn", "res1", "gap", "fc"]
    assert rows[names.index("res1")][1:] == ("Residual: ReLU(layers + 1x1 conv + BN shortcut)", "8x4x4", 0)
    assert sum(count for *_, count in rows) == sum(p.size for p in network.parameters().values())


def test_the_pyfunc_model_of_a_residual_network_predicts_its_probabilities(tmp_path):
    from types import SimpleNamespace

    import numpy as np

    from convtrain.nn.layer_specs import BatchNorm, Conv2D, Dropout, GlobalAvgPool, ReLU, Residual
    from convtrain.nn.network import Network
    from convtrain.tracking.model import NETWORK_ARTIFACT, ConvtrainModel

    network = Network([Conv2D(4, 3, padding=1), ReLU(), Residual([Conv2D(8, 3, stride=2, padding=1), BatchNorm()]),
                       GlobalAvgPool(), Dropout(0.5)], input_shape=(1, 8, 8), num_classes=3)
    network.class_names = ["a", "b", "c"]
    network.save(tmp_path / "model.npz")
    model = ConvtrainModel()
    model.load_context(SimpleNamespace(artifacts={NETWORK_ARTIFACT: str(tmp_path / "model.npz")}))
    images = np.random.default_rng(0).integers(0, 255, (5, 1, 8, 8)).astype(np.uint8)
    frame = model.predict(None, images)
    assert list(frame.columns) == ["a", "b", "c"]
    assert np.array_equal(frame.to_numpy(), network.predict_proba(images))


def test_the_description_names_the_optimizer_that_trained():
    from convtrain.tracking.description import optimizer_text

    adamw = optimizer_text(FitConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, label_smoothing=0.1))
    assert adamw.startswith("AdamW, lr 0.001, betas (0.9, 0.999), weight decay 0.05")
    assert "label smoothing 0.1" in adamw and "SGD" not in adamw and "momentum" not in adamw
    assert optimizer_text(FitConfig()).startswith("SGD, lr 0.05, momentum 0.9")
