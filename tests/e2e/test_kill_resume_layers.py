"""SIGKILL a fit with batch norm, dropout, AdamW, gradient clipping and label smoothing (and one
with residual blocks and dropout inside them, written as a layer list, and one with every
augmentation transform), then resume it: the
weights, the running statistics and AdamW's moments end as an uninterrupted run's, bit for bit (tests/e2e/test_kill_resume.py does the same for the plain SGD net, at
fifteen moments and with MLflow; this one covers what these layers add to the checkpoint)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convtrain.nn.network import Network
from convtrain.nn.npz_files import read_npz
from tests.support.killharness import Harness

pytestmark = pytest.mark.slow

TRAINING_FLAGS = ["--optimizer", "adamw", "--lr", 0.003, "--weight-decay", 0.05, "--label-smoothing", 0.1,
                  "--clip-norm", 1.0, "--augment"]
LAYER_FLAGS = ["--filters", "8,16", "--padding", 1, "--pool", "2,0", "--hidden", 32, "--batch-norm",
               "--dropout", 0.3, "--global-pool", "avg", *TRAINING_FLAGS]
RESIDUAL_FLAGS = ["--layers", '[{type = "conv", filters = 8, padding = 1, bias = false}, {type = "batch_norm"}, '
                  '{type = "relu"}, {type = "residual", layers = [{type = "conv", filters = 8, padding = 1}, '
                  '{type = "relu"}, {type = "dropout", p = 0.2}, {type = "conv", filters = 8, padding = 1}, '
                  '{type = "batch_norm"}]}, {type = "residual", layers = [{type = "conv", filters = 16, stride = 2, '
                  'padding = 1, bias = false}, {type = "batch_norm"}]}, {type = "global_avg_pool"}, '
                  '{type = "dropout", p = 0.3}]', *TRAINING_FLAGS]

# every transform of the augmentation pipeline, mixup included (its lam and partners too)
AUGMENT_FLAGS = [*LAYER_FLAGS[:-1], "--crop", 2, "--crop-padding", "reflect", "--flip", "--rotate", 10,
                 "--cutout", 3, "--mixup", 0.4]


def fit_args(npz: Path, out: str, flags=LAYER_FLAGS) -> list[str]:
    return ["fit", "--data", "npz", "--data-path", npz, "--epochs", 3, "--seed", 7, "--threads", 1,
            "--batch-size", 64, "--out", out, "--no-track", "--quiet", *flags]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from convtrain.data.digits import load_digits_data

    folder = tmp_path_factory.mktemp("kill-layers")
    raw = load_digits_data()
    np.savez(folder / "digits.npz", x=raw.x[:1000].astype(np.uint8), y=raw.y[:1000])
    return folder


def final_state(folder: Path) -> dict[str, np.ndarray]:
    """The model's weights and buffers, and the checkpoint's optimizer state."""
    arrays = read_npz(folder / "checkpoint.npz", "checkpoint")
    network = Network.load(folder / "model.npz")
    state = {**network.parameters(), **network.buffers()}
    state.update({k: v for k, v in arrays.items() if k.startswith(("adamw/", "buffer/"))})
    return state


@pytest.mark.parametrize("flags", [LAYER_FLAGS, RESIDUAL_FLAGS, AUGMENT_FLAGS], ids=["template", "residual",
                                                                                  "augmented"])
def test_sigkill_mid_batch_and_mid_checkpoint_then_resume_equals_the_uninterrupted_run(workdir, flags):
    npz = workdir / "digits.npz"
    workdir = workdir / {id(LAYER_FLAGS): "template", id(RESIDUAL_FLAGS): "residual"}.get(id(flags), "augmented")
    workdir.mkdir()
    with Harness(workdir, fork=False) as harness:
        command = [sys.executable, "-m", "convtrain.cli", *map(str, fit_args(npz, "reference", flags))]
        done = subprocess.run(command, cwd=workdir, env=harness.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        reference = final_state(workdir / "reference")
        assert any(k.startswith("adamw/exp_avg/") for k in reference)
        assert any(k.endswith("running_var") for k in reference)

        killed = harness.run(fit_args(npz, "killed", flags), stop_at="mid-batch:20")  # in epoch 2
        assert killed.killed, killed.stderr
        killed = harness.run(["fit", "--resume", workdir / "killed", "--quiet"], stop_at="checkpoint-half:2")
        assert killed.killed, killed.stderr
        finished = harness.run(["fit", "--resume", workdir / "killed", "--quiet"])
        assert finished.returncode == 0, finished.stderr

    got = final_state(workdir / "killed")
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        assert np.array_equal(got[name], value), f"{name} differs from the uninterrupted run"
