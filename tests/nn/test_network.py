"""Network: whole-network gradient check, architecture checks, PyTorch layout (its file:
tests/nn/test_model_file.py)."""

import numpy as np
import pytest

from convtrain.config import FitConfig
from convtrain.errors import ArchitectureError, DataError
from convtrain.nn.network import Network
from tests.support.numerics import centered_difference, rel_norm_err

GRADIENT_NETS = {
    # stride 2, non-square kernel, asymmetric padding, pooling, a hidden layer
    "stride-pool-hidden": dict(input_shape=(2, 9, 8), num_classes=3, filters=[3, 4],
                               kernel_sizes=[3, [2, 3]], strides=[2, 1], padding=[1, [0, 1]],
                               pool=[0, 2], hidden=[5], n=4),
    # 'same' padding, a single image, two hidden layers
    "same-single-image": dict(input_shape=(1, 7, 7), num_classes=4, filters=[2], kernel_sizes=3,
                              padding="same", pool=2, hidden=[6, 4], n=1),
    # big stride and padding, pooling in both blocks, no hidden layer
    "stride3-pad2": dict(input_shape=(3, 12, 11), num_classes=2, filters=[4, 3], kernel_sizes=[5, 3],
                         strides=[3, 1], padding=[2, 1], pool=[2, 2], n=3),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_NETS))
def test_whole_network_gradients_match_centered_differences(name):
    spec = dict(GRADIENT_NETS[name])
    n = spec.pop("n")
    net = Network.build(**spec, dtype="float64", seed=3)
    rng = np.random.default_rng(1)
    for value in net.parameters().values():  # nonzero biases so their gradients matter too
        value += 0.1 * rng.standard_normal(value.shape)
    x = rng.standard_normal((n, *net.input_shape))
    y = rng.integers(0, net.num_classes, n)
    l2 = 0.01

    net.loss_and_grads(x, y, l2)
    grads = {k: v.copy() for k, v in net.gradients().items()}
    assert set(grads) == set(net.parameters())

    def cost():
        return net.loss(x, y, l2)[1]

    for pname, param in net.parameters().items():
        flat_indices = np.arange(param.size)
        if param.size > 60:
            flat_indices = rng.choice(param.size, 60, replace=False)
        analytic, numeric = [], []
        for flat in flat_indices:
            index = np.unravel_index(flat, param.shape)
            analytic.append(grads[pname][index])
            numeric.append(centered_difference(cost, param, index))
        rel = rel_norm_err(np.array(analytic), np.array(numeric))
        assert rel <= 1e-6, f"{pname}: relative error {rel:.2e}"


def test_cost_is_loss_plus_l2_times_squared_weights_without_biases():
    net = Network.build(input_shape=(1, 6, 6), num_classes=3, filters=[2], hidden=[4], dtype="float64")
    params = net.parameters()
    params["fc.bias"] += 5.0  # biases are not regularized
    expected = sum(float((v ** 2).sum()) for k, v in params.items() if k.endswith(".weight"))
    assert net.l2_penalty() == pytest.approx(expected, rel=1e-12)
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6))
    loss, cost = net.loss(x, np.array([0, 2]), l2=0.5)
    assert cost == pytest.approx(loss + 0.5 * expected, rel=1e-12)


def test_parameter_names_and_shapes_follow_pytorch():
    net = Network.build(input_shape=(3, 16, 16), num_classes=10, filters=[8, 6], kernel_sizes=[5, 3],
                        pool=[2, 0], hidden=[32])
    shapes = {k: v.shape for k, v in net.parameters().items()}
    assert shapes == {
        "conv1.weight": (8, 3, 5, 5), "conv1.bias": (8,),
        "conv2.weight": (6, 8, 3, 3), "conv2.bias": (6,),
        "fc1.weight": (32, 6 * 4 * 4), "fc1.bias": (32,),
        "fc.weight": (10, 32), "fc.bias": (10,),
    }
    assert all(v.dtype == np.float32 for v in net.parameters().values())


