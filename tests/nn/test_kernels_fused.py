"""Fused kernels against the unfused path: conv + ReLU forward, the one-pass conv backward
with the ReLU's backward folded in, and the in-place ReLU kernels (same bits as numpy)."""

import numpy as np
import pytest

import convtrain
from convtrain.nn import kernels
from tests.support.numerics import rel_err

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}

SHAPES = [  # x_shape, w_shape, stride, padding
    ((3, 2, 7, 6), (4, 2, 3, 2), 1, 0),
    ((5, 3, 9, 9), (6, 3, 3, 3), 2, 1),
    ((100, 16, 6, 6), (32, 16, 3, 3), 1, 0),   # DIGITS conv2: groups of images
    ((7, 1, 28, 28), (20, 1, 5, 5), 1, 0),     # MNIST conv1: one image per GEMM
    ((1, 2, 5, 5), (3, 2, 5, 5), 1, (1, 2)),
]


def problem(x_shape, w_shape, stride, padding, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    out_shape = kernels.conv2d_output_shape(x_shape, w_shape, stride, padding)
    dout = rng.standard_normal(out_shape).astype(dtype)
    return x, w, b, dout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES)
def test_conv_relu_forward_equals_conv_then_maximum(x_shape, w_shape, stride, padding, dtype):
    x, w, b, _ = problem(x_shape, w_shape, stride, padding, dtype)
    fused = kernels.conv2d_forward(x, w, b, stride, padding, relu=True)
    unfused = np.maximum(kernels.conv2d_forward(x, w, b, stride, padding), 0)
    np.testing.assert_array_equal(fused, unfused)   # the same GEMM, then the same max: same bits
    assert np.any(fused == 0) and np.any(fused > 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES)
