"""Batch norm, average pooling and dropout: literal float64 formulas, centered differences,
PyTorch (when installed), and the same bits for 1 and 2 threads."""

import numpy as np
import pytest

import convtrain
from convtrain.nn import norm
from convtrain.nn.dropout import Dropout
from convtrain.nn.layers import ReLU
from convtrain.nn.norm import BatchNorm1D, BatchNorm2D, fuse_norm_relu
from convtrain.nn.pooling import AvgPool2D, GlobalAvgPool
from tests.support.numerics import numerical_gradient, rel_norm_err

# The kernels' three layouts (ext/_norm.pyx): 2d runs channel by channel (as activations the
# caches hold do); 2d-rows streams image by image (as large activations with long rows do: the
# size threshold is lifted for it), rows of 99 values leaving a remainder in every vector loop;
# 1d, a dense layer's features (rows of one value), in one block of features, and 1d-wide in
# three (64, 64 and 22 features)
KINDS = ["2d", "2d-rows", "1d", "1d-wide"]
SHAPES = {"2d": (4, 3, 5, 6), "2d-rows": (5, 3, 9, 11), "1d": (7, 5), "1d-wide": (9, 150)}


@pytest.fixture(autouse=True)
def layout_for_kind(request, monkeypatch):
    """A test parametrized with kind "2d-rows" runs the image-streaming layout."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("kind") == "2d-rows":
        monkeypatch.setattr(norm, "IMAGE_LAYOUT_MIN_BYTES", 0)


def test_large_activations_with_long_rows_stream_by_images_and_the_rest_by_channels():
    def by_images(shape, dtype=np.float32):
        return norm._by_images(np.empty(shape, dtype))
    assert by_images((100, 64, 676)) and by_images((100, 32, 784)) and by_images((100, 64, 256))
    assert not by_images((100, 128, 64)) and not by_images((100, 64, 144))  # the caches hold them
    assert not by_images((10, 64, 676))  # a small batch
    assert not by_images((100, 4096, 16))  # short rows


def make_bn(kind, channels, dtype="float64", seed=0, relu=False):
    layer = (BatchNorm1D if kind.startswith("1d") else BatchNorm2D)(channels, dtype=dtype, name="bn")
    rng = np.random.default_rng(seed)
    layer.params["weight"][...] = rng.standard_normal(channels)
    layer.params["bias"][...] = rng.standard_normal(channels)
    if relu:
        fuse_norm_relu([layer, ReLU(inplace=True)])
    return layer


def bn_input(kind, dtype="float64", seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(SHAPES[kind]) * 2 + 0.5).astype(dtype)


# ---- literal float64 batch norm (Ioffe & Szegedy's equations, one channel at a time) ----

def literal_bn_train(x, gamma, beta, eps=1e-5):
    out = np.empty_like(x)
    stats = []
    for c in range(x.shape[1]):
        values = x[:, c].ravel()
        mu = sum(values) / len(values)
        var = sum((v - mu) ** 2 for v in values) / len(values)
        out[:, c] = gamma[c] * (x[:, c] - mu) / np.sqrt(var + eps) + beta[c]
        stats.append((mu, var, len(values)))
    return out, stats


def literal_bn_backward(x, dout, gamma, eps=1e-5):
    dx = np.empty_like(x)
    dgamma, dbeta = np.empty(x.shape[1]), np.empty(x.shape[1])
    for c in range(x.shape[1]):
        xc, dc = x[:, c], dout[:, c]
        m = xc.size
        mu = xc.sum() / m
        var = ((xc - mu) ** 2).sum() / m
        xhat = (xc - mu) / np.sqrt(var + eps)
        dxhat = dc * gamma[c]
        dvar = (dxhat * (xc - mu)).sum() * -0.5 * (var + eps) ** -1.5
        dmu = -(dxhat / np.sqrt(var + eps)).sum() + dvar * (-2 * (xc - mu)).sum() / m
        dx[:, c] = dxhat / np.sqrt(var + eps) + dvar * 2 * (xc - mu) / m + dmu / m
        dgamma[c], dbeta[c] = (dc * xhat).sum(), dc.sum()
    return dx, dgamma, dbeta


@pytest.mark.parametrize("kind", KINDS)
def test_batch_norm_matches_the_literal_formulas_and_running_statistics(kind):
    x = bn_input(kind)
    layer = make_bn(kind, x.shape[1])
    gamma, beta = layer.params["weight"].copy(), layer.params["bias"].copy()
    out = layer.forward(x, train=True)
    expected, stats = literal_bn_train(x, gamma, beta)
    assert rel_norm_err(out, expected) < 1e-12
    dout = np.random.default_rng(2).standard_normal(out.shape)
    dx = layer.backward(dout.copy())  # dout becomes dx in place
    ldx, ldgamma, ldbeta = literal_bn_backward(x, dout, gamma)
    assert rel_norm_err(dx, ldx) < 1e-10
    assert rel_norm_err(layer.grads["weight"], ldgamma) < 1e-12
    assert rel_norm_err(layer.grads["bias"], ldbeta) < 1e-12
    mean = np.array([s[0] for s in stats])
    unbiased = np.array([s[1] * s[2] / (s[2] - 1) for s in stats])
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 + 0.1 * unbiased, rtol=1e-12)
    assert int(layer.buffers["num_batches_tracked"]) == 1
    # eval mode: the running statistics, not the batch's
    rm, rv = layer.buffers["running_mean"], layer.buffers["running_var"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    expected_eval = (gamma.reshape(shape) * (x - rm.reshape(shape)) / np.sqrt(rv.reshape(shape) + 1e-5)
                     + beta.reshape(shape))
    assert rel_norm_err(layer.forward(x, train=False), expected_eval) < 1e-12


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "fused-relu"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_norm_gradients_match_centered_differences(kind, relu):
    x = bn_input(kind)
    layer = make_bn(kind, x.shape[1], relu=relu)
    dout = np.random.default_rng(3).standard_normal(x.shape)
    layer.forward(x, train=True)
    dx = layer.backward(dout.copy())

    def objective():
        return float((layer.forward(x, train=True) * dout).sum())

    assert rel_norm_err(dx, numerical_gradient(objective, x)) < 1e-7
    for key in ("weight", "bias"):
        assert rel_norm_err(layer.grads[key], numerical_gradient(objective, layer.params[key])) < 1e-7
    if relu:
        assert (layer.forward(x, train=True) >= 0).all()
        assert (layer.forward(x, train=False) >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_batch_norm_gives_the_same_bits_for_1_and_2_threads(kind):
    before = convtrain.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            convtrain.set_num_threads(n)
            x = bn_input(kind, "float32", seed=5)
            layer = make_bn(kind, x.shape[1], dtype="float32", relu=True)
            out = layer.forward(x, train=True)
            dx = layer.backward(np.random.default_rng(6).standard_normal(x.shape).astype(np.float32))
            results.append((out, dx, layer.grads["weight"], layer.grads["bias"],
                            layer.buffers["running_var"].copy(), layer.forward(x, train=False)))
    finally:
        convtrain.set_num_threads(before)
    for a, b in zip(*results):
        assert np.array_equal(a, b)


# ---- pooling and dropout -------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_norm_backward_keeping_dout_gives_the_same_bits_into_a_new_array(kind, dtype):
    x = bn_input(kind, dtype)
    dout = bn_input(kind, dtype, seed=3)
    results = []
    for keep in (False, True):
        layer = make_bn(kind, x.shape[1], dtype)
        layer.forward(x, train=True)
        given = dout.copy()
        dx = layer.backward(given, keep_dout=keep)
        results.append((dx, layer.grads))
        if keep:
            np.testing.assert_array_equal(given, dout)       # dout kept
            assert not np.may_share_memory(dx, given)
        else:
            assert np.shares_memory(dx, given)               # in place
    (dx0, g0), (dx1, g1) = results
    np.testing.assert_array_equal(dx1, dx0)
    np.testing.assert_array_equal(g1["weight"], g0["weight"])
    np.testing.assert_array_equal(g1["bias"], g0["bias"])
    fused = make_bn(kind, x.shape[1], dtype, relu=True)
    fused.forward(x, train=True)
    with pytest.raises(ValueError, match="keep_dout with a fused ReLU"):
        fused.backward(dout.copy(), keep_dout=True)


def literal_avgpool(x, size, stride):
    n, c, h, w = x.shape
    out_h, out_w = (h - size) // stride + 1, (w - size) // stride + 1
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            out[:, :, i, j] = x[:, :, i * stride:i * stride + size, j * stride:j * stride + size].mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2), (2, 1)])
def test_avgpool_matches_literal_windows_and_centered_differences(size, stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    layer = AvgPool2D(size, stride)
    out = layer.forward(x, train=True)
    assert out.shape == (2,) + layer.output_shape((3, 7, 6))
    assert rel_norm_err(out, literal_avgpool(x, size, stride)) < 1e-14
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    assert rel_norm_err(dx, numerical_gradient(lambda: float((layer.forward(x) * dout).sum()), x)) < 1e-7


def test_global_avgpool_is_the_channel_mean_and_its_gradient():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5, 2))
    layer = GlobalAvgPool()
    out = layer.forward(x, train=True)
    assert out.shape == (3, 4) and layer.output_shape((4, 5, 2)) == (4,)
    expected = np.array([[x[n, c].sum() / 10 for c in range(4)] for n in range(3)])
    assert rel_norm_err(out, expected) < 1e-14
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    assert rel_norm_err(dx, numerical_gradient(lambda: float((layer.forward(x) * dout).sum()), x)) < 1e-7


def test_dropout_is_inverted_seeded_and_the_identity_in_eval_mode():
    x = np.random.default_rng(0).standard_normal((50, 40))
    layer = Dropout(0.3)
    layer.rng = np.random.default_rng(7)
    out = layer.forward(x, train=True)
    kept = out != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(out[kept], x[kept] / 0.7, rtol=1e-15)
    dout = np.random.default_rng(1).standard_normal(x.shape)
    dx = layer.backward(dout)
    np.testing.assert_array_equal(dx, dout * (kept / 0.7))
    small, mask = x[:4, :5].copy(), kept[:4, :5] / 0.7
    numeric = numerical_gradient(lambda: float((layer.forward(small, True, mask=mask) * dout[:4, :5]).sum()), small)
    assert rel_norm_err(dx[:4, :5], numeric) < 1e-7
    assert layer.forward(x, train=False) is x
    again = Dropout(0.3)
    again.rng = np.random.default_rng(7)
    np.testing.assert_array_equal(again.forward(x, train=True), out)  # the generator decides


# ---- PyTorch -----------------------------------------------------------------------

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_norm_matches_pytorch_in_train_and_eval_mode(kind, dtype):
    torch = pytest.importorskip("torch")
    tol = TOLERANCE[dtype]
    layer = make_bn(kind, SHAPES[kind][1], dtype=dtype)
    module = (torch.nn.BatchNorm1d if kind.startswith("1d") else torch.nn.BatchNorm2d)(layer.num_features)
    module = module.to(getattr(torch, dtype))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.params["weight"]))
        module.bias.copy_(torch.from_numpy(layer.params["bias"]))
    for step in range(3):  # running statistics accumulate over batches
        x = bn_input(kind, dtype, seed=10 + step)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        module.train()
        yt = module(xt)
        out = layer.forward(x, train=True)
        assert rel_norm_err(out, yt.detach().numpy()) < tol
        dout = np.random.default_rng(20 + step).standard_normal(x.shape).astype(dtype)
        module.zero_grad()
        yt.backward(torch.from_numpy(dout))
        dx = layer.backward(dout)
        assert np.shares_memory(dx, dout)  # in place: no new array
        assert rel_norm_err(dx, xt.grad.numpy()) < tol
        assert rel_norm_err(layer.grads["weight"], module.weight.grad.numpy()) < tol
        assert rel_norm_err(layer.grads["bias"], module.bias.grad.numpy()) < tol
        for name in ("running_mean", "running_var"):
            assert rel_norm_err(layer.buffers[name], getattr(module, name).numpy()) < tol
        assert int(layer.buffers["num_batches_tracked"]) == int(module.num_batches_tracked)
        module.eval()
        with torch.no_grad():
            assert rel_norm_err(layer.forward(x, train=False), module(torch.from_numpy(x)).numpy()) < tol


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pooling_and_dropout_match_pytorch(dtype):
    torch = pytest.importorskip("torch")
    tol = TOLERANCE[dtype]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 7)).astype(dtype)
    cases = [(GlobalAvgPool(), torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())),
             (AvgPool2D(2), torch.nn.AvgPool2d(2)), (AvgPool2D(3, 2), torch.nn.AvgPool2d(3, stride=2))]
    for layer, module in cases:
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = module(xt)
        out = layer.forward(x, train=True)
        assert rel_norm_err(out, yt.detach().numpy()) < tol
        dout = rng.standard_normal(out.shape).astype(dtype)
        yt.backward(torch.from_numpy(dout))
        assert rel_norm_err(layer.backward(dout), xt.grad.numpy()) < tol
    # Dropout with a fixed mask: torch's own draw, read off a batch of ones
    module = torch.nn.Dropout(0.4)
    torch.manual_seed(0)
    flat = x.reshape(2, -1)
    mask = module(torch.ones(flat.shape, dtype=getattr(torch, dtype))).numpy()
    torch.manual_seed(0)
    xt = torch.from_numpy(flat.copy()).requires_grad_(True)
    yt = module(xt)
    layer = Dropout(0.4)
    assert rel_norm_err(layer.forward(flat, train=True, mask=mask), yt.detach().numpy()) < tol
    dout = rng.standard_normal(flat.shape).astype(dtype)
    yt.backward(torch.from_numpy(dout))
    assert rel_norm_err(layer.backward(dout), xt.grad.numpy()) < tol
