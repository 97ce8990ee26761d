"""AdamW, gradient clipping by global norm and label smoothing: literal formulas, centered
differences, and PyTorch step for step (when installed)."""

import math

import numpy as np
import pytest

from convtrain.errors import CheckpointError, ConfigError
from convtrain.nn.losses import softmax_cross_entropy
from convtrain.nn.optim import AdamW, clip_grad_norm_

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def relative_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-12)


def make_params(dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((3, 4)).astype(dtype), "a.bias": rng.standard_normal(3).astype(dtype)}


def grads_for(step, params, dtype="float64"):
    rng = np.random.default_rng(100 + step)
    return {name: rng.standard_normal(p.shape).astype(dtype) for name, p in params.items()}


def test_adamw_follows_the_literal_update_with_decoupled_decay_on_chosen_parameters():
    params = make_params()
    literal = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.99, 1e-6, 0.1
    optimizer = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, decay=["a.weight"])
    for t in range(1, 6):
        grads = grads_for(t, params)
        optimizer.step(grads)
        for k in literal:
            if k == "a.weight":
                literal[k] = literal[k] - lr * wd * literal[k]
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            literal[k] = literal[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
        for k in params:
            assert relative_error(params[k], literal[k]) < 1e-13


def test_adamw_state_round_trips_and_a_resumed_optimizer_takes_the_same_steps():
    params, other = make_params(), make_params()
    first = AdamW(params, lr=0.01)
    for t in range(3):
        first.step(grads_for(t, params))
    second = AdamW(other, lr=0.01)
    for k in other:
        other[k][...] = params[k]
    second.load_state_dict(first.state_dict())
    for t in range(3, 6):
        first.step(grads_for(t, params))
        second.step(grads_for(t, other))
    for k in params:
        assert np.array_equal(params[k], other[k])
    with pytest.raises(CheckpointError):
        second.load_state_dict({"steps": np.array(1)})
    with pytest.raises(ConfigError):
        AdamW(params, betas=(1.0, 0.9))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adamw_matches_torch_step_for_step(dtype):
    torch = pytest.importorskip("torch")
    params = make_params(dtype)
    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    optimizer = AdamW(params, lr=0.02, weight_decay=0.05)  # torch's defaults otherwise
    reference = torch.optim.AdamW(list(tensors.values()), lr=0.02, weight_decay=0.05)
    for t in range(10):
        grads = grads_for(t, params, dtype)
        for k, tensor in tensors.items():
            tensor.grad = torch.from_numpy(grads[k].copy())
        reference.step()
        optimizer.step(grads, lr=0.02)
        for k in params:
            assert relative_error(params[k], tensors[k].detach().numpy()) < TOLERANCE[dtype]


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_scales_to_the_global_norm_as_torch_does(max_norm):
    grads = make_params()
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    expected = {k: g * min(1.0, max_norm / (total + 1e-6)) for k, g in grads.items()}
    assert clip_grad_norm_(grads, max_norm) == pytest.approx(total, rel=1e-14)
    for k in grads:
        assert relative_error(grads[k], expected[k]) < 1e-15
    torch = pytest.importorskip("torch")
    for dtype in ("float64", "float32"):
        grads = make_params(dtype)
        tensors = [torch.nn.Parameter(torch.zeros(g.shape, dtype=getattr(torch, dtype))) for g in grads.values()]
        for tensor, g in zip(tensors, grads.values()):
            tensor.grad = torch.from_numpy(g.copy())
        torch_total = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))
        ours = clip_grad_norm_(grads, max_norm)
        assert abs(ours - torch_total) / torch_total < TOLERANCE[dtype]
        for tensor, g in zip(tensors, grads.values()):
            assert relative_error(g, tensor.grad.numpy()) < TOLERANCE[dtype]


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
    assert relative_error(dscores, numeric) < 1e-7


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
    assert relative_error(dscores, st.grad.numpy()) < TOLERANCE[dtype]