@pytest.mark.parametrize("mask", [False, True])
def test_one_pass_backward_equals_the_separate_kernels(x_shape, w_shape, stride, padding, dtype, mask):
    x, w, b, dout = problem(x_shape, w_shape, stride, padding, dtype)
    relu_out = np.maximum(kernels.conv2d_forward(x, w, b, stride, padding), 0) if mask else None
    expected_dout = np.where(relu_out > 0, dout, 0) if mask else dout.copy()
    dw_ref, db_ref = kernels.conv2d_backward_filter(x, expected_dout, w_shape[2:], stride, padding)
    dx_ref = kernels.conv2d_backward_input(expected_dout, w, x_shape, stride, padding)
    dx, dw, db = kernels.conv2d_backward(x, dout, w, stride, padding, relu_out=relu_out)
    np.testing.assert_array_equal(dout, expected_dout)     # masked in place
    assert rel_err(dw, dw_ref) <= TOLERANCE[dtype]
    assert rel_err(db, db_ref) <= TOLERANCE[dtype]
    assert rel_err(dx, dx_ref) <= TOLERANCE[dtype]
    # same chunks, same GEMMs: in fact the same bits
    np.testing.assert_array_equal(dw, dw_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    none, dw2, db2 = kernels.conv2d_backward(x, expected_dout.copy(), w, stride, padding,
                                             input_grad=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw_ref)
    np.testing.assert_array_equal(db2, db_ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_backward_bits_do_not_depend_on_threads(threads):
    x, w, b, dout = problem((37, 3, 10, 9), (5, 3, 3, 3), 1, 1, np.float32, seed=3)
    relu_out = kernels.conv2d_forward(x, w, b, 1, 1, relu=True)
    previous = convtrain.get_num_threads()
    try:
        convtrain.set_num_threads(1)
        reference = kernels.conv2d_backward(x, dout.copy(), w, 1, 1, relu_out=relu_out)
        convtrain.set_num_threads(threads)
        result = kernels.conv2d_backward(x, dout.copy(), w, 1, 1, relu_out=relu_out)
    finally:
        convtrain.set_num_threads(previous)
    for got, want in zip(result, reference):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_kernels_have_numpys_bits(dtype):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(100_003).astype(dtype)
    a[:4] = [-0.0, np.nan, np.inf, -np.inf]
    expected = np.maximum(a, 0)
    got = kernels.relu_(a.copy())
    np.testing.assert_array_equal(got, expected)
    assert not np.signbit(got[0])  # -0.0 -> +0.0, as np.maximum does on long arrays
    dout = rng.standard_normal(a.shape).astype(dtype)
    dout[4:7] = [np.nan, -1.0, np.inf]
    expected_dx = np.where(expected > 0, dout, 0)   # PyTorch's threshold_backward
    got_dx = kernels.relu_backward_(dout.copy(), expected)
    np.testing.assert_array_equal(got_dx, expected_dx)
    assert np.array_equal(np.signbit(got_dx), np.signbit(expected_dx))
    assert np.isnan(got_dx[4]) == (expected[4] > 0) and got_dx[5] == (-1.0 if expected[5] > 0 else 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_relu_has_the_bits_of_add_then_relu(dtype):
    rng = np.random.default_rng(2)
    a = rng.standard_normal(100_003).astype(dtype)
    b = rng.standard_normal(a.shape).astype(dtype)
    a[:6] = [-0.0, 0.0, np.nan, 1.0, np.inf, -np.inf]
    b[:6] = [0.0, -0.0, 1.0, np.nan, -np.inf, 1.0]    # -0.0 + 0.0, NaN either side, inf - inf
    with np.errstate(invalid="ignore"):
        expected = kernels.relu_(np.add(a, b))
    got = kernels.add_relu_(a.copy(), b)
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(np.signbit(got), np.signbit(expected))
    strided = np.stack([b, b], axis=1)[:, 0]      # a non-contiguous b is read as it is
    np.testing.assert_array_equal(kernels.add_relu_(a.copy(), strided), expected)
    with pytest.raises(ValueError, match="b has shape"):
        kernels.add_relu_(a.copy(), b[:-1])
    with pytest.raises(TypeError, match="writeable C-contiguous"):
        kernels.add_relu_(np.stack([a, a], axis=1)[:, 0], b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_has_np_adds_bits_at_1_and_2_threads(dtype, threads):
    rng = np.random.default_rng(3)
    a = rng.standard_normal(100_003).astype(dtype)
    b = rng.standard_normal(a.shape).astype(dtype)
    a[:6] = [-0.0, 0.0, np.nan, 1.0, np.inf, -np.inf]
    b[:6] = [-0.0, -0.0, 1.0, np.nan, -np.inf, 1.0]
    with np.errstate(invalid="ignore"):
        expected = np.add(a, b)
        for count in (1, 2):
            convtrain.set_num_threads(count)
            got = kernels.add_(a.copy(), b)
            np.testing.assert_array_equal(got, expected)
            assert np.array_equal(np.signbit(got), np.signbit(expected))
        strided = np.stack([b, b], axis=1)[:, 0]
        np.testing.assert_array_equal(kernels.add_(a.copy(), strided), expected)
        both = np.concatenate([a, a[:1]])   # b a shifted view of a: numpy's buffered add
        expected_overlap = np.add(both[:-1], both[1:])
        np.testing.assert_array_equal(kernels.add_(both[:-1], both[1:]), expected_overlap)
    with pytest.raises(ValueError, match="b has shape"):
        kernels.add_(a.copy(), b[:-1])
    with pytest.raises(TypeError, match="writeable C-contiguous"):
        kernels.add_(np.stack([a, a], axis=1)[:, 0], b)


def test_fused_kernels_refuse_read_only_or_strided_gradients():
    x, w, b, dout = problem((2, 1, 5, 5), (2, 1, 3, 3), 1, 0, np.float64)
    with pytest.raises(TypeError, match="writeable C-contiguous"):
        kernels.conv2d_backward(x, dout[:, :, ::-1], w)
    frozen = dout.copy()
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="writeable"):
        kernels.relu_(frozen)
    with pytest.raises(ValueError, match="relu_out has shape"):
        kernels.conv2d_backward(x, dout, w, relu_out=dout[:1])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_network_with_fused_conv_relu_trains_to_the_same_bits_as_unfused(dtype):
    from convtrain.nn.layers import Conv2D, ReLU
    from convtrain.nn.network import Network
    from convtrain.nn.optim import SGD

    def trained(fused):
        network = Network.build(input_shape=(2, 10, 9), num_classes=4, filters=[5, 6],
                                kernel_sizes=[3, [2, 3]], pool=[0, 2], hidden=[7], dtype=dtype, seed=1)
        for layer in network.layers:
            if isinstance(layer, Conv2D):
                assert layer.fused_relu
                layer.fused_relu = fused
            elif isinstance(layer, ReLU) and not fused:
                layer.fused = False
        optimizer = SGD(network.parameters(), 0.05, momentum=0.9)
        rng = np.random.default_rng(0)
        for _ in range(3):
            x = rng.standard_normal((11, 2, 10, 9)).astype(dtype)
            y = rng.integers(0, 4, 11)
            network.loss_and_grads(x, y, l2=1e-3)
            optimizer.step(network.gradients())
        return network.parameters()

    fused, unfused = trained(True), trained(False)
    for name in fused:
        np.testing.assert_array_equal(fused[name], unfused[name], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N, I, O", [(100, 43264 // 8, 10), (7, 3, 2), (1, 1030, 5), (23, 512, 13)])
def test_dense_kernels_match_numpy(dtype, N, I, O):
    rng = np.random.default_rng(N + I)
    x, w = rng.standard_normal((N, I)).astype(dtype), rng.standard_normal((O, I)).astype(dtype)
    b, dout = rng.standard_normal(O).astype(dtype), rng.standard_normal((N, O)).astype(dtype)
    assert rel_err(kernels.dense_forward(x, w, b), x @ w.T + b) <= TOLERANCE[dtype]
    dx, dw, db = kernels.dense_backward(dout, x, w)
    assert rel_err(dw, dout.T @ x) <= TOLERANCE[dtype]
    assert rel_err(dx, dout @ w) <= TOLERANCE[dtype]
    np.testing.assert_array_equal(db, dout.sum(axis=0))
    none, dw2, _ = kernels.dense_backward(dout, x, w, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("threads", [1, 2])
def test_dense_kernels_bits_do_not_depend_on_threads(threads):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((37, 8200)).astype(np.float32), rng.standard_normal((9, 8200)).astype(np.float32)
    b, dout = rng.standard_normal(9).astype(np.float32), rng.standard_normal((37, 9)).astype(np.float32)
    previous = convtrain.get_num_threads()
    try:
        convtrain.set_num_threads(1)
        reference = (kernels.dense_forward(x, w, b), *kernels.dense_backward(dout, x, w))
        convtrain.set_num_threads(threads)
        result = (kernels.dense_forward(x, w, b), *kernels.dense_backward(dout, x, w))
    finally:
        convtrain.set_num_threads(previous)
    for got, want in zip(result, reference):
        np.testing.assert_array_equal(got, want)
