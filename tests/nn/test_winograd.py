"""Winograd F(2x2, 3x3) (kernels algo="winograd", conv_algo) against the lecture's literal
formulas (convtrain.nn.reference), centered differences through a network, thread counts,
the auto rule, and (if installed) PyTorch."""

import numpy as np
import pytest

import convtrain
from convtrain.config import FitConfig
from convtrain.errors import ConfigError
from convtrain.nn import kernels
from convtrain.nn import reference as ref
from convtrain.nn.network import Network
from tests.support.numerics import centered_difference, conv_problem, rel_err, rel_norm_err

# (x_shape, filters, padding): odd outputs (not a multiple of the 2x2 tile), even ones, padding
# 0, 1, 2 and 3 (the input gradient's padding 2 - p is then negative: cropping), N=1, C=1, F=1,
# many channels, non-square images, outputs of one pixel
SHAPES = [
    ((2, 3, 7, 9), 4, 0),       # output 5x7: odd both ways
    ((2, 3, 8, 8), 4, 0),       # output 6x6: whole tiles
    ((1, 1, 6, 5), 1, 1),       # N=1, C=1, F=1
    ((3, 5, 9, 6), 7, 1),
    ((2, 40, 10, 11), 36, 1),   # many channels
    ((2, 4, 6, 7), 3, 2),
    ((2, 4, 5, 6), 3, 3),
    ((1, 2, 3, 3), 2, 0),       # output 1x1
    ((2, 3, 1, 4), 2, 1),       # one input row
]
SHAPE_IDS = [f"x{s[0]}-f{s[1]}-p{s[2]}" for s in SHAPES]
# im2col's tolerances (tests/nn/test_kernels.py); Winograd meets the same ones
TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}


def problem(x_shape, filters, dtype, seed=0):
    """A 3x3 convolution's random operands (Winograd's only kernel size)."""
    return conv_problem(x_shape, (filters, x_shape[1], 3, 3), dtype, seed)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape, filters, padding", SHAPES, ids=SHAPE_IDS)
def test_forward_and_input_gradient_match_the_lecture_formulas(x_shape, filters, padding, dtype):
    x, w, b, rng = problem(x_shape, filters, dtype)
    expected = ref.conv_forward(x, w, b, padding=padding)
    out = kernels.conv2d_forward(x, w, b, padding=padding, algo="winograd")
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out, expected) <= TOLERANCE[dtype]
    no_bias = kernels.conv2d_forward(x, w, None, padding=padding, algo="winograd")
    assert rel_err(no_bias, ref.conv_forward(x, w, None, padding=padding)) <= TOLERANCE[dtype]
    relu = kernels.conv2d_forward(x, w, b, padding=padding, relu=True, algo="winograd")
    assert rel_err(relu, np.maximum(expected, 0)) <= TOLERANCE[dtype]
    assert (relu >= 0).all()

    dout = rng.standard_normal(expected.shape).astype(dtype)
    dx = kernels.conv2d_backward_input(dout, w, x.shape, padding=padding, algo="winograd")
    assert dx.dtype == dtype and dx.shape == x.shape
    assert rel_err(dx, ref.input_grad(dout, w, x.shape, padding=padding)) <= TOLERANCE[dtype]

    dw, db = kernels.conv2d_backward_filter(x, dout, 3, padding=padding, algo="winograd")
    dw_ref, db_ref = ref.filter_grad(x, dout, 3, padding=padding)
    assert dw.dtype == db.dtype == dtype and dw.shape == w.shape and db.shape == b.shape
    assert rel_err(dw, dw_ref) <= TOLERANCE[dtype]
    assert rel_err(db, db_ref) <= TOLERANCE[dtype]



