"""Resuming with another length re-plans a cosine schedule from the resume point: the rate
never jumps back up, and a killed extension resumes bit for bit."""

import numpy as np
import pytest

from convtrain.config import FitConfig
from convtrain.errors import TrainingInterrupted
from convtrain.training.callbacks import Callback
from convtrain.training.run_folder import CHECKPOINT_FILE
from tests.support.stops import StopAt
from tests.training.test_trainer import assert_same_weights, make_trainer, weights


class Rates(Callback):
    def __init__(self):
        self.rates = []

    def on_batch_end(self, trainer, step, logs):
        self.rates.append(logs["lr"])


def finished_fit(small, folder, epochs, **settings):
    config = FitConfig(epochs=epochs, schedule="cosine", lr=0.05, eta_min=1e-4, **settings)
    rates = Rates()
    trainer = make_trainer(config, callbacks=[rates], checkpoint_dir=folder)
    trainer.fit(*small)
    return trainer, rates.rates


def resumed_fit(small, checkpoint, epochs, folder, callbacks=()):
    config = FitConfig(epochs=epochs, schedule="cosine", lr=0.05, eta_min=1e-4)
    rates = Rates()
    trainer = make_trainer(config, callbacks=[rates, *callbacks], checkpoint_dir=folder)
    trainer.resume(checkpoint)
    return trainer, rates


def test_a_longer_resume_continues_down_from_the_rate_reached(small, tmp_path):
    # stopped half-way through a 4-epoch plan (5 updates an epoch), resumed for 8 epochs
    _, rates_before = finished_fit(small, tmp_path / "a", 4, patience=None)
    short = make_trainer(FitConfig(epochs=4, schedule="cosine", lr=0.05, eta_min=1e-4),
                         callbacks=[StopAt(10)], checkpoint_dir=tmp_path / "b")
    with pytest.raises(TrainingInterrupted):
        short.fit(*small)
    trainer, rates = resumed_fit(small, tmp_path / "b" / CHECKPOINT_FILE, 8, tmp_path / "b")
    trainer.fit(*small)
    after = rates.rates
    assert len(after) == 30 and trainer.step == 40
    # the first update after the resume uses the rate the 4-epoch plan had reached at update 10
    assert after[0] == pytest.approx(rates_before[10])
    assert all(b <= a for a, b in zip(after, after[1:])), after
    assert after[-1] == pytest.approx(1e-4, abs=1e-4) and after[-1] < after[0] / 10
    # the epoch-end rates the history shows never go back up either
    logged = [e["learning_rate"] for e in trainer.history.epochs]
    assert all(b <= a for a, b in zip(logged, logged[1:])), logged


def test_extending_a_finished_cosine_fit_stays_at_eta_min(small, tmp_path):
    done, rates_before = finished_fit(small, tmp_path, 2)
    trainer, rates = resumed_fit(small, tmp_path / CHECKPOINT_FILE, 4, tmp_path)
    trainer.fit(*small)
    last = done.schedule.lr(done.step - 1, 2)
    assert rates.rates and max(rates.rates) <= last  # seen before: 0.0001 -> 0.0076 at epoch 3
    assert trainer.history.epochs[2]["learning_rate"] <= trainer.history.epochs[1]["learning_rate"]


@pytest.mark.parametrize("stop_step", [13, 20])  # mid-epoch 3 and the end of epoch 4 of the extension
def test_a_killed_extension_resumes_bit_for_bit(small, tmp_path, stop_step):
    finished_fit(small, tmp_path / "first", 2)
    start = tmp_path / "first" / CHECKPOINT_FILE
    reference, reference_rates = resumed_fit(small, start, 6, tmp_path / "reference")
    reference.fit(*small)

    stopped, stopped_rates = resumed_fit(small, start, 6, tmp_path / "run", callbacks=[StopAt(stop_step)])
    with pytest.raises(TrainingInterrupted) as info:
        stopped.fit(*small)
    again, again_rates = resumed_fit(small, info.value.checkpoint, 6, tmp_path / "run")
    again.fit(*small)
    assert stopped_rates.rates + again_rates.rates == reference_rates.rates
    assert again.schedule.segments == reference.schedule.segments and len(again.schedule.segments) == 2
    assert_same_weights(weights(again), weights(reference))


def test_the_same_length_keeps_the_original_plan(small, tmp_path):
    config = FitConfig(epochs=4, schedule="cosine", lr=0.05, eta_min=1e-4)
    trainer = make_trainer(config, callbacks=[StopAt(7)], checkpoint_dir=tmp_path)
    with pytest.raises(TrainingInterrupted):
        trainer.fit(*small)
    resumed, _ = resumed_fit(small, tmp_path / CHECKPOINT_FILE, 4, tmp_path)
    resumed.fit(*small)
    assert resumed.schedule.segments == [(0, 20, 0.05)]
    assert np.isfinite(resumed.history.epochs[-1]["train_loss"])
