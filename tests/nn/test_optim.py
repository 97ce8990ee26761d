"""SGD (momentum, Nesterov, L2 through the cost), the learning-rate schedules, AdamW and gradient
clipping by global norm (literal formulas, and PyTorch step for step when installed)."""

import math

import numpy as np
import pytest

from convtrain.config import FitConfig
from convtrain.errors import CheckpointError, ConfigError
from convtrain.nn.network import Network
from convtrain.nn.optim import SGD, AdamW, clip_grad_norm_, make_schedule
from tests.support.numerics import rel_norm_err


def l2_gradient(g, p, l2):
    return g + 2 * l2 * p


def test_two_momentum_steps_with_l2_equal_the_hand_computation():
    # p0 = (1, -2), data gradient g = (0.5, 0.25), lr 0.1, momentum 0.9, l2 0.05
    p = np.array([1.0, -2.0])
    g = np.array([0.5, 0.25])
    sgd = SGD({"w": p}, lr=0.1, momentum=0.9)
    sgd.step({"w": l2_gradient(g, p, 0.05)})
    # G1 = g + 2*0.05*p0 = (0.6, 0.05);  v1 = G1;  p1 = p0 - 0.1*v1
    np.testing.assert_allclose(p, [0.94, -2.005], rtol=1e-14)
    sgd.step({"w": l2_gradient(g, p, 0.05)})
    # G2 = (0.5 + 0.1*0.94, 0.25 - 0.1*2.005) = (0.594, 0.0495)
    # v2 = 0.9*v1 + G2 = (1.134, 0.0945);  p2 = p1 - 0.1*v2
    np.testing.assert_allclose(p, [0.8266, -2.01445], rtol=1e-14)


def test_nesterov_step_equals_the_hand_computation():
    p = np.array([1.0, -2.0])
    sgd = SGD({"w": p}, lr=0.1, momentum=0.9, nesterov=True)
    sgd.step({"w": np.array([0.6, 0.05])})
    # v1 = G = (0.6, 0.05);  p1 = p0 - 0.1*(G + 0.9*v1) = p0 - 0.19*G
    np.testing.assert_allclose(p, [0.886, -2.0095], rtol=1e-14)
    sgd.step({"w": np.array([0.2, -0.1])})
    # v2 = 0.9*(0.6, 0.05) + (0.2, -0.1) = (0.74, -0.055);  p2 = p1 - 0.1*((0.2, -0.1) + 0.9*v2)
    np.testing.assert_allclose(p, [0.886 - 0.1 * (0.2 + 0.666), -2.0095 - 0.1 * (-0.1 - 0.0495)], rtol=1e-14)


def test_network_step_applies_l2_to_weights_only():
    net = Network.build(input_shape=(1, 6, 6), num_classes=3, filters=[2], dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 1, 6, 6)), np.array([0, 1, 2, 0])
    before = {k: v.copy() for k, v in net.parameters().items()}
    net.loss_and_grads(x, y, l2=0.0)
    data_grads = {k: v.copy() for k, v in net.gradients().items()}
    net.loss_and_grads(x, y, l2=0.3)
    SGD(net.parameters(), lr=0.05, momentum=0.9).step(net.gradients())
    for name, value in net.parameters().items():
        l2 = 0.3 if name.endswith(".weight") else 0.0
        expected = before[name] - 0.05 * (data_grads[name] + 2 * l2 * before[name])
        np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_over_steps_with_changing_lr(nesterov):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p = rng.standard_normal((3, 4))
    reference = torch.tensor(p.copy(), requires_grad=True)
    sgd = SGD({"w": p}, lr=0.1, momentum=0.8, nesterov=nesterov)
    torch_sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.8, nesterov=nesterov)
    for step in range(5):
        lr = 0.1 / (step + 1)
        g = rng.standard_normal((3, 4))
        sgd.step({"w": g}, lr)
        for group in torch_sgd.param_groups:
            group["lr"] = lr
        reference.grad = torch.tensor(g)
        torch_sgd.step()
    np.testing.assert_allclose(p, reference.detach().numpy(), rtol=1e-12)


def test_sgd_without_momentum_and_state_round_trip():
    p = np.array([1.0, 2.0])
    SGD({"w": p}, lr=0.5).step({"w": np.array([1.0, -1.0])})
    np.testing.assert_array_equal(p, [0.5, 2.5])
    sgd = SGD({"w": np.zeros(2)}, lr=0.1, momentum=0.9)
    sgd.step({"w": np.array([1.0, 2.0])})
    other = SGD({"w": np.zeros(2)}, lr=0.1, momentum=0.9)
    other.load_state_dict(sgd.state_dict())
    np.testing.assert_array_equal(other.velocities["w"], [1.0, 2.0])
    with pytest.raises(CheckpointError):
        other.load_state_dict({"v": np.zeros(2)})
    with pytest.raises(ConfigError, match="Nesterov"):
        SGD({"w": p}, lr=0.1, nesterov=True)


