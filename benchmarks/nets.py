"""The reference nets and the training set-up every benchmark runs them with (bench_train.py,
profile_step.py, step_cost.py): the same architecture, weights, batches and optimizer, so that
their figures describe the same step.

    DIGITS 1x8x8:   3x3x16, 3x3x32, FC10
    MNIST  1x28x28: 5x5x20, 5x5x50, FC10
    CIFAR  3x32x32: 5x5x32, 3x3x64, FC10
    CIFAR-BN        the CIFAR net with batch norm after each conv (before its ReLU)

(valid convolutions, stride 1, no pooling, ReLU after each conv, float32, batch 100.)
"""

from __future__ import annotations

import numpy as np

from convtrain.nn.network import Network
from convtrain.nn.optim import SGD, make_schedule
from convtrain.training.trainer import Trainer

# steps: how many training steps one timed round runs (about the same time for each net)
NETS = {
    "digits": {"input_shape": (1, 8, 8), "filters": [16, 32], "kernel_sizes": [3, 3], "steps": 300},
    "mnist": {"input_shape": (1, 28, 28), "filters": [20, 50], "kernel_sizes": [5, 5], "steps": 10},
    "cifar": {"input_shape": (3, 32, 32), "filters": [32, 64], "kernel_sizes": [5, 3], "steps": 10},
}
# bench_train.py times a batch-norm net in the same rounds as the net without it
NETS["cifar-bn"] = {**NETS["cifar"], "batch_norm": True, "without_batch_norm": "cifar"}
BATCH = 100
LR, MOMENTUM, L2 = 0.01, 0.9, 1e-4


def build_network(spec):
    """The net of NETS[name] with float32 He-initialized weights, the same for every run (seed 0)."""
    return Network.build(input_shape=spec["input_shape"], num_classes=10, filters=spec["filters"],
                         kernel_sizes=spec["kernel_sizes"], dtype="float32", seed=0,
                         batch_norm=spec.get("batch_norm", False))


def batches(spec, count=4):
    """(xs, ys): `count` random batches of BATCH images and labels, the same for every run."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((BATCH, *spec["input_shape"]), dtype=np.float32) for _ in range(count)]
    ys = [rng.integers(0, 10, BATCH) for _ in range(count)]
    return xs, ys


def trainer_for(network):
    """A Trainer that steps `network` with SGD (LR, MOMENTUM) under an L2 penalty L2."""
    return Trainer(network, SGD(network.parameters(), LR, MOMENTUM), make_schedule(kind="constant", lr=LR),
                   epochs=1, batch_size=BATCH, l2=L2)