def test_he_initialization_is_seeded_and_scaled():
    a = Network.build(input_shape=(4, 20, 20), num_classes=10, filters=[64], kernel_sizes=5, seed=7)
    b = Network.build(input_shape=(4, 20, 20), num_classes=10, filters=[64], kernel_sizes=5, seed=7,
                      dtype="float64")
    c = Network.build(input_shape=(4, 20, 20), num_classes=10, filters=[64], kernel_sizes=5, seed=8)
    w = a.parameters()["conv1.weight"]
    assert np.std(w) == pytest.approx(np.sqrt(2 / (4 * 25)), rel=0.05)
    assert np.array_equal(w, b.parameters()["conv1.weight"].astype(np.float32))
    assert not np.array_equal(w, c.parameters()["conv1.weight"])
    assert not a.parameters()["conv1.bias"].any()


def test_from_config_broadcasts_per_block_options():
    config = FitConfig(filters=[4, 8], kernel_sizes=[[3, 5]], padding=["same"], pool=[2, 0], hidden=[16])
    net = Network.from_config(config, (1, 12, 12), 5)
    convs = [spec for spec in net.architecture["layers"] if spec["type"] == "conv"]
    assert [spec["kernel"] for spec in convs] == [[3, 5], [3, 5]]
    assert net.parameters()["fc1.weight"].shape == (16, 8 * 6 * 6)


@pytest.mark.parametrize("kwargs, words", [
    (dict(input_shape=(1, 8, 8), filters=[4, 4, 4, 4], kernel_sizes=3), ["conv4", "3x3", "2x2", "output would be 0x0"]),
    (dict(input_shape=(1, 8, 8), filters=[4], kernel_sizes=9), ["conv1", "9x9", "1x8x8"]),
    (dict(input_shape=(1, 8, 8), filters=[4, 4], kernel_sizes=3, pool=[2, 4]), ["pool2", "4x4 pooling", "4x1x1"]),
    (dict(input_shape=(1, 8, 8), filters=[4], kernel_sizes=4, padding="same"), ["conv1", "odd kernel"]),
    (dict(input_shape=(1, 8, 8), filters=[4, 4, 4], kernel_sizes=[3, 3]), ["kernel_sizes", "1 or 3"]),
])
def test_impossible_architecture_is_refused_naming_layer_and_sizes(kwargs, words):
    with pytest.raises(ArchitectureError) as info:
        Network.build(num_classes=10, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_predict_normalizes_raw_input_in_batches():
    net = Network.build(input_shape=(2, 6, 6), num_classes=4, filters=[3], dtype="float64", seed=1)
    net.normalization = {"mean": [10.0, -2.0], "std": [2.0, 4.0]}
    raw = np.random.default_rng(0).normal(5, 3, (7, 2, 6, 6))
    manual = (raw - np.array([10.0, -2.0])[None, :, None, None]) / np.array([2.0, 4.0])[None, :, None, None]
    scores = net.forward(manual)
    proba = net.predict_proba(raw, batch_size=3)
    assert proba.shape == (7, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(net.predict(raw, batch_size=2), scores.argmax(axis=1))
    with pytest.raises(DataError, match=r"\(2, 6, 6\)"):
        net.predict(raw[:, :1])


def test_torch_layout_export_matches_torch_forward():
    torch = pytest.importorskip("torch")
    from convtrain.nn.torch_compat import to_torch_module

    net = Network.build(input_shape=(3, 11, 9), num_classes=6, filters=[5, 4], kernel_sizes=[[3, 5], 3],
                        strides=[2, 1], padding=[1, "same"], pool=[0, 2], hidden=[8], dtype="float64", seed=2)
    model = to_torch_module(net)
    x = np.random.default_rng(0).standard_normal((5, 3, 11, 9))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-10, atol=1e-12)

    # and back: weights changed on the torch side come in through load_state_dict_torch
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    net.load_state_dict_torch(model.state_dict())
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-10, atol=1e-12)


def test_torch_gradients_match():
    torch = pytest.importorskip("torch")
    from convtrain.nn.torch_compat import to_torch_module

    net = Network.build(input_shape=(2, 10, 10), num_classes=3, filters=[4, 5], kernel_sizes=[3, [2, 3]],
                        strides=[2, 1], padding=[1, 0], pool=[0, 2], hidden=[6], dtype="float64", seed=5)
    model = to_torch_module(net)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 2, 10, 10)), rng.integers(0, 3, 4)
    net.loss_and_grads(x, y, l2=0.0)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    for name, param in model.named_parameters():
        np.testing.assert_allclose(net.gradients()[name], param.grad.numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=name)
