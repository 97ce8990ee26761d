"""Training steps reuse the memory the previous step freed (convtrain/nn/backend.py)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc thresholds")

# MNIST's reference net at batch 100: every step frees and allocates arrays of 2-8 MiB
STEPS_IN_A_CHILD = """
import json, resource, sys
import numpy as np
import convtrain
from convtrain.nn.backend import keep_freed_memory_for_reuse
from convtrain.nn.network import Network
from convtrain.nn.optim import SGD, make_schedule
from convtrain.training.trainer import Trainer

convtrain.set_num_threads(2)
network = Network.build(input_shape=(1, 28, 28), num_classes=10, filters=[20, 50], kernel_sizes=[5, 5],
                        dtype="float32", seed=0)
trainer = Trainer(network, SGD(network.parameters(), 0.01, 0.9), make_schedule(kind="constant", lr=0.01),
                  epochs=1, batch_size=100, l2=1e-4)
rng = np.random.default_rng(0)
x = rng.standard_normal((100, 1, 28, 28), dtype=np.float32)
y = rng.integers(0, 10, 100)
for _ in range(3):
    trainer.train_step(x, y, 0.01)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    trainer.train_step(x, y, 0.01)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"tuned": keep_freed_memory_for_reuse(), "faults_per_step": faults}))
"""


def _steps(extra_env):
    env = {**os.environ, **extra_env}
    child = subprocess.run([sys.executable, "-c", STEPS_IN_A_CHILD], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_steady_state_training_steps_take_no_page_faults():
    tuned = _steps({})
    assert tuned["tuned"] is True
    # a step touches ~20 MiB of arrays: 5,000 pages if they came back from the kernel each time
    assert tuned["faults_per_step"] < 50, tuned


def test_glibc_defaults_on_request_show_what_the_thresholds_save():
    defaults = _steps({"CONVTRAIN_MALLOC_DEFAULTS": "1"})
    assert defaults["tuned"] is False
    assert defaults["faults_per_step"] > 500, defaults


def test_malloc_settings_of_the_user_win():
    untouched = _steps({"MALLOC_TRIM_THRESHOLD_": "0"})  # return everything to the OS
    assert untouched["tuned"] is False
    assert untouched["faults_per_step"] > 500, untouched  # what the default costs: the test can fail
