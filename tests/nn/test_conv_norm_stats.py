"""A batch norm after a conv takes its statistics from the conv's kernels (norm.fuse_conv_norm,
kernels.conv2d_forward's row_stats): the row statistics must be the bits batch norm's own pass
by images computes, in every build, for both conv algorithms, odd and non-square sizes and
strides; the fused layers must train as the unfused ones do, at 1 and 2 threads."""

import numpy as np
import pytest

import convtrain
from convtrain.nn import kernels, norm
from convtrain.nn.layer_specs import BatchNorm, Conv2D, GlobalAvgPool, ReLU, Residual
from convtrain.nn.layers import Conv2D as ConvLayer
from convtrain.nn.network import Network
from convtrain.nn.norm import BatchNorm2D
from tests.support.numerics import assert_same_bits_at_1_and_2_threads

# (N, C, H, W, F, stride, algo): Winograd with odd and non-square outputs and grouped small
# images, im2col at stride 1 and 2 (BLAS, grouped images, the own tiles' direct path), 1x1
CASES = [
    (7, 16, 11, 13, 16, 1, 3, "winograd"),
    (3, 16, 32, 32, 16, 1, 3, "winograd"),
    (11, 32, 8, 8, 64, 1, 3, "winograd"),
    (6, 8, 9, 7, 5, 2, 3, "im2col"),
    (5, 16, 16, 16, 32, 2, 3, "im2col"),
    (9, 16, 16, 16, 32, 1, 3, "im2col"),
    (4, 3, 31, 33, 16, 1, 3, "im2col"),
    (5, 16, 16, 15, 32, 2, 1, "im2col"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES + [(3, 16, 11, 13, 16, 1, 3, "winograd-blocks")],
                         ids=lambda c: "x".join(map(str, c[:6])) + "-" + c[7])
def test_the_convs_row_statistics_are_batch_norms_own_bits(case, dtype, monkeypatch):
    N, C, H, W, F, stride, k, algo = case
    if algo == "winograd-blocks":   # a tile row per block: the statistics after the whole image
        monkeypatch.setattr(kernels, "WINOGRAD_BLOCK_BYTES", 1)
        algo = "winograd"
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((N, C, H, W)) * 3 + 1).astype(dtype)
    w = rng.standard_normal((F, C, k, k)).astype(dtype)
    pad = k // 2
    stats = np.full((N, F, 2), np.nan)
    out = kernels.conv2d_forward(x, w, None, stride=stride, padding=pad, algo=algo, row_stats=stats)
    assert np.array_equal(out, kernels.conv2d_forward(x, w, None, stride=stride, padding=pad, algo=algo))
    rows = out.reshape(N, F, -1).astype(np.float64)
    np.testing.assert_allclose(stats[..., 0], rows.sum(axis=2), rtol=1e-12, atol=1e-9)
    m2 = ((rows - rows.mean(axis=2, keepdims=True)) ** 2).sum(axis=2)
    np.testing.assert_allclose(stats[..., 1], m2, rtol=1e-10, atol=1e-9)
    # batch norm from the conv's statistics, in either layout, against its own pass by images
    x3 = out.reshape(N, F, -1)
    gamma = rng.standard_normal(F).astype(dtype)
    beta = rng.standard_normal(F).astype(dtype)
    results = []
    for row_stats, by_images in [(None, True), (stats, True), (stats, False)]:
        y = np.empty_like(x3)
        mean, var, inv_std = np.empty(F), np.empty(F), np.empty(F)
        norm._kernels().bn_train_forward(x3, gamma, beta, y, mean, var, inv_std, 1e-5, True,
                                         by_images, 1, row_stats)
        results.append((y, mean, var, inv_std))
    for result in results[1:]:
        for got, expected in zip(result, results[0]):
            assert np.array_equal(got, expected)


