"""Residual blocks and dropout anywhere: centered differences, PyTorch step for step, threads."""

import numpy as np
import pytest

import convtrain
from convtrain.nn.layer_specs import (BatchNorm, Conv2D, Dense, Dropout, GlobalAvgPool, MaxPool2D, ReLU,
                                      Residual)
from convtrain.nn.network import Network
from convtrain.nn.optim import SGD
from convtrain.nn.residual import Residual as ResidualLayer
from tests.support.numerics import assert_same_bits_at_1_and_2_threads
from tests.support.torch_steps import TORCH_TOLERANCE, assert_torch_step_matches



def small_resnet():
    """Every shortcut kind, dropout inside a block, on a conv map and on features."""
    return [
        Conv2D(4, 3, padding="same", bias=False), BatchNorm(), ReLU(),
        Residual([Conv2D(4, 3, padding="same", bias=False), BatchNorm(), ReLU(), Dropout(0.2),
                  Conv2D(4, 3, padding="same", bias=False), BatchNorm()]),            # identity
        Residual([Conv2D(6, 3, stride=2, padding=1, bias=False), BatchNorm(), ReLU(),
                  Conv2D(6, 3, padding="same", bias=False), BatchNorm()]),            # 1x1 conv + BN
        Residual([Conv2D(5, 3, padding=1), ReLU(), Conv2D(5, (1, 3), padding=(0, 1))]),  # 1x1 conv
        Dropout(0.3), GlobalAvgPool(), Dropout(0.25), Dense(7), ReLU(),
    ]


def make_net(dtype="float64", seed=0, layers=None):
    return Network(layers or small_resnet(), seed=seed, input_shape=(2, 6, 5), num_classes=4, dtype=dtype)


def batch(dtype="float64", n=3):
    rng = np.random.default_rng(3)
    return rng.standard_normal((n, 2, 6, 5)).astype(dtype), rng.integers(0, 4, n)


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max() + np.abs(b).max(), 1e-300))


def test_the_blocks_shortcuts_follow_the_shapes():
    net = make_net()
    blocks = [layer for layer in net.layers if isinstance(layer, ResidualLayer)]
    assert [block.shortcut_kind for block in blocks] == ["identity", "conv_bn", "conv"]
    assert [layer.name for layer in blocks[1].shortcut] == ["res2.shortcut.conv", "res2.shortcut.bn"]
    assert blocks[1].shortcut[0].stride == (2, 2) and not blocks[1].shortcut[0].has_bias
    assert blocks[2].shortcut[0].has_bias
    assert "res1.conv1.bias" not in net.parameters() and "res3.conv1.bias" in net.parameters()


def test_residual_blocks_and_dropout_anywhere_match_centered_differences():
    net = make_net()
    x, y = batch()

    def loss():
        net.set_dropout_generator(np.random.default_rng(11))  # the same masks on every pass
        return net.loss_and_grads(x, y, l2=1e-3, label_smoothing=0.1)[1]

    loss()
    grads = {name: g.copy() for name, g in net.gradients().items()}
    rng = np.random.default_rng(0)
    h = 1e-6
    for name, param in net.parameters().items():
        flat = param.reshape(-1)
        for i in rng.choice(flat.size, size=min(flat.size, 4), replace=False):
            keep = flat[i]
            flat[i] = keep + h
            plus = loss()
            flat[i] = keep - h
            minus = loss()
            flat[i] = keep
            numeric = (plus - minus) / (2 * h)
            analytic = grads[name].reshape(-1)[i]
            assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (name, i, numeric, analytic)


def torch_model_with_masks(net, torch, masks):
    """to_torch_module(net) with each Dropout replaced by one multiplying by convtrain's masks,
    taken in the order convtrain drew them (both run the layers in the same order)."""
    from convtrain.nn.torch_compat import to_torch_module

    class GivenMask(torch.nn.Module):
        def forward(self, x):
            return x * torch.from_numpy(masks.pop(0)) if self.training else x

    model = to_torch_module(net)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Dropout):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, GivenMask())
    return model


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_resnet_with_dropout_matches_pytorch_step_for_step(dtype):
    torch = pytest.importorskip("torch")
    net = make_net(dtype)
    masks: list = []
    for layer in net.leaf_layers():
        if type(layer).__name__ == "Dropout":
            draw = layer.draw_mask
            layer.draw_mask = lambda shape, dt, draw=draw: masks.append(draw(shape, dt)) or masks[-1].copy()
    net.set_dropout_generator(np.random.default_rng(5))
    torch_masks: list = []
    model = torch_model_with_masks(net, torch, torch_masks)
    model.train()
    optimizer = SGD(net.parameters(), lr=0.05, momentum=0.9)
    reference = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x, y = batch(dtype, n=4)
    for step in range(3):
        loss, _ = net.loss_and_grads(x, y, label_smoothing=0.1)
        optimizer.step(net.gradients(), 0.05)
        torch_masks[:] = [m.copy() for m in masks]
        masks.clear()
        assert_torch_step_matches(torch, net, loss, model, reference, criterion, x, y, dtype, step)
    model.eval()
    with torch.no_grad():
        assert rel_err(net.forward(x), model(torch.from_numpy(x.copy())).numpy()) < TORCH_TOLERANCE[dtype]