def _all_three_passes_match_the_formulas(x_shape, filters, padding, dtype, seed=0):
    x, w, b, rng = problem(x_shape, filters, dtype, seed)
    expected = ref.conv_forward(x, w, b, padding=padding)
    out = kernels.conv2d_forward(x, w, b, padding=padding, algo="winograd")
    assert out.shape == expected.shape and rel_err(out, expected) <= TOLERANCE[dtype]
    dout = rng.standard_normal(expected.shape).astype(dtype)
    dx = kernels.conv2d_backward_input(dout, w, x.shape, padding=padding, algo="winograd")
    assert rel_err(dx, ref.input_grad(dout, w, x.shape, padding=padding)) <= TOLERANCE[dtype]
    dw, db = kernels.conv2d_backward_filter(x, dout, 3, padding=padding, algo="winograd")
    dw_ref, db_ref = ref.filter_grad(x, dout, 3, padding=padding)
    assert rel_err(dw, dw_ref) <= TOLERANCE[dtype] and rel_err(db, db_ref) <= TOLERANCE[dtype]


# (x_shape, filters, (ph, pw)): padding that differs by axis (cropping on one axis only for the
# input gradient), padding 2 on even sizes (the input gradient's own padding is then 0: the path
# that reads dout in place), padding 0 with the output odd in one dimension only
EDGE_SHAPES = [
    ((2, 3, 7, 8), 4, (1, 0)),
    ((2, 3, 8, 7), 4, (0, 2)),
    ((2, 3, 6, 9), 3, (3, 1)),
    ((2, 4, 8, 10), 3, (2, 2)),
    ((2, 4, 8, 9), 5, (0, 0)),     # output 6x7
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape, filters, padding", EDGE_SHAPES,
                         ids=[f"x{s[0]}-p{s[2]}" for s in EDGE_SHAPES])
def test_per_axis_padding_and_the_in_place_paths_match_the_formulas(x_shape, filters, padding, dtype):
    _all_three_passes_match_the_formulas(x_shape, filters, padding, dtype)


# An image is transformed a block of tile rows at a time (WINOGRAD_BLOCK_BYTES): the reference
# shapes fit one block, so force blocks of one tile row, and (float32, 16 * (C + F) * tiles per
# row * 4 bytes a row) blocks of 3 tile rows, the last of the 5 short.
@pytest.mark.parametrize("block_bytes", [1, 3 * 16 * 9 * 5 * 4], ids=["one-row", "three-rows"])
@pytest.mark.parametrize("x_shape, filters, padding", [((3, 4, 9, 10), 5, 1), ((3, 4, 12, 9), 5, 0)],
                         ids=["p1-5-tile-rows", "p0-5-tile-rows"])
def test_images_split_into_blocks_of_tile_rows_give_the_same_layer(monkeypatch, threads, block_bytes,
                                                                    x_shape, filters, padding):
    monkeypatch.setattr(kernels, "WINOGRAD_BLOCK_BYTES", block_bytes)
    for dtype in (np.float64, np.float32):
        _all_three_passes_match_the_formulas(x_shape, filters, padding, dtype, seed=7)
    x, w, b, rng = problem(x_shape, filters, np.float32, seed=8)
    out = kernels.conv2d_forward(x, w, b, padding=padding, algo="winograd")
    dout = rng.standard_normal(out.shape).astype(np.float32)
    results = []
    for n in (1, 2):
        convtrain.set_num_threads(n)
        results.append((kernels.conv2d_forward(x, w, b, padding=padding, relu=True, algo="winograd"),
                        kernels.conv2d_backward_input(dout, w, x.shape, padding=padding, algo="winograd"),
                        *kernels.conv2d_backward_filter(x, dout, 3, padding=padding, algo="winograd")))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)

# Small images go several to a GEMM (WINOGRAD_MIN_COLUMNS, at least MIN_GROUPS groups): 21
# images of 16 to 25 tiles each in groups of 3 in the forward and the input gradient (the filter
# gradient stays one image at a time); odd sizes, non-square, padding 0 to 2.
@pytest.mark.parametrize("x_shape, filters, padding", [((21, 3, 9, 7), 4, 1), ((21, 5, 9, 7), 3, 0),
                                                       ((21, 2, 7, 5), 6, 2)],
                         ids=["p1", "p0", "p2"])