def test_constant_and_step_schedules():
    assert make_schedule(kind="constant", lr=0.3).lr(1000, 50) == 0.3
    step = make_schedule(kind="step", lr=1.0, step_epochs=3, gamma=0.5)
    assert [step.lr(0, e) for e in range(1, 8)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_cosine_schedule_runs_from_lr_to_eta_min_over_all_updates():
    cosine = make_schedule(kind="cosine", lr=0.1, eta_min=0.01)
    cosine.total_steps = 100
    assert cosine.lr(0, 1) == pytest.approx(0.1)
    assert cosine.lr(50, 1) == pytest.approx(0.055)
    assert cosine.lr(25, 1) == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine.lr(100, 1) == pytest.approx(0.01)


def test_cyclic_schedule_is_dd2424_triangular():
    config = FitConfig(schedule="cyclic", eta_min=1e-5, eta_max=1e-1, n_s=500, cycles=3)
    cyclic = make_schedule(config)
    assert cyclic.lr(0, 1) == pytest.approx(1e-5)
    assert cyclic.lr(250, 1) == pytest.approx(1e-5 + 0.5 * (1e-1 - 1e-5))
    assert cyclic.lr(500, 1) == pytest.approx(1e-1)
    assert cyclic.lr(750, 1) == pytest.approx(1e-5 + 0.5 * (1e-1 - 1e-5))
    assert cyclic.lr(1000, 1) == pytest.approx(1e-5)
    assert cyclic.lr(1500, 1) == pytest.approx(1e-1)
    assert cyclic.planned_steps() == 3000
    assert make_schedule(config, cycles=None).planned_steps() is None


def test_make_schedule_refuses_unknown_arguments():
    with pytest.raises(ConfigError, match="unknown arguments"):
        make_schedule(kind="constant", learning_rate=0.1)
    with pytest.raises(ConfigError, match="schedule"):
        make_schedule(kind="linear")


def test_cosine_replanned_at_a_resume_continues_from_the_rate_reached():
    cosine = make_schedule(kind="cosine", lr=0.1, eta_min=0.01)
    cosine.plan(100, 0)
    reached = cosine.lr(40, 1)
    cosine.plan(200, 40)  # resumed after 40 updates for a longer fit
    assert cosine.lr(39, 1) == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi * 0.39)) / 2)  # the past keeps its plan
    assert cosine.lr(40, 1) == reached
    assert cosine.lr(120, 1) == pytest.approx(0.01 + (reached - 0.01) * 0.5)  # half-way through the new 160
    assert cosine.lr(200, 1) == pytest.approx(0.01)
    rates = [cosine.lr(step, 1) for step in range(201)]
    assert all(b <= a for a, b in zip(rates, rates[1:]))
    cosine.plan(200, 60)  # resumed again with the same length: nothing changes
    assert len(cosine.segments) == 2
    cosine.plan(300, 40)  # another length at the same resume step replaces that segment
    assert cosine.segments == [(0, 100, 0.1), (40, 300, reached)]
    restored = make_schedule(kind="cosine", lr=0.1, eta_min=0.01)
    restored.load_plan(cosine.to_dict())
    assert restored.segments == cosine.segments and restored.total_steps == 300


# ---- AdamW and gradient clipping ----------------------------------------------------------

TORCH_TOLERANCE = {"float64": 1e-10, "float32": 1e-5}  # agreement with PyTorch, per dtype


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
            assert rel_norm_err(params[k], literal[k]) < 1e-13


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
            assert rel_norm_err(params[k], tensors[k].detach().numpy()) < TORCH_TOLERANCE[dtype]


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_scales_to_the_global_norm_as_torch_does(max_norm):
    grads = make_params()
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    expected = {k: g * min(1.0, max_norm / (total + 1e-6)) for k, g in grads.items()}
    assert clip_grad_norm_(grads, max_norm) == pytest.approx(total, rel=1e-14)
    for k in grads:
        assert rel_norm_err(grads[k], expected[k]) < 1e-15
    torch = pytest.importorskip("torch")
    for dtype in ("float64", "float32"):
        grads = make_params(dtype)
        tensors = [torch.nn.Parameter(torch.zeros(g.shape, dtype=getattr(torch, dtype))) for g in grads.values()]
        for tensor, g in zip(tensors, grads.values()):
            tensor.grad = torch.from_numpy(g.copy())
        torch_total = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))
        ours = clip_grad_norm_(grads, max_norm)
        assert abs(ours - torch_total) / torch_total < TORCH_TOLERANCE[dtype]
        for tensor, g in zip(tensors, grads.values()):
            assert rel_norm_err(g, tensor.grad.numpy()) < TORCH_TOLERANCE[dtype]
