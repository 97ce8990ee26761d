"""Label smoothing of the cross-entropy: the literal formula, centered differences, and
PyTorch's (when installed)."""

import math

import numpy as np
import pytest

from convtrain.nn.losses import mixed_cross_entropy, softmax_cross_entropy
from tests.support.numerics import rel_norm_err

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}



def literal_smoothed_cross_entropy(scores, y, e):
    n, k = scores.shape
    total = 0.0
    for i in range(n):
        log_z = math.log(sum(math.exp(s) for s in scores[i]))
        for j in range(k):
            q = (1 - e) * (j == y[i]) + e / k
            total += -q * (scores[i, j] - log_z)
    return total / n


@pytest.mark.parametrize("e", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_the_literal_loss_and_centered_differences(e):
    rng = np.random.default_rng(0)
    scores, y = rng.standard_normal((6, 4)) * 3, rng.integers(0, 4, 6)
    loss, dscores = softmax_cross_entropy(scores, y, label_smoothing=e)
    assert loss == pytest.approx(literal_smoothed_cross_entropy(scores, y, e), rel=1e-13)
    numeric = np.zeros_like(scores)
    for index in np.ndindex(scores.shape):
        saved = scores[index]
        scores[index] = saved + 1e-6
        plus = softmax_cross_entropy(scores, y, e)[0]
        scores[index] = saved - 1e-6
        minus = softmax_cross_entropy(scores, y, e)[0]
        scores[index] = saved
        numeric[index] = (plus - minus) / 2e-6
    assert rel_norm_err(dscores, numeric) < 1e-7


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_label_smoothing_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    scores, y = (rng.standard_normal((8, 5)) * 2).astype(dtype), rng.integers(0, 5, 8)
    st = torch.from_numpy(scores.copy()).requires_grad_(True)
    torch_loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(st, torch.from_numpy(y))
    torch_loss.backward()
    loss, dscores = softmax_cross_entropy(scores, y, label_smoothing=0.1)
    assert abs(loss - float(torch_loss.detach())) / float(torch_loss.detach()) < TOLERANCE[dtype]
    assert rel_norm_err(dscores, st.grad.numpy()) < TOLERANCE[dtype]


@pytest.mark.parametrize("lam, e", [(1.0, 0.0), (0.7, 0.0), (0.35, 0.1), (0.0, 0.2)])
def test_mixup_loss_is_the_soft_target_loss_and_its_gradient_checks(lam, e):
    rng = np.random.default_rng(2)
    scores, y = rng.standard_normal((7, 5)) * 3, rng.integers(0, 5, 7)
    partner = y[rng.permutation(7)]
    loss, dscores = mixed_cross_entropy(scores, y, partner, lam, e)
    literal = lam * literal_smoothed_cross_entropy(scores, y, e) + (1 - lam) * literal_smoothed_cross_entropy(
        scores, partner, e)
    assert loss == pytest.approx(literal, rel=1e-12)
    numeric = np.zeros_like(scores)
    for index in np.ndindex(scores.shape):
        saved = scores[index]
        scores[index] = saved + 1e-6
        plus = mixed_cross_entropy(scores, y, partner, lam, e)[0]
        scores[index] = saved - 1e-6
        minus = mixed_cross_entropy(scores, y, partner, lam, e)[0]
        scores[index] = saved
        numeric[index] = (plus - minus) / 2e-6
    assert rel_norm_err(dscores, numeric) < 1e-7


def test_mixup_loss_matches_torch_soft_targets():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    scores, y = rng.standard_normal((8, 4)), rng.integers(0, 4, 8)
    partner, lam, e = y[::-1].copy(), 0.6, 0.1
    target = lam * ((1 - e) * np.eye(4)[y] + e / 4) + (1 - lam) * ((1 - e) * np.eye(4)[partner] + e / 4)
    st = torch.from_numpy(scores.copy()).requires_grad_(True)
    torch_loss = torch.nn.CrossEntropyLoss()(st, torch.from_numpy(target))
    torch_loss.backward()
    loss, dscores = mixed_cross_entropy(scores, y, partner, lam, e)
    assert loss == pytest.approx(float(torch_loss.detach()), rel=1e-12)
    assert rel_norm_err(dscores, st.grad.numpy()) < 1e-12