def test_small_images_taken_several_per_gemm_give_the_same_layer(threads, x_shape, filters, padding):
    C = x_shape[1]
    Ho, Wo = x_shape[2] + 2 * padding - 2, x_shape[3] + 2 * padding - 2
    assert kernels._winograd_scratch(C, filters, Ho, Wo, 21, np.float32)[1] == 3
    assert kernels._winograd_scratch(C, filters, Ho, Wo, 8, np.float32)[1] == 1   # 8 groups at least
    for dtype in (np.float64, np.float32):
        _all_three_passes_match_the_formulas(x_shape, filters, padding, dtype, seed=9)
    x, w, b, rng = problem(x_shape, filters, np.float64, seed=10)
    out = kernels.conv2d_forward(x, w, b, padding=padding, algo="winograd")
    dout = rng.standard_normal(out.shape)

    def passes():
        return (kernels.conv2d_forward(x, w, b, padding=padding, relu=True, algo="winograd"),
                kernels.conv2d_backward_input(dout, w, x.shape, padding=padding, algo="winograd"),
                *kernels.conv2d_backward_filter(x, dout, 3, padding=padding, algo="winograd"))
    grouped = {}
    for n in (1, 2):
        convtrain.set_num_threads(n)
        grouped[n] = passes()
    for one, two in zip(grouped[1], grouped[2]):
        np.testing.assert_array_equal(one, two)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "WINOGRAD_MIN_COLUMNS", 1)    # one image per GEMM
        assert kernels._winograd_scratch(C, filters, Ho, Wo, 21, np.float32)[1] == 1
        single = passes()
    for got, want in zip(grouped[1], single):
        assert rel_err(got, want) <= 1e-14


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_fused_relu_is_np_maximum_of_the_output_nan_included(dtype):
    x, w, b, _ = problem((2, 3, 8, 7), 4, dtype, seed=3)
    x[1, 2, 4, 3] = np.nan   # reaches the outputs of the tiles that read it
    plain = kernels.conv2d_forward(x, w, b, padding=1, algo="winograd")
    fused = kernels.conv2d_forward(x, w, b, padding=1, relu=True, algo="winograd")
    assert np.isnan(plain).any()
    np.testing.assert_array_equal(fused, np.maximum(plain, 0))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_backward_masks_dout_then_runs_both_winograd_gradients(dtype):
    x, w, b, rng = problem((19, 6, 9, 8), 5, dtype, seed=2)   # more images than filter chunks
    out = kernels.conv2d_forward(x, w, b, padding=1, relu=True)
    dout = rng.standard_normal(out.shape).astype(dtype)
    masked = np.where(out > 0, dout, 0).astype(dtype)
    given = dout.copy()
    dx, dw, db = kernels.conv2d_backward(x, given, w, padding=1, relu_out=out, algo="winograd")
    np.testing.assert_array_equal(given, masked)   # masked in place, as with im2col
    np.testing.assert_array_equal(
        dx, kernels.conv2d_backward_input(masked, w, x.shape, padding=1, algo="winograd"))
    for got, want in zip((dw, db), kernels.conv2d_backward_filter(x, masked, 3, padding=1,
                                                                  algo="winograd")):
        np.testing.assert_array_equal(got, want)
    assert rel_err(dx, ref.input_grad(masked, w, x.shape, padding=1)) <= TOLERANCE[dtype]
    dw_ref, db_ref = ref.filter_grad(x, masked, 3, padding=1)
    assert rel_err(dw, dw_ref) <= TOLERANCE[dtype] and rel_err(db, db_ref) <= TOLERANCE[dtype]
    none, dw_first, _ = kernels.conv2d_backward(x, dout.copy(), w, padding=1, relu_out=out,
                                                input_grad=False, algo="winograd")
    assert none is None
    np.testing.assert_array_equal(dw_first, dw)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_and_two_threads_give_the_same_bits(threads, dtype):
    # 23 images: 16 filter-gradient chunks of one or two images, shared out as threads come
    x, w, b, rng = problem((23, 5, 12, 11), 6, dtype, seed=5)
    dout = rng.standard_normal((23, 6, 12, 11)).astype(dtype)
    results = {}
    for n in (1, 2, 3):
        convtrain.set_num_threads(n)
        results[n] = (kernels.conv2d_forward(x, w, b, padding=1, relu=True, algo="winograd"),
                      kernels.conv2d_backward_input(dout, w, x.shape, padding=1, algo="winograd"),
                      *kernels.conv2d_backward_filter(x, dout, 3, padding=1, algo="winograd"))
    for one, two, three in zip(results[1], results[2], results[3]):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)