def test_bad_row_stats_are_refused():
    x = np.zeros((2, 3, 5, 5), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    for bad in (np.empty((2, 4, 2), np.float32), np.empty((2, 3, 2)), np.empty((2, 4, 3)),
                np.empty((2, 2, 4)).transpose(0, 2, 1)):
        with pytest.raises(ValueError, match="row_stats"):
            kernels.conv2d_forward(x, w, None, padding=1, row_stats=bad)


def resnet(dtype="float32"):
    def block(filters, stride=1):
        return Residual([Conv2D(filters, 3, stride, 1, bias=False), BatchNorm(), ReLU(),
                         Conv2D(filters, 3, 1, 1, bias=False), BatchNorm()])
    return [Conv2D(16, 3, 1, 1, bias=False), BatchNorm(), ReLU(), block(16), block(32, 2),
            GlobalAvgPool()]


def make_net(fused=True, dtype="float32", seed=0):
    net = Network(resnet(), seed=seed, input_shape=(3, 13, 11), num_classes=4, dtype=dtype)
    net.set_conv_algo("auto")
    if not fused:
        for layer in net.leaf_layers():
            if isinstance(layer, ConvLayer):
                layer.norm_stats = False
                layer.norm_before = None
    return net


def test_every_conv_before_a_batch_norm_computes_its_statistics():
    net = make_net()
    pairs = [(layer.stats_from.name, layer.name) for layer in net.leaf_layers()
             if isinstance(layer, BatchNorm2D) and layer.stats_from is not None]
    assert len(pairs) == 6   # conv1, two per block, res2's shortcut
    assert all(conv.endswith("conv") or "conv" in conv for conv, _ in pairs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_fused_statistics_train_as_the_batch_norms_own(dtype, monkeypatch):
    """By images (the threshold lifted), the bits of the unfused net; by channels, the same
    statistics summed in another order: to rounding."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 13, 11)).astype(dtype)
    y = rng.integers(0, 4, 6)
    for layout_bytes, exact in ((0, True), (2**40, False)):
        monkeypatch.setattr(norm, "IMAGE_LAYOUT_MIN_BYTES", layout_bytes)
        monkeypatch.setattr(norm, "IMAGE_LAYOUT_MIN_ROW", 0 if exact else 64)
        runs = []
        for fused in (True, False):
            net = make_net(fused, dtype)
            loss, _ = net.loss_and_grads(x, y)
            runs.append((loss, net.gradients(), net.forward(x, train=False)))
        (loss_a, grads_a, eval_a), (loss_b, grads_b, eval_b) = runs
        for name in grads_a:
            if exact:
                assert np.array_equal(grads_a[name], grads_b[name]), name
            else:
                np.testing.assert_allclose(grads_a[name], grads_b[name],
                                           rtol=1e-3 if dtype == "float32" else 1e-9,
                                           atol=1e-5 if dtype == "float32" else 1e-12)
        if exact:   # eval mode: the running statistics the batches left
            assert loss_a == loss_b and np.array_equal(eval_a, eval_b)
        else:
            np.testing.assert_allclose(eval_a, eval_b, rtol=1e-4 if dtype == "float32" else 1e-10)


def test_a_conv_output_that_is_not_the_batch_norms_input_leaves_its_statistics_unused():
    net = make_net()
    conv = next(layer for layer in net.leaf_layers() if isinstance(layer, ConvLayer))
    bn = next(layer for layer in net.leaf_layers() if isinstance(layer, BatchNorm2D))
    x = np.random.default_rng(2).standard_normal((4, 3, 13, 11)).astype(np.float32)
    out = conv.forward(x, train=True)
    other = out.copy() + 1   # the conv's statistics are of `out`, not of this
    y = bn.forward(other, train=True)
    bn_alone = BatchNorm2D(16, name="alone")
    bn_alone.fused_relu = bn.fused_relu
    assert np.array_equal(y, bn_alone.forward(other, train=True))
    assert conv.row_stats is None   # taken (and dropped) once


@pytest.mark.parametrize("algo", ["auto", "im2col", "winograd"])
def test_the_same_bits_for_1_and_2_threads(threads, algo):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 3, 13, 11)).astype(np.float32)
    y = rng.integers(0, 4, 9)

    def fresh():
        net = make_net()
        net.set_conv_algo(algo)
        return net
    assert_same_bits_at_1_and_2_threads(fresh, x, y)


# (N, C, H, W, F): odd and non-square planes, grouped small images
GRAD_CASES = [(5, 16, 11, 13, 16), (3, 16, 32, 32, 16), (11, 32, 8, 8, 64), (4, 8, 7, 9, 5)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "x".join(map(str, c)))
def test_the_winograd_input_gradient_takes_batch_norms_first_backward_pass_with_its_bits(
        case, blocks, dtype, monkeypatch, threads):
    """The batch norm before a conv (fused ReLU): its input x, its output y = relu(bn(x)), the
    conv's input gradient dy; with norm_grad, dy comes out masked by y > 0 and the row sums are
    those of the batch norm's own first pass by images, bit for bit, at 1 and 2 threads."""
    if blocks:   # a tile row per block: the sums after the whole image
        monkeypatch.setattr(kernels, "WINOGRAD_BLOCK_BYTES", 1)
    N, C, H, W, F = case
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((N, C, H, W)) * 2 + 0.3).astype(dtype)
    bn = BatchNorm2D(C, dtype=dtype, name="bn")
    bn.fused_relu = True
    bn.params["weight"][...] = rng.standard_normal(C)
    y = bn.forward(x, train=True)
    x3, out, mean, inv_std, _ = bn._cache
    w = rng.standard_normal((F, C, 3, 3)).astype(dtype)
    dout = rng.standard_normal((N, F, H, W)).astype(dtype)
    plain = kernels.conv2d_backward_input(dout, w, x.shape, padding=1, algo="winograd")
    expected = np.where(y > 0, plain, 0)
    # the batch norm's own first pass by images, on a copy of the plain gradient
    gamma = bn.params["weight"]
    reference = []
    for row_sums in (None, "fused"):
        for count in (1, 2):
            convtrain.set_num_threads(count)
            g = plain.copy().reshape(x3.shape)
            sums = None
            if row_sums == "fused":
                part = np.full((N, C, 2), np.nan)
                g = kernels.conv2d_backward_input(dout, w, x.shape, padding=1, algo="winograd",
                                                  norm_grad=(x3, out, mean, part))
                assert np.array_equal(g, expected)
                g = g.reshape(x3.shape)
                sums = part
            dgamma, dbeta = np.empty(C, dtype), np.empty(C, dtype)
            norm._kernels().bn_backward_(x3, g, out, True, mean, inv_std, gamma, dgamma, dbeta, True,
                                         count, None, sums)
            reference.append((g.copy(), dgamma, dbeta))
    for result in reference[1:]:
        for got, want in zip(result, reference[0]):
            assert np.array_equal(got, want)
    # and by channels, from the same sums: the same values to rounding
    part = np.empty((N, C, 2))
    g = kernels.conv2d_backward_input(dout, w, x.shape, padding=1, algo="winograd",
                                      norm_grad=(x3, out, mean, part)).reshape(x3.shape)
    dgamma, dbeta = np.empty(C, dtype), np.empty(C, dtype)
    norm._kernels().bn_backward_(x3, g, out, True, mean, inv_std, gamma, dgamma, dbeta, False, 1,
                                 None, part)
    tolerance = 1e-4 if dtype == "float32" else 1e-10
    for got, want in zip((g, dgamma, dbeta), reference[0]):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


def test_norm_grad_goes_with_winograd_input_gradients_only():
    x = np.zeros((2, 4, 6, 6), np.float32)
    w = np.zeros((3, 4, 3, 3), np.float32)
    dout = np.zeros((2, 3, 6, 6), np.float32)
    grad = (x.reshape(2, 4, 36), x.reshape(2, 4, 36).copy(), np.zeros(4), np.empty((2, 4, 2)))
    with pytest.raises(ValueError, match="norm_grad"):
        kernels.conv2d_backward_input(dout, w, x.shape, padding=1, algo="im2col", norm_grad=grad)
    with pytest.raises(ValueError, match="norm_grad"):
        kernels.conv2d_backward(x, dout.copy(), w, padding=1, algo="im2col", norm_grad=grad)
    with pytest.raises(ValueError, match="norm_grad"):
        kernels.conv2d_backward_input(dout, w, x.shape, padding=1, algo="winograd",
                                      norm_grad=grad[:3] + (np.empty((2, 4, 2), np.float32),))


def test_the_fused_first_backward_pass_runs_in_the_reference_block(monkeypatch):
    seen = []
    original = kernels._winograd_backward_input

    def spy(dout, w, hw, padding, norm_grad=None):
        seen.append(norm_grad is not None)
        return original(dout, w, hw, padding, norm_grad)
    monkeypatch.setattr(kernels, "_winograd_backward_input", spy)
    net = make_net()
    rng = np.random.default_rng(7)
    net.loss_and_grads(rng.standard_normal((4, 3, 13, 11)).astype(np.float32), rng.integers(0, 4, 4))
    assert any(seen)
    assert all(layer.row_sums is None for layer in net.leaf_layers() if isinstance(layer, BatchNorm2D))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("by_images", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_with_a_shortcut_added_has_the_bits_of_add_relu_after_it(dtype, by_images, train,
                                                                            monkeypatch, threads):
    monkeypatch.setattr(norm, "IMAGE_LAYOUT_MIN_BYTES", 0 if by_images else 2**40)
    monkeypatch.setattr(norm, "IMAGE_LAYOUT_MIN_ROW", 0 if by_images else 64)
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 5, 7, 9)) * 1.5 - 0.2).astype(dtype)
    s = rng.standard_normal(x.shape).astype(dtype)
    s[0, 0, 0, :3] = [-0.0, 0.0, np.inf]
    results = []
    for count in (1, 2):
        convtrain.set_num_threads(count)
        for fused in (True, False):
            bn = BatchNorm2D(5, dtype=dtype, name="bn")
            bn.params["weight"][...] = rng.standard_normal(5) if not results else results[0][2]
            bn.params["bias"][...] = 0.25
            if not train:
                bn.buffers["running_mean"][...] = 0.1
                bn.buffers["running_var"][...] = 2.0
            if fused:
                out = bn.forward(x, train, add=s)
            else:
                out = kernels.add_relu_(np.ascontiguousarray(bn.forward(x, train)), s)
            results.append((out, bn.buffers["running_var"].copy(), bn.params["weight"].copy()))
    for out, running_var, _ in results[1:]:
        assert np.array_equal(out, results[0][0])
        assert np.array_equal(np.signbit(out), np.signbit(results[0][0]))
        assert np.array_equal(running_var, results[0][1])
    with pytest.raises(ValueError, match="add must"):
        BatchNorm2D(5, dtype=dtype).forward(x, train, add=s[:, :4])


@pytest.mark.parametrize("algo", ["auto", "im2col"])
def test_a_block_ending_in_batch_norm_gives_the_bits_of_the_separate_sum_and_relu(algo, monkeypatch):
    from convtrain.nn import residual
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 3, 13, 11)).astype(np.float32)
    y = rng.integers(0, 4, 5)
    runs = []
    for fused in (True, False):
        if not fused:   # Residual takes its other path: the batch norm, then add_relu_
            monkeypatch.setattr(residual, "BatchNorm2D", type("NotABatchNorm", (), {}))
        net = make_net()
        net.set_conv_algo(algo)
        loss, _ = net.loss_and_grads(x, y)
        runs.append((loss, {k: v.copy() for k, v in net.gradients().items()}, net.forward(x, train=False)))
    (loss_a, grads_a, eval_a), (loss_b, grads_b, eval_b) = runs
    assert loss_a == loss_b and np.array_equal(eval_a, eval_b)
    for name in grads_a:
        assert np.array_equal(grads_a[name], grads_b[name]), name
