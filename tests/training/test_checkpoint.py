"""TrainingCheckpoint: the one reader and writer of checkpoint.npz; older files keep resuming.

data/checkpoint-a96555c.npz was written by the Trainer of commit a96555c (before the format had
one owner): digits' first 300 training and 100 validation images, standardized,
FitConfig(epochs=3, filters=[4], patience=5, augment=True, nesterov=True, log_every=2), class
names "0".."9", callbacks BatchLossRecorder(2) and one that called request_stop() after update 7,
so it stopped mid-epoch (epoch 2, 2 of 5 batches done) and holds EarlyStopping's best weights.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from convtrain.config import FitConfig
from convtrain.data.augment import AugmentPlan
from convtrain.errors import CheckpointError, TrainingInterrupted
from convtrain.nn.architecture import layer_architecture
from convtrain.nn.network import Network
from convtrain.nn.npz_files import read_npz
from convtrain.training.callbacks import BatchLossRecorder
from convtrain.training.checkpoint import TrainingCheckpoint
from convtrain.training.run_folder import CHECKPOINT_FILE
from convtrain.training.trainer import Trainer
from tests.support.stops import StopAt

LEGACY = Path(__file__).parent / "data" / "checkpoint-a96555c.npz"
LEGACY_CONFIG = FitConfig(epochs=3, filters=[4], patience=5, augment=True, nesterov=True, log_every=2)


def same_entry(key, ours, legacy) -> bool:
    """Entry for entry; the config TOML as the FitConfig it reads as (FitConfig gains fields, with
    defaults: an older file's config lacks them and reads as the same config)."""
    if key == "config":
        return (TrainingCheckpoint({"config": ours}).config() == TrainingCheckpoint({"config": legacy}).config())
    if key == "architecture":  # the template description then, the layer list it expands to now
        return layer_architecture(json.loads(str(ours))) == layer_architecture(json.loads(str(legacy)))
    return ours.dtype == legacy.dtype and np.array_equal(ours, legacy)


def legacy_trainer(callbacks=(), checkpoint_dir=None, config=LEGACY_CONFIG):
    network = Network.from_config(config, (1, 8, 8), 10)
    network.class_names = [str(c) for c in range(10)]
    trainer = Trainer.from_config(network, config, callbacks=[BatchLossRecorder(2), *callbacks],
                                  checkpoint_dir=checkpoint_dir)
    # augment = true then flipped digits too (today's digits default does not): the same draws
    trainer.augment = AugmentPlan(crop=2, flip=True)
    return trainer


def test_a_checkpoint_written_before_the_format_had_one_owner_resumes_unchanged(small, tmp_path):
    legacy = read_npz(LEGACY, "checkpoint")
    trainer = legacy_trainer([StopAt(None)], checkpoint_dir=tmp_path)
    trainer.resume(LEGACY)
    assert (trainer.epoch, trainer.step, trainer.batches_done) == (1, 7, 2)
    assert np.array_equal(trainer.epoch_order, legacy["epoch_order"])
    # restored and written again, it is the same file entry for entry
    rewritten = read_npz(trainer.save_checkpoint(), "checkpoint")
    assert rewritten.keys() == legacy.keys()
    for key, value in legacy.items():
        assert same_entry(key, rewritten[key], value), key
    # and the fit goes on to the end from there
    history = trainer.fit(*small)
    assert trainer.step == 15 and [e["epoch"] for e in history.epochs] == [1, 2, 3]


def test_the_writer_makes_the_entries_it_made_before(small, tmp_path):
    """The same fit stopped at the same update, by today's Trainer: the same entries and the same
    counters, generator, epoch order and config (weights may differ in the last bits if the
    legacy file was written with another thread count)."""
    trainer = legacy_trainer([StopAt(7)], checkpoint_dir=tmp_path)
    with pytest.raises(TrainingInterrupted):
        trainer.fit(*small)
    legacy, ours = read_npz(LEGACY, "checkpoint"), read_npz(tmp_path / CHECKPOINT_FILE, "checkpoint")
    assert ours.keys() == legacy.keys()
    for key in ("format", "architecture", "class_names", "trainer", "epoch_order", "rng", "schedule", "config"):
        assert same_entry(key, ours[key], legacy[key]), key
    for key in legacy:
        if key.startswith(("param/", "velocity/", "callback/")):
            np.testing.assert_allclose(ours[key], legacy[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_the_checkpoint_answers_for_config_callback_state_and_what_can_resume_it(tmp_path):
    checkpoint = TrainingCheckpoint.load(LEGACY)
    assert checkpoint.config() == LEGACY_CONFIG
    assert checkpoint.callback_state("EarlyStopping")["best_epoch"] == 1
    assert checkpoint.callback_state("mlflow") == {}
    network = legacy_trainer().network
    checkpoint.check_resumable(network, 64, [str(c) for c in range(10)])
    with pytest.raises(CheckpointError, match=r"stopped mid-epoch with batch size 64; .*\(not 32\)"):
        checkpoint.check_resumable(network, 32)
    with pytest.raises(CheckpointError, match=r"trained on classes \['0', .* the data has \['a', 'b'\]"):
        checkpoint.check_resumable(network, 64, ["a", "b"])
    with pytest.raises(CheckpointError, match="different network"):
        checkpoint.check_resumable(legacy_trainer(config=FitConfig(filters=[8])).network, 64)
    model = network.save(tmp_path / "model.npz")
    with pytest.raises(CheckpointError, match="saved model, not a training checkpoint"):
        TrainingCheckpoint.load(model)


def test_a_checkpoint_without_a_config_says_so(small, tmp_path):
    network = Network.from_config(FitConfig(filters=[4]), (1, 8, 8), 10)
    from convtrain.nn.optim import SGD, make_schedule

    trainer = Trainer(network, SGD(network.parameters(), 0.05), make_schedule(kind="constant", lr=0.05),
                      epochs=1, batch_size=64, l2=0.0, checkpoint_dir=tmp_path)
    trainer.fit(*small)
    with pytest.raises(CheckpointError, match="records no config"):
        TrainingCheckpoint.load(tmp_path / CHECKPOINT_FILE).config()