def test_empty_batch():
    x, w, b, _ = problem((0, 2, 5, 5), 3, np.float64)
    assert kernels.conv2d_forward(x, w, b, algo="winograd").shape == (0, 3, 3, 3)
    dout = np.zeros((0, 3, 3, 3))
    assert kernels.conv2d_backward_input(dout, w, x.shape, algo="winograd").shape == x.shape
    dx, dw, db = kernels.conv2d_backward(x, dout, w, algo="winograd")
    assert dx.shape == x.shape and dw.shape == w.shape and not dw.any() and not db.any()
    dw, db = kernels.conv2d_backward_filter(x, dout, 3, algo="winograd")
    assert dw.shape == w.shape and not dw.any() and db.shape == (3,) and not db.any()


@pytest.mark.parametrize("kernel, stride, words", [
    ((5, 5), 1, "kernel 5x5 stride 1x1"),
    ((3, 3), 2, "kernel 3x3 stride 2x2"),
    ((3, 2), 1, "kernel 3x2"),
])
def test_winograd_refuses_what_it_does_not_compute(kernel, stride, words):
    x = np.zeros((1, 2, 9, 9))
    w = np.zeros((3, 2, *kernel))
    with pytest.raises(ValueError, match=words):
        kernels.conv2d_forward(x, w, None, stride=stride, algo="winograd")
    with pytest.raises(ValueError, match="3x3 stride-1"):
        kernels.conv2d_backward_input(np.zeros(kernels.conv2d_output_shape(x.shape, w.shape, stride)),
                                      w, x.shape, stride=stride, algo="winograd")
    with pytest.raises(ValueError, match="algo must be one of im2col, winograd, got 'fft'"):
        kernels.conv2d_forward(x, w, None, algo="fft")


# ----------------------------------------------------------------------------- networks

NET = dict(input_shape=(3, 9, 8), num_classes=3, filters=[4, 5], kernel_sizes=[3, 3],
           padding=[1, 0], pool=[0, 2], hidden=[6])


def test_network_gradients_through_winograd_match_centered_differences():
    net = Network.build(**NET, dtype="float64", seed=3)
    assert net.set_conv_algo("winograd") == {"conv1": "winograd", "conv2": "winograd"}
    rng = np.random.default_rng(1)
    for value in net.parameters().values():
        value += 0.1 * rng.standard_normal(value.shape)
    x = rng.standard_normal((3, *net.input_shape))
    y = rng.integers(0, net.num_classes, 3)
    net.loss_and_grads(x, y, 0.01)
    grads = {k: v.copy() for k, v in net.gradients().items()}

    def cost():
        return net.loss(x, y, 0.01)[1]

    # conv1's gradients flow through conv2's Winograd input gradient; both filter gradients
    # and the forward are Winograd
    for name in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        param = net.parameters()[name]
        indices = [np.unravel_index(i, param.shape) for i in rng.choice(param.size, min(param.size, 40),
                                                                        replace=False)]
        analytic = np.array([grads[name][i] for i in indices])
        numeric = np.array([centered_difference(cost, param, i) for i in indices])
        assert rel_norm_err(analytic, numeric) <= 1e-6, name


