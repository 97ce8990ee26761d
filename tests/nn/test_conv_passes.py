"""conv_algo "auto" per pass: a Winograd layer whose filter gradient runs by im2col
(kernels.choose_conv_algos) against the lecture's literal formulas, centered differences,
PyTorch step for step and thread counts; an explicit conv_algo keeps one algorithm."""

import numpy as np
import pytest

from convtrain.nn import kernels
from convtrain.nn import reference as ref
from convtrain.nn.layer_specs import BatchNorm, Conv2D, GlobalAvgPool, ReLU, Residual
from convtrain.nn.layers import Conv2D as ConvLayer
from convtrain.nn.network import Network
from convtrain.nn.optim import SGD
from tests.support.numerics import (assert_same_bits_at_1_and_2_threads, centered_difference, conv_problem,
                                    rel_err, rel_norm_err)
from tests.support.torch_steps import assert_torch_step_matches

TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}
MIXED = ("winograd", "im2col", "winograd")


def test_auto_takes_the_thin_layers_filter_gradient_by_im2col():
    # ResNet-8's res1 (16 -> 16 at 32x32) and the rule's edges: a channel count below 32, an
    # output of at least 128 pixels
    assert kernels.choose_conv_algos("auto", 16, 16, (3, 3), (1, 1), (32, 32)) == MIXED
    assert kernels.choose_conv_algos("auto", 16, 32, (3, 3), (1, 1), (16, 8)) == MIXED
    assert kernels.choose_conv_algos("auto", 16, 16, (3, 3), (1, 1), (8, 15)) == ("winograd",) * 3
    assert kernels.choose_conv_algos("auto", 32, 32, (3, 3), (1, 1), (16, 16)) == ("winograd",) * 3
    assert kernels.choose_conv_algos("auto", 32, 64, (3, 3), (1, 1), (26, 26)) == ("winograd",) * 3
    assert kernels.choose_conv_algos("auto", 8, 16, (3, 3), (1, 1), (28, 28)) == ("im2col",) * 3
    assert kernels.choose_conv_algos("auto", 16, 16, (3, 3), (2, 2), (16, 16)) == ("im2col",) * 3
    for shape in [(16, 16, (32, 32)), (32, 64, (26, 26)), (3, 16, (32, 32)), (16, 32, (4, 4))]:
        c, f, hw = shape
        assert kernels.choose_conv_algos("im2col", c, f, (3, 3), (1, 1), hw) == ("im2col",) * 3
        assert kernels.choose_conv_algos("winograd", c, f, (3, 3), (1, 1), hw) == ("winograd",) * 3
        assert kernels.choose_conv_algo("auto", c, f, (3, 3), (1, 1), hw) \
            == kernels.choose_conv_algos("auto", c, f, (3, 3), (1, 1), hw)[0]


def resnet8_layers():
    """benchmarks/nets.py's ResNet-8."""
    def block(filters, stride=1):
        return Residual([Conv2D(filters, 3, stride, 1, bias=False), BatchNorm(), ReLU(),
                         Conv2D(filters, 3, 1, 1, bias=False), BatchNorm()])
    return [Conv2D(16, 3, 1, 1, bias=False), BatchNorm(), ReLU(), block(16), block(32, 2), block(64, 2),
            GlobalAvgPool()]


def test_an_explicit_conv_algo_keeps_one_algorithm_for_every_pass():
    net = Network(resnet8_layers(), input_shape=(3, 32, 32), num_classes=10, seed=None)
    convs = [layer for layer in net.leaf_layers() if isinstance(layer, ConvLayer)]
    auto = net.set_conv_algo("auto")
    assert auto["res1.conv1"] == auto["res1.conv2"] == "winograd, im2col filter gradient"
    assert auto["res2.conv2"] == auto["res3.conv2"] == "winograd"
    assert net.conv_algos() == auto
    assert [(c.algo, c.filter_algo) for c in convs if c.name.startswith("res1")] == [("winograd", "im2col")] * 2
    for algo in ("winograd", "im2col", "auto", "im2col"):   # explicit after auto resets every pass
        chosen = net.set_conv_algo(algo)
        if algo != "auto":
            assert all(c.filter_algo == c.algo for c in convs)
            assert set(chosen.values()) <= {"im2col", "winograd"}
    assert set(net.conv_algos().values()) == {"im2col"}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("x_shape, filters, padding", [((3, 16, 12, 11), 16, 1), ((2, 16, 14, 13), 20, 0)])