@pytest.mark.parametrize("algo", ["im2col", "winograd"])
def test_the_same_bits_for_1_and_2_threads(threads, algo):
    x, y = batch("float32", n=8)

    def fresh_net():
        net = make_net("float32")
        net.set_conv_algo(algo)
        net.set_dropout_generator(np.random.default_rng(2))
        return net

    assert_same_bits_at_1_and_2_threads(fresh_net, x, y)


def test_winograd_is_chosen_inside_residual_blocks():
    layers = [Conv2D(8, 3, padding="same"), ReLU(),
              Residual([Conv2D(8, 3, padding="same"), ReLU(), Conv2D(8, 3, padding="same")]),
              Residual([Conv2D(16, 3, stride=2, padding=1), ReLU(), Conv2D(16, 3, padding="same")]),
              MaxPool2D(2), GlobalAvgPool()]
    net = Network(layers, input_shape=(3, 16, 16), num_classes=10)
    chosen = net.set_conv_algo("winograd")
    assert chosen == {"conv1": "winograd", "res1.conv1": "winograd", "res1.conv2": "winograd",
                      "res2.conv1": "im2col", "res2.conv2": "winograd", "res2.shortcut.conv": "im2col"}
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    winograd = net.forward(x)
    net.set_conv_algo("im2col")
    assert rel_err(winograd, net.forward(x)) < 1e-5


def test_a_block_does_not_overwrite_its_input_or_a_kept_output():
    """A ReLU first in a block must not clobber the input its shortcut reads, and the add must
    not land in an output a ReLU at the block's end keeps for its backward."""
    layers = [Conv2D(3, 3, padding=1), Residual([ReLU(), Conv2D(3, 3, padding=1), ReLU()]), GlobalAvgPool()]
    net = Network(layers, input_shape=(2, 5, 5), num_classes=3, dtype="float64")
    x, y = np.random.default_rng(1).standard_normal((2, 2, 5, 5)), np.array([0, 2])
    net.loss_and_grads(x, y)
    grads = {name: g.copy() for name, g in net.gradients().items()}
    h = 1e-6
    weight = net.parameters()["res1.conv1.weight"].reshape(-1)
    keep = weight[4]
    weight[4] = keep + h
    plus = net.loss(x, y)[0]
    weight[4] = keep - h
    minus = net.loss(x, y)[0]
    weight[4] = keep
    assert abs((plus - minus) / (2 * h) - grads["res1.conv1.weight"].reshape(-1)[4]) < 1e-7


def test_a_cifar_sized_resnet_gives_the_same_bits_for_1_and_2_threads(threads):
    """Large enough that the kernels split the batch (and pick Winograd where it helps)."""
    def block(filters, stride=1):
        return Residual([Conv2D(filters, 3, stride, 1, bias=False), BatchNorm(), ReLU(), Dropout(0.1),
                         Conv2D(filters, 3, 1, 1, bias=False), BatchNorm()])

    layers = [Conv2D(16, 3, 1, 1, bias=False), BatchNorm(), ReLU(), block(16), block(32, 2), GlobalAvgPool()]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, 16)
    results = []
    for count in (1, 2):
        convtrain.set_num_threads(count)
        net = Network(layers, input_shape=(3, 32, 32), num_classes=10)
        assert "winograd" in net.set_conv_algo("auto").values()
        net.set_dropout_generator(np.random.default_rng(4))
        optimizer = SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(2):
            net.loss_and_grads(x, y)
            optimizer.step(net.gradients(), 0.05)
        results.append({**net.parameters(), **net.buffers()})
    for name, value in results[0].items():
        assert np.array_equal(value, results[1][name]), name
