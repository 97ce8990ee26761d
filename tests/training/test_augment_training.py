"""The trainer with the augmentation pipeline: seeded batches, the same bits for 1 and 2 threads,
exact resume, and mixup's labels reaching the loss."""

import numpy as np
import pytest

import convtrain
from convtrain.config import FitConfig
from convtrain.errors import TrainingInterrupted
from convtrain.nn.network import Network
from convtrain.training.trainer import Trainer
from tests.support.stops import StopAt

# every transform; digits are 8x8
PIPELINE = dict(crop=2, crop_padding="reflect", flip=True, rotate=10.0, cutout=3, mixup=0.4)


class BatchRecorder(Trainer):
    """A Trainer that keeps a copy of every batch it trains on, as augmented."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def train_step(self, xb, yb, lr, mixed=None):
        self.batches.append((xb.copy(), yb.copy(), None if mixed is None else (mixed[0].copy(), mixed[1])))
        return super().train_step(xb, yb, lr, mixed=mixed)


def make_trainer(config, cls=Trainer, **kwargs):
    network = Network.from_config(config, (1, 8, 8), 10)
    return cls.from_config(network, config, **kwargs)


def weights(trainer):
    return {k: v.copy() for k, v in trainer.network.parameters().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def test_the_batches_are_augmented_as_the_plan_says_and_seeded(small):
    config = FitConfig(epochs=1, **PIPELINE)
    a, b = make_trainer(config, BatchRecorder), make_trainer(config, BatchRecorder)
    a.fit(*small)
    b.fit(*small)
    assert len(a.batches) == 5
    for (xa, ya, ma), (xb, yb, mb) in zip(a.batches, b.batches):
        assert xa.dtype == np.float32 and np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert ma is not None and np.array_equal(ma[0], mb[0]) and ma[1] == mb[1] and 0 <= ma[1] <= 1
    plain = make_trainer(FitConfig(epochs=1), BatchRecorder)
    plain.fit(*small)
    assert all(m is None for _, _, m in plain.batches)
    x_train = small[0]
    assert not any(any(np.array_equal(x, x_train[i]) for i in range(len(x_train))) for x in a.batches[0][0][:5])


def test_the_same_augmented_batches_and_weights_for_1_and_2_threads(small):
    before = convtrain.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            convtrain.set_num_threads(threads)
            trainer = make_trainer(FitConfig(epochs=2, **PIPELINE), BatchRecorder)
            trainer.fit(*small)
            runs.append(trainer)
    finally:
        convtrain.set_num_threads(before)
    one, two = runs
    for (x1, y1, m1), (x2, y2, m2) in zip(one.batches, two.batches):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
        assert np.array_equal(m1[0], m2[0]) and m1[1] == m2[1]
    assert_same(weights(one), weights(two))


@pytest.mark.parametrize("stop_step", [7, 10])  # mid-epoch 2, and the end of epoch 2
def test_resume_with_augmentation_equals_the_uninterrupted_run_bit_for_bit(small, tmp_path, stop_step):
    config = FitConfig(epochs=4, label_smoothing=0.1, **PIPELINE)
    reference = make_trainer(config, BatchRecorder)
    reference.fit(*small)

    interrupted = make_trainer(config, callbacks=[StopAt(stop_step)], checkpoint_dir=tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as info:
        interrupted.fit(*small)
    resumed = make_trainer(config, BatchRecorder, checkpoint_dir=tmp_path / "run")
    resumed.resume(info.value.checkpoint)
    resumed.fit(*small)
    assert resumed.step == reference.step == 20
    for (x1, _, m1), (x2, _, m2) in zip(resumed.batches, reference.batches[stop_step:]):
        assert np.array_equal(x1, x2) and np.array_equal(m1[0], m2[0]) and m1[1] == m2[1]
    assert_same(weights(resumed), weights(reference))


def test_cutmix_resumes_bit_for_bit_too(small, tmp_path):
    config = FitConfig(epochs=2, crop=1, cutmix=1.0)
    reference = make_trainer(config)
    reference.fit(*small)
    interrupted = make_trainer(config, callbacks=[StopAt(6)], checkpoint_dir=tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as info:
        interrupted.fit(*small)
    resumed = make_trainer(config, checkpoint_dir=tmp_path / "run")
    resumed.resume(info.value.checkpoint)
    resumed.fit(*small)
    assert_same(weights(resumed), weights(reference))


def test_the_augment_shorthand_on_digits_does_not_flip(small):
    trainer = make_trainer(FitConfig(epochs=1, augment=True))
    assert not trainer.augment.flip and trainer.augment.crop == 1
