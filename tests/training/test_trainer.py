"""Trainer: learning digits, determinism, exact resume, divergence, early stopping, callbacks."""

import shutil
import time

import numpy as np
import pytest

from convtrain.config import FitConfig
from convtrain.errors import CheckpointError, ConfigError, TrainingDiverged, TrainingInterrupted
from convtrain.nn.network import Network
from convtrain.training.callbacks import Callback, EarlyStopping
from convtrain.training.run_folder import CHECKPOINT_FILE
from convtrain.training.trainer import History, Trainer
from tests.support.stops import StopAt

EPOCH_KEYS = {"train_loss", "train_cost", "train_accuracy", "train_balanced_accuracy", "val_loss", "val_cost",
              "val_accuracy", "val_balanced_accuracy", "learning_rate", "epoch_seconds", "images_per_second"}


def make_trainer(config, callbacks=(), checkpoint_dir=None, input_shape=(1, 8, 8)):
    network = Network.from_config(config, input_shape, 10)
    return Trainer.from_config(network, config, callbacks=callbacks, checkpoint_dir=checkpoint_dir)


def weights(trainer):
    return {k: v.copy() for k, v in trainer.network.parameters().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def without_timings(history):
    return [{k: v for k, v in e.items() if k not in ("epoch_seconds", "images_per_second")} for e in history.epochs]


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append(("fit_start",))

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(("epoch_start", epoch))

    def on_batch_end(self, trainer, step, logs):
        self.calls.append(("batch_end", step, dict(logs)))

    def on_epoch_end(self, trainer, epoch, logs):
        self.calls.append(("epoch_end", epoch, dict(logs)))

    def on_checkpoint(self, trainer, path):
        self.calls.append(("checkpoint", path))

    def on_fit_end(self, trainer, history):
        self.calls.append(("fit_end",))

    def on_exception(self, trainer, exc):
        self.calls.append(("exception", type(exc).__name__))



def test_default_config_learns_digits_quickly(digits):
    config = FitConfig()
    trainer = make_trainer(config)
    started = time.perf_counter()
    history = trainer.fit(*digits)
    seconds = time.perf_counter() - started
    assert history.epochs[-1]["val_accuracy"] >= 0.95, history.epochs[-1]
    assert len(history.epochs) == config.epochs
    assert seconds < 60, f"digits took {seconds:.1f} s"  # about 2 s on an idle 2-core machine


def test_same_seed_same_weights_other_seed_other_weights(small):
    config = FitConfig(epochs=2, augment=True)
    a, b = make_trainer(config), make_trainer(config)
    a.fit(*small)
    b.fit(*small)
    assert_same_weights(weights(a), weights(b))
    c = make_trainer(FitConfig(epochs=2, augment=True, seed=1))
    c.fit(*small)
    assert not np.array_equal(weights(a)["conv1.weight"], weights(c)["conv1.weight"])


@pytest.mark.parametrize("train_metrics", ["running", "full"])
@pytest.mark.parametrize("stop_step", [7, 10])  # mid-epoch 2, and the end of epoch 2
def test_resume_after_interruption_equals_uninterrupted_run_bit_for_bit(small, tmp_path, stop_step, train_metrics):
    config = FitConfig(epochs=4, nesterov=True, schedule="cosine", eta_min=0.001, augment=True, patience=10,
                       train_metrics=train_metrics)
    reference = make_trainer(config, checkpoint_dir=tmp_path / "reference")
    reference.fit(*small)

    interrupted = make_trainer(config, callbacks=[StopAt(stop_step)], checkpoint_dir=tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as info:
        interrupted.fit(*small)
    path = info.value.checkpoint
    assert path == tmp_path / "run" / CHECKPOINT_FILE and path.exists()
    assert interrupted.step == stop_step

    # a new process would rebuild everything from the config, then resume
    resumed = make_trainer(config, checkpoint_dir=tmp_path / "run")
    resumed.resume(path)
    assert resumed.step == stop_step
    history = resumed.fit(*small)
    assert resumed.step == reference.step == 20
    assert_same_weights(weights(resumed), weights(reference))
    assert_same_weights(resumed.optimizer.velocities, reference.optimizer.velocities)
    assert without_timings(history) == without_timings(reference.history)


def test_resume_from_an_earlier_epoch_checkpoint(small, tmp_path):
    class KeepEpoch1(Callback):
        def on_checkpoint(self, trainer, path):
            if trainer.epoch == 1:
                shutil.copy(path, tmp_path / "epoch1.npz")

    config = FitConfig(epochs=3)
    reference = make_trainer(config, callbacks=[KeepEpoch1()], checkpoint_dir=tmp_path / "ckpt")
    reference.fit(*small)
    resumed = make_trainer(config)
    resumed.resume(tmp_path / "epoch1.npz")
    assert resumed.epoch == 1 and len(resumed.history.epochs) == 1
    resumed.fit(*small)
    assert_same_weights(weights(resumed), weights(reference))


def test_checkpoint_is_a_loadable_model_with_the_config(small, tmp_path):
    config = FitConfig(epochs=1)
    trainer = make_trainer(config, checkpoint_dir=tmp_path)
    trainer.fit(*small)
    network = Network.load(tmp_path / CHECKPOINT_FILE)
    assert_same_weights(network.parameters(), weights(trainer))
    with np.load(tmp_path / CHECKPOINT_FILE, allow_pickle=False) as archive:
        assert FitConfig.from_dict(__import__("tomllib").loads(str(archive["config"]))) == config


def test_nan_in_the_data_stops_with_epoch_batch_and_last_good_checkpoint(small, tmp_path):
    x_train, y_train, x_val, y_val = small
    x_train = x_train.copy()

    class CorruptAfterEpoch1(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1:
                x_train[123, 0, 4, 4] = np.nan

    trainer = make_trainer(FitConfig(epochs=3), callbacks=[CorruptAfterEpoch1()], checkpoint_dir=tmp_path)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit(x_train, y_train, x_val, y_val)
    error = info.value
    assert error.epoch == 2 and 1 <= error.batch <= 5
    assert f"epoch 2, batch {error.batch}/5" in str(error)
    assert error.checkpoint == tmp_path / CHECKPOINT_FILE
    assert str(error.checkpoint) in str(error) and "\n" not in str(error)
    saved = Network.load(error.checkpoint)  # still the finite weights of epoch 1
    assert all(np.isfinite(v).all() for v in saved.parameters().values())
    assert all(np.isfinite(v).all() for v in trainer.network.parameters().values())


def test_nan_from_the_start_says_no_checkpoint_exists(small):
    x_train, y_train, x_val, y_val = small
    x_train = x_train.copy()
    x_train[0, 0, 0, 0] = np.inf
    recorder = Recorder()
    trainer = make_trainer(FitConfig(epochs=1), callbacks=[recorder])
    with pytest.raises(TrainingDiverged, match=r"epoch 1, batch \d/5 .*no checkpoint was written"):
        trainer.fit(x_train, y_train, x_val, y_val)
    assert recorder.calls[-1] == ("exception", "TrainingDiverged")


def test_non_finite_weights_are_never_written(small, tmp_path):
    trainer = make_trainer(FitConfig(epochs=1), checkpoint_dir=tmp_path)
    trainer.fit(*small)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    trainer.network.parameters()["fc.bias"][0] = np.nan
    with pytest.raises(TrainingDiverged, match="fc.bias is not finite"):
        trainer.save_checkpoint()
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before


def test_request_stop_without_checkpoint_dir_still_stops(small):
    trainer = make_trainer(FitConfig(epochs=2), callbacks=[StopAt(3)])
    with pytest.raises(TrainingInterrupted, match="epoch 1, batch 3/5") as info:
        trainer.fit(*small)
    assert info.value.checkpoint is None


def test_callbacks_see_every_hook_with_the_documented_logs(small, tmp_path):
    recorder = Recorder()
    make_trainer(FitConfig(epochs=2), callbacks=[recorder], checkpoint_dir=tmp_path).fit(*small)
    kinds = [c[0] for c in recorder.calls]
    assert kinds == (["fit_start"] + (["epoch_start"] + ["batch_end"] * 5 + ["epoch_end", "checkpoint"]) * 2
                     + ["fit_end"])
    steps = [c[1] for c in recorder.calls if c[0] == "batch_end"]
    assert steps == list(range(1, 11))
    batch_logs = [c[2] for c in recorder.calls if c[0] == "batch_end"]
    assert set(batch_logs[0]) == {"loss", "cost", "accuracy", "lr", "batch_size"}
    assert [b["batch_size"] for b in batch_logs[:5]] == [64, 64, 64, 64, 44]
    epoch_logs = [c[2] for c in recorder.calls if c[0] == "epoch_end"]
    assert set(epoch_logs[0]) == EPOCH_KEYS


def test_without_validation_set_val_metrics_are_absent(small):
    x_train, y_train, _, _ = small
    history = make_trainer(FitConfig(epochs=1)).fit(x_train, y_train)
    assert set(history.epochs[0]) == {"epoch"} | {k for k in EPOCH_KEYS if not k.startswith("val_")}
    assert history.best_epoch == 1
    with pytest.raises(ConfigError, match="needs a validation set"):
        make_trainer(FitConfig(epochs=1, patience=2)).fit(x_train, y_train)


def test_early_stopping_stops_and_restores_the_best_weights(small):
    snapshots = {}

    class Snapshot(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            snapshots[epoch] = weights(trainer)

    # A large learning rate makes the validation loss wander, so patience 1 triggers early.
    config = FitConfig(epochs=30, lr=0.3, patience=1, monitor="val_accuracy")
    trainer = make_trainer(config, callbacks=[Snapshot()])
    history = trainer.fit(*small)
    assert trainer.stop_training and trainer.epoch < 30
    best = history.best_epoch
    assert best == trainer.epoch - 1
    assert_same_weights(weights(trainer), snapshots[best])


def test_early_stopping_logic():
    class FakeTrainer:
        stop_training = False
        has_validation = True

    stopper = EarlyStopping(monitor="val_loss", patience=2, restore_best=False)
    trainer = FakeTrainer()
    for epoch, value in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.71], start=1):
        stopper.on_epoch_end(trainer, epoch, {"val_loss": value})
        assert trainer.stop_training == (epoch == 6)
    assert stopper.best == 0.7 and stopper.best_epoch == 4
    restored = EarlyStopping(monitor="val_loss", patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()


def test_cyclic_schedule_with_cycles_sets_the_number_of_updates(small):
    config = FitConfig(schedule="cyclic", n_s=4, cycles=1, eta_min=0.001, eta_max=0.05, epochs=1)
    recorder = Recorder()
    trainer = make_trainer(config, callbacks=[recorder])
    history = trainer.fit(*small)
    lrs = [c[2]["lr"] for c in recorder.calls if c[0] == "batch_end"]
    assert trainer.step == 8 and len(history.epochs) == 2
    np.testing.assert_allclose(lrs, [0.001 + f * 0.049 for f in (0, .25, .5, .75, 1, .75, .5, .25)])


def test_balanced_epochs_draw_equally_from_every_class(small):
    x_train, y_train, x_val, y_val = small
    keep = (y_train != 3) | (np.arange(len(y_train)) % 4 == 0)  # make class 3 rare
    recorder = Recorder()
    trainer = make_trainer(FitConfig(epochs=1, balanced=True), callbacks=[recorder])
    trainer.fit(x_train[keep], y_train[keep], x_val, y_val)
    smallest = np.bincount(y_train[keep]).min()
    assert sum(c[2]["batch_size"] for c in recorder.calls if c[0] == "batch_end") == 10 * smallest


def test_resume_refuses_foreign_files(small, tmp_path):
    trainer = make_trainer(FitConfig(epochs=1), checkpoint_dir=tmp_path)
    trainer.fit(*small)
    other = make_trainer(FitConfig(epochs=1, filters=[8, 8]))
    with pytest.raises(CheckpointError, match="different network"):
        other.resume(tmp_path / CHECKPOINT_FILE)
    model = trainer.network.save(tmp_path / "model.npz")
    with pytest.raises(CheckpointError, match="saved model, not a training checkpoint"):
        make_trainer(FitConfig(epochs=1)).resume(model)


def test_history_round_trip_and_best():
    history = History(monitor="val_accuracy")
    for epoch, acc in enumerate([0.5, 0.9, 0.8], start=1):
        history.append(epoch, {"val_accuracy": acc, "train_loss": 1.0 / epoch})
    assert history.best_epoch == 2 and history.best["val_accuracy"] == 0.9
    again = History.from_dict(history.to_dict())
    assert again.epochs == history.epochs and again.best_epoch == 2


def test_float64_training_with_a_training_evaluation_subset(small):
    from convtrain.training.metrics import balanced_accuracy
    from convtrain.nn.optim import SGD, make_schedule

    x_train, y_train, x_val, y_val = small
    network = Network.build(input_shape=(1, 8, 8), num_classes=10, filters=[4], dtype="float64")
    trainer = Trainer(network, SGD(network.parameters(), 0.05, 0.9), make_schedule(kind="constant", lr=0.05),
                      epochs=1, batch_size=50, l2=0.0, train_eval_limit=120)
    history = trainer.fit(x_train, y_train, x_val, y_val)
    assert network.parameters()["conv1.weight"].dtype == np.float64
    rows = np.sort(np.random.default_rng([0, 2]).choice(300, 120, replace=False))  # the documented subset
    predictions = network.forward(x_train[rows].astype(np.float64)).argmax(axis=1)
    assert history.epochs[0]["train_accuracy"] == pytest.approx(np.mean(predictions == y_train[rows]))
    assert history.epochs[0]["train_balanced_accuracy"] == pytest.approx(
        balanced_accuracy(y_train[rows], predictions, 10))


def test_fit_refuses_data_that_does_not_fit_the_network(small):
    from convtrain.errors import DataError

    x_train, y_train, _, _ = small
    trainer = make_trainer(FitConfig(epochs=1))
    with pytest.raises(DataError, match=r"expected \(N, 1, 8, 8\)"):
        trainer.fit(x_train[:, :, :7], y_train)
    with pytest.raises(DataError, match=r"labels must be integers in \[0, 10\)"):
        trainer.fit(x_train, y_train + 5)
    with pytest.raises(DataError, match="labels have shape"):
        trainer.fit(x_train, y_train[:-1])


def test_progress_takes_the_epoch_length_from_the_trainer(small):
    import io
    import math

    from rich.console import Console

    from convtrain.training.progress import ProgressCallback

    x_train, y_train, x_val, y_val = small
    keep = (y_train != 3) | (np.arange(len(y_train)) % 4 == 0)  # a balanced epoch is 10 x class 3's count
    progress = ProgressCallback(console=Console(file=io.StringIO()), quiet=True)
    trainer = make_trainer(FitConfig(epochs=1, balanced=True, batch_size=16), callbacks=[progress])
    trainer.fit(x_train[keep], y_train[keep], x_val, y_val)
    smallest = np.bincount(y_train[keep]).min()
    assert progress.steps_per_epoch == trainer.steps_per_epoch == math.ceil(10 * smallest / 16) == trainer.step
    assert progress.epochs == 1


class BatchLogs(Callback):
    def __init__(self):
        self.batches = []

    def on_batch_end(self, trainer, step, logs):
        self.batches.append(logs)


def test_running_training_metrics_are_the_mean_over_the_epochs_batches(small):
    x_train, y_train, x_val, y_val = small
    batches = BatchLogs()
    trainer = make_trainer(FitConfig(epochs=2, batch_size=64, l2=1e-3), callbacks=[batches])
    history = trainer.fit(x_train, y_train, x_val, y_val)
    per_epoch = len(batches.batches) // 2
    for epoch, logs in enumerate(history.epochs):
        seen = batches.batches[epoch * per_epoch:(epoch + 1) * per_epoch]
        n = sum(b["batch_size"] for b in seen)
        for key in ("loss", "cost", "accuracy"):
            mean = sum(b[key] * b["batch_size"] for b in seen) / n
            assert logs[f"train_{key}"] == pytest.approx(mean, rel=1e-6), key
        assert 0 <= logs["train_balanced_accuracy"] <= 1 and "val_loss" in logs


def test_full_training_metrics_re_score_the_training_set_in_eval_mode(small):
    from convtrain.training.metrics import evaluate_network

    x_train, y_train, x_val, y_val = small
    trainer = make_trainer(FitConfig(epochs=1, train_metrics="full"))
    history = trainer.fit(x_train, y_train, x_val, y_val)
    assert history.epochs[0]["train_loss"] == pytest.approx(
        evaluate_network(trainer.network, x_train, y_train)["loss"], rel=1e-12)


def test_validation_predictions_are_handed_back_only_for_the_very_model_that_made_them(small):
    x_train, y_train, x_val, y_val = small
    trainer = make_trainer(FitConfig(epochs=2))
    trainer.fit(x_train, y_train, x_val, y_val)
    kept = trainer.scored_validation.predictions_for(trainer.network)
    assert kept is not None
    assert np.array_equal(kept, trainer.evaluate(x_val, y_val, return_predictions=True)[1])
    # one bit of one weight changed: not the model that was scored
    weight = next(iter(trainer.network.parameters().values()))
    original = weight.flat[0]
    weight.flat[0] = np.nextafter(original, np.inf, dtype=weight.dtype)
    assert trainer.scored_validation.predictions_for(trainer.network) is None
    weight.flat[0] = original
    assert trainer.scored_validation.predictions_for(trainer.network) is not None
    # nothing scored, nothing handed back
    assert (lambda t: t.scored_validation.predictions_for(t.network))(make_trainer(FitConfig(epochs=1))) is None


def test_restored_best_weights_reuse_the_best_epochs_validation_predictions(small):
    x_train, y_train, x_val, y_val = small
    trainer = make_trainer(FitConfig(epochs=30, lr=0.3, patience=1, monitor="val_accuracy"))
    history = trainer.fit(x_train, y_train, x_val, y_val)
    assert history.best_epoch != trainer.epoch  # the weights were put back
    assert len(trainer.scored_validation) <= 2
    kept = trainer.scored_validation.predictions_for(trainer.network)
    assert kept is not None
    assert np.array_equal(kept, trainer.evaluate(x_val, y_val, return_predictions=True)[1])


def test_batch_norm_statistics_are_part_of_the_scored_model(small):
    x_train, y_train, x_val, y_val = small
    trainer = make_trainer(FitConfig(epochs=1, batch_norm=True))
    trainer.fit(x_train, y_train, x_val, y_val)
    assert trainer.scored_validation.predictions_for(trainer.network) is not None
    statistics = next(iter(trainer.network.buffers().values()))
    statistics += 1.0
    assert trainer.scored_validation.predictions_for(trainer.network) is None