def test_a_model_trained_with_winograd_runs_with_im2col_after_loading(tmp_path):
    net = Network.build(**NET, dtype="float64", seed=4)
    net.set_conv_algo("winograd")
    x = np.random.default_rng(0).standard_normal((4, *net.input_shape))
    scores = net.forward(x)
    loaded = Network.load(net.save(tmp_path / "model.npz"))
    assert loaded.conv_algos() == {"conv1": "im2col", "conv2": "im2col"}   # not saved
    assert rel_err(loaded.forward(x), scores) <= 1e-12


def test_auto_picks_winograd_only_where_it_was_measured_to_pay():
    cifar = Network.build(input_shape=(3, 32, 32), num_classes=10, filters=[32, 64],
                          kernel_sizes=[5, 3], seed=None)   # benchmarks/nets.py's CIFAR net
    assert cifar.set_conv_algo("auto") == {"conv1": "im2col", "conv2": "winograd"}
    assert cifar.set_conv_algo("winograd") == {"conv1": "im2col", "conv2": "winograd"}
    assert cifar.set_conv_algo("im2col") == {"conv1": "im2col", "conv2": "im2col"}
    digits = Network.build(input_shape=(1, 8, 8), num_classes=10, filters=[16, 32], seed=None)
    assert digits.set_conv_algo("auto") == {"conv1": "im2col", "conv2": "im2col"}
    assert digits.set_conv_algo("winograd") == {"conv1": "winograd", "conv2": "winograd"}
    # the rule's edges: both channel counts >= 16 and >= 64 output pixels
    edges = Network.build(input_shape=(16, 16, 16), num_classes=2, filters=[32, 8, 16],
                          padding=[1, 1, 0], seed=None)
    assert edges.set_conv_algo("auto") == {"conv1": "winograd, im2col filter gradient",   # 16 channels
                                           "conv2": "im2col", "conv3": "im2col"}
    small = Network.build(input_shape=(16, 8, 8), num_classes=2, filters=[16, 16], padding=[1, 0],
                          seed=None)   # 8x8 = 64 output pixels, then 6x6 = 36
    assert small.set_conv_algo("auto") == {"conv1": "winograd", "conv2": "im2col"}
    with pytest.raises(ValueError, match="conv_algo must be one of auto, im2col, winograd"):
        digits.set_conv_algo("fast")


def test_conv_algo_config_is_checked():
    assert FitConfig().conv_algo == "auto"
    FitConfig(conv_algo="winograd", filters=[8, 8], kernel_sizes=[5, 3]).validate()
    with pytest.raises(ConfigError, match="conv_algo: got 'fft', expected auto or im2col or winograd"):
        FitConfig(conv_algo="fft").validate()
    with pytest.raises(ConfigError, match="no conv layer has a 3x3 kernel with stride 1"):
        FitConfig(conv_algo="winograd", filters=[8, 8], kernel_sizes=[5], strides=[1]).validate()
    with pytest.raises(ConfigError, match="no conv layer has a 3x3 kernel with stride 1"):
        FitConfig(conv_algo="winograd", kernel_sizes=[3], strides=[2]).validate()


# ----------------------------------------------------------------------------- PyTorch

@pytest.mark.parametrize("x_shape, filters, padding", SHAPES[::2], ids=SHAPE_IDS[::2])
def test_matches_torch(x_shape, filters, padding):
    torch = pytest.importorskip("torch")
    x, w, b, rng = problem(x_shape, filters, np.float64, seed=4)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    out_t = torch.nn.functional.conv2d(xt, wt, bt, padding=padding)
    out = kernels.conv2d_forward(x, w, b, padding=padding, algo="winograd")
    assert rel_err(out, out_t.detach().numpy()) <= 1e-12
    dout = rng.standard_normal(out.shape)
    out_t.backward(torch.tensor(dout))
    dx, dw, db = kernels.conv2d_backward(x, dout.copy(), w, padding=padding, algo="winograd")
    assert rel_err(dx, xt.grad.numpy()) <= 1e-12
    assert rel_err(dw, wt.grad.numpy()) <= 1e-12
    assert rel_err(db, bt.grad.numpy()) <= 1e-12