def test_the_split_backward_gives_the_literal_formulas_gradients(x_shape, filters, padding, relu, dtype):
    x, w, b, rng = conv_problem(x_shape, (filters, x_shape[1], 3, 3), dtype, 0)
    out = ref.conv_forward(x, w, b, padding=padding)
    dout = rng.standard_normal(out.shape).astype(dtype)
    relu_out = np.maximum(out, 0).astype(dtype) if relu else None
    masked = np.where(relu_out > 0, dout, 0).astype(dtype) if relu else dout
    dx, dw, db = kernels.conv2d_backward(x, dout.copy(), w, padding=padding, relu_out=relu_out,
                                         algo="winograd", filter_algo="im2col")
    dw_ref, db_ref = ref.filter_grad(x, masked, 3, padding=padding)
    assert rel_err(dx, ref.input_grad(masked, w, x.shape, padding=padding)) <= TOLERANCE[dtype]
    assert rel_err(dw, dw_ref) <= TOLERANCE[dtype] and rel_err(db, db_ref) <= TOLERANCE[dtype]
    # each pass has its algorithm's own bits
    assert np.array_equal(dx, kernels.conv2d_backward_input(masked, w, x.shape, padding=padding,
                                                            algo="winograd"))
    alone = kernels.conv2d_backward_filter(x, masked, 3, padding=padding, algo="im2col")
    assert np.array_equal(dw, alone[0]) and np.array_equal(db, alone[1])
    no_dx = kernels.conv2d_backward(x, dout.copy(), w, padding=padding, relu_out=relu_out,
                                    input_grad=False, algo="winograd", filter_algo="im2col")
    assert no_dx[0] is None and np.array_equal(no_dx[1], dw) and np.array_equal(no_dx[2], db)
    with pytest.raises(ValueError, match="algo must be one of"):
        kernels.conv2d_backward(x, dout.copy(), w, padding=padding, filter_algo="fft")


def split_net(dtype, seed=0):
    """Convs that conv_algo "auto" splits (a channel count of 16, 12x12 = 144 output pixels):
    the first with its ReLU fused and no input gradient, two inside a block with batch norm,
    one from 16 to 32 channels."""
    layers = [Conv2D(16, 3, padding=1), ReLU(),
              Residual([Conv2D(16, 3, padding=1, bias=False), BatchNorm(), ReLU(),
                        Conv2D(16, 3, padding=1, bias=False), BatchNorm()]),
              Conv2D(32, 3, padding=1), ReLU(), GlobalAvgPool()]
    net = Network(layers, input_shape=(16, 12, 12), num_classes=5, dtype=dtype, seed=seed)
    split = "winograd, im2col filter gradient"
    assert net.set_conv_algo("auto") == {"conv1": split, "res1.conv1": split, "res1.conv2": split,
                                         "conv2": split}
    return net


def test_split_passes_match_centered_differences():
    net = split_net("float64", seed=3)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((3, 16, 12, 12)), rng.integers(0, 5, 3)
    net.loss_and_grads(x, y, 0.01)
    grads = {k: v.copy() for k, v in net.gradients().items()}

    def cost():   # in training mode: batch norm normalizes by the batch's statistics
        return net.loss_and_grads(x, y, 0.01)[1]

    for name in ("conv1.weight", "conv1.bias", "res1.conv1.weight", "res1.conv2.weight", "conv2.weight"):
        param = net.parameters()[name]
        indices = [np.unravel_index(i, param.shape) for i in rng.choice(param.size, min(param.size, 30), replace=False)]
        analytic = np.array([grads[name][i] for i in indices])
        numeric = np.array([centered_difference(cost, param, i) for i in indices])
        assert rel_norm_err(analytic, numeric) <= 1e-6, name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_split_passes_match_pytorch_step_for_step(dtype):
    torch = pytest.importorskip("torch")
    from convtrain.nn.torch_compat import to_torch_module
    net = split_net(dtype)
    model = to_torch_module(net)
    model.train()
    optimizer = SGD(net.parameters(), lr=0.05, momentum=0.9)
    reference = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((4, 16, 12, 12)).astype(dtype), rng.integers(0, 5, 4)
    for step in range(3):
        loss, _ = net.loss_and_grads(x, y)
        optimizer.step(net.gradients(), 0.05)
        assert_torch_step_matches(torch, net, loss, model, reference, criterion, x, y, dtype, step)


def test_split_passes_give_the_same_bits_for_1_and_2_threads(threads):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 16, 12, 12), dtype=np.float32), rng.integers(0, 5, 16)
    assert_same_bits_at_1_and_2_threads(lambda: split_net("float32"), x, y)
