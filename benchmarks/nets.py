"""The reference nets and the training set-up every benchmark runs them with (bench_train.py,
profile_step.py, step_cost.py): the same architecture, weights, batches and optimizer, so that
their figures describe the same step.

    DIGITS 1x8x8:   3x3x16, 3x3x32, FC10
    MNIST  1x28x28: 5x5x20, 5x5x50, FC10
    CIFAR  3x32x32: 5x5x32, 3x3x64, FC10
    CIFAR-BN        the CIFAR net with batch norm after each conv (before its ReLU)
    RESNET8 3x32x32: 3x3x16 + BN + ReLU, three basic blocks of 16, 32, 64 filters (the last two
                    stride 2, with a 1x1 conv + BN shortcut), global average pool, FC10

(valid convolutions, stride 1, no pooling, ReLU after each conv, float32, batch 100; RESNET8:
padding 1, convs without bias before their batch norm, as torchvision's ResNets.)
"""

from __future__ import annotations

import numpy as np

from convtrain.nn.layer_specs import BatchNorm, Conv2D, GlobalAvgPool, ReLU, Residual
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


def basic_block(filters: int, stride: int = 1) -> Residual:
    """ResNet's basic block: two 3x3 convs with batch norm, the sum, ReLU."""
    return Residual([Conv2D(filters, 3, stride, 1, bias=False), BatchNorm(), ReLU(),
                     Conv2D(filters, 3, 1, 1, bias=False), BatchNorm()])


RESNET8 = [Conv2D(16, 3, 1, 1, bias=False), BatchNorm(), ReLU(),
           basic_block(16), basic_block(32, 2), basic_block(64, 2), GlobalAvgPool()]
NETS["resnet8"] = {"input_shape": (3, 32, 32), "layers": RESNET8, "steps": 5}
BATCH = 100
LR, MOMENTUM, L2 = 0.01, 0.9, 1e-4


def build_network(spec):
    """The net of NETS[name] with float32 He-initialized weights, the same for every run (seed 0)."""
    if "layers" in spec:
        return Network(spec["layers"], seed=0, input_shape=spec["input_shape"], num_classes=10, dtype="float32")
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
