"""convtrain.nn.kernels against the lecture's literal formulas (convtrain.nn.reference), numerical
gradients, thread counts, argument checks, and (if installed) PyTorch."""

import os

import numpy as np
import pytest

import convtrain
from convtrain.nn import kernels
from convtrain.nn import reference as ref
from tests.support.numerics import conv_problem, numerical_gradient, rel_err

# (x_shape, w_shape, stride, padding): non-square kernels and strides, padding, N=1, C=1, F=1,
# odd sizes, 1x1 kernels, kernels as large as the (padded) input
SHAPES = [
    ((2, 3, 7, 8), (4, 3, 3, 2), 1, 0),
    ((1, 1, 6, 6), (1, 1, 3, 3), 1, 0),
    ((3, 2, 9, 7), (5, 2, 2, 4), 2, 0),
    ((2, 3, 11, 10), (2, 3, 3, 3), 3, 1),
    ((2, 2, 9, 13), (3, 2, 4, 3), (2, 3), (1, 2)),
    ((1, 4, 5, 5), (3, 4, 1, 1), 1, 0),
    ((2, 3, 6, 7), (2, 3, 1, 1), 2, 1),
    ((2, 2, 5, 6), (3, 2, 5, 6), 1, 0),
    ((1, 2, 4, 3), (2, 2, 6, 5), 1, (1, 1)),
    ((3, 1, 13, 1), (2, 1, 5, 1), (2, 1), (0, 0)),
    ((2, 5, 8, 8), (7, 5, 3, 3), 1, 1),
    ((4, 3, 10, 9), (1, 3, 2, 5), (1, 2), (2, 0)),
    ((1, 1, 3, 3), (1, 1, 1, 3), (3, 1), (0, 2)),
]
SHAPE_IDS = [f"x{s[0]}-w{s[1]}-s{s[2]}-p{s[3]}" for s in SHAPES]
TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}


# ----------------------------------------------------------------------------- im2col / col2im

@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES, ids=SHAPE_IDS)
def test_im2col_is_the_transposed_mx_im_of_each_image(x_shape, w_shape, stride, padding):
    x, _, _, _ = conv_problem(x_shape, w_shape, np.float64)
    cols = kernels.im2col(x, w_shape[2:], stride, padding)
    for n in range(x_shape[0]):
        np.testing.assert_array_equal(cols[n].T, ref.mx_im(x[n], w_shape[2:], stride, padding))


def test_im2col_of_the_lecture_example():
    X = (10 * np.arange(1, 7)[:, None] + np.arange(1, 7)[None, :]).astype(np.float64)
    M = kernels.im2col(X[None, None], 3)[0].T
    assert M.shape == (16, 9)
    assert M[0].tolist() == [11, 12, 13, 21, 22, 23, 31, 32, 33]
    assert M[4].tolist() == [21, 22, 23, 31, 32, 33, 41, 42, 43]
    assert kernels.im2col(np.stack([X] * 4)[None], 3)[0].T.shape == (16, 36)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES, ids=SHAPE_IDS)
def test_col2im_is_the_adjoint_of_im2col(x_shape, w_shape, stride, padding, dtype):
    x, _, _, rng = conv_problem(x_shape, w_shape, dtype)
    cols = kernels.im2col(x, w_shape[2:], stride, padding)
    y = rng.standard_normal(cols.shape).astype(dtype)
    back = kernels.col2im(y, x_shape, w_shape[2:], stride, padding)
    assert back.shape == x_shape and back.dtype == dtype
    lhs = np.vdot(cols.astype(np.float64), y.astype(np.float64))
    rhs = np.vdot(x.astype(np.float64), back.astype(np.float64))
    assert abs(lhs - rhs) <= TOLERANCE[dtype] * (np.abs(cols).sum() * np.abs(y).max() + 1e-300)


# ----------------------------------------------------------------------------- against the lecture

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES, ids=SHAPE_IDS)
def test_kernels_match_the_lecture_formulas(x_shape, w_shape, stride, padding, dtype):
    x, w, b, rng = conv_problem(x_shape, w_shape, dtype, seed=len(x_shape) + sum(w_shape))
    tol = TOLERANCE[dtype]

    out = kernels.conv2d_forward(x, w, b, stride, padding)
    expected = ref.conv_forward(x, w, b, stride, padding)
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out, expected) <= tol
    assert rel_err(kernels.conv2d_forward(x, w, None, stride, padding),
                   ref.conv_forward(x, w, None, stride, padding)) <= tol

    dout = rng.standard_normal(out.shape).astype(dtype)
    dw, db = kernels.conv2d_backward_filter(x, dout, w_shape[2:], stride, padding)
    dw_ref, db_ref = ref.filter_grad(x, dout, w_shape[2:], stride, padding)
    assert dw.dtype == dtype and db.dtype == dtype and dw.shape == w_shape and db.shape == (w_shape[0],)
    assert rel_err(dw, dw_ref) <= tol
    assert rel_err(db, db_ref) <= tol

    dx = kernels.conv2d_backward_input(dout, w, x_shape, stride, padding)
    dx_ref = ref.input_grad(dout, w, x_shape, stride, padding)
    assert dx.dtype == dtype and dx.shape == x_shape
    assert rel_err(dx, dx_ref) <= tol


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES[:6], ids=SHAPE_IDS[:6])
def test_kernels_match_the_correlation_and_rot180_forms(x_shape, w_shape, stride, padding):
    x, w, _, rng = conv_problem(x_shape, w_shape, np.float64, seed=3)
    out = kernels.conv2d_forward(x, w, None, stride, padding)
    dout = rng.standard_normal(out.shape)
    dw, _ = kernels.conv2d_backward_filter(x, dout, w_shape[2:], stride, padding)
    assert rel_err(dw, ref.filter_grad_by_correlation(x, dout, w_shape[2:], stride, padding)) <= 1e-12
    dx = kernels.conv2d_backward_input(dout, w, x_shape, stride, padding)
    assert rel_err(dx, ref.input_grad_by_full_convolution(dout, w, x_shape, stride, padding)) <= 1e-12


def test_batch_larger_than_threads_and_non_contiguous_inputs():
    x, w, b, rng = conv_problem((9, 3, 12, 11), (5, 3, 3, 3), np.float64, seed=9)
    x_strided = np.asfortranarray(x)
    w_view = np.ascontiguousarray(w.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    out = kernels.conv2d_forward(x_strided, w_view, b, 2, 1)
    assert rel_err(out, ref.conv_forward(x, w, b, 2, 1)) <= 1e-12
    dout = rng.standard_normal(out.shape)[:, :, :, :]
    dout_view = np.ascontiguousarray(dout[:, ::-1])[:, ::-1]
    dw, db = kernels.conv2d_backward_filter(x_strided, dout_view, 3, 2, 1)
    dw_ref, db_ref = ref.filter_grad(x, dout, 3, 2, 1)
    assert rel_err(dw, dw_ref) <= 1e-12 and rel_err(db, db_ref) <= 1e-12
    dx = kernels.conv2d_backward_input(dout_view, w_view, x.shape, 2, 1)
    assert rel_err(dx, ref.input_grad(dout, w, x.shape, 2, 1)) <= 1e-12


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding",
    [
        ((37, 2, 18, 18), (3, 2, 3, 2), 1, 0),    # 16x17 outputs: one image per GEMM, > 16 chunks
        ((35, 2, 7, 6), (3, 2, 2, 3), 1, 1),      # small outputs: images grouped, short last group
        ((50, 1, 5, 5), (2, 1, 5, 5), 1, 0),      # 1x1 outputs: all images in one GEMM
    ],
)
def test_grouped_and_chunked_batches(x_shape, w_shape, stride, padding):
    x, w, b, rng = conv_problem(x_shape, w_shape, np.float64, seed=21)
    out = kernels.conv2d_forward(x, w, b, stride, padding)
    assert rel_err(out, ref.conv_forward(x, w, b, stride, padding)) <= 1e-12
    dout = rng.standard_normal(out.shape)
    dw, db = kernels.conv2d_backward_filter(x, dout, w_shape[2:], stride, padding)
    dw_ref, db_ref = ref.filter_grad(x, dout, w_shape[2:], stride, padding)
    assert rel_err(dw, dw_ref) <= 1e-12 and rel_err(db, db_ref) <= 1e-12
    dx = kernels.conv2d_backward_input(dout, w, x_shape, stride, padding)
    assert rel_err(dx, ref.input_grad(dout, w, x_shape, stride, padding)) <= 1e-12


def test_empty_batch():
    x = np.zeros((0, 2, 5, 5))
    w = np.ones((3, 2, 3, 3))
    assert kernels.conv2d_forward(x, w, None).shape == (0, 3, 3, 3)
    dw, db = kernels.conv2d_backward_filter(x, np.zeros((0, 3, 3, 3)), 3)
    assert not dw.any() and not db.any() and dw.shape == w.shape
    assert kernels.conv2d_backward_input(np.zeros((0, 3, 3, 3)), w, x.shape).shape == x.shape


def test_output_shape_helpers():
    assert kernels.conv2d_output_shape((7, 3, 32, 30), (8, 3, 5, 3), stride=(2, 1), padding=1) == (7, 8, 15, 30)
    assert kernels.maxpool2d_output_shape((2, 4, 9, 8), 2) == (2, 4, 4, 4)
    assert kernels.maxpool2d_output_shape((2, 4, 9, 8), 3, stride=2) == (2, 4, 4, 3)


# ----------------------------------------------------------------------------- numerical gradients

def scalar_loss(out, weights):
    """L = sum(weights * tanh(out)): nonlinear, so the check exercises more than linearity."""
    return float(np.sum(weights * np.tanh(out)))


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding",
    [((2, 3, 7, 6), (4, 3, 3, 2), 1, 0), ((2, 2, 8, 9), (3, 2, 2, 3), (2, 3), (1, 2))],
)
def test_gradients_match_centered_differences(x_shape, w_shape, stride, padding):
    x, w, b, rng = conv_problem(x_shape, w_shape, np.float64, seed=11)
    x, w, b = 0.5 * x, 0.5 * w, 0.5 * b
    out = kernels.conv2d_forward(x, w, b, stride, padding)
    weights = rng.standard_normal(out.shape)

    def loss():
        return scalar_loss(kernels.conv2d_forward(x, w, b, stride, padding), weights)

    dout = weights * (1 - np.tanh(out) ** 2)  # dL/dout
    dw, db = kernels.conv2d_backward_filter(x, dout, w_shape[2:], stride, padding)
    dx = kernels.conv2d_backward_input(dout, w, x_shape, stride, padding)
    for analytic, param in ((dx, x), (dw, w), (db, b)):
        numeric = numerical_gradient(loss, param)
        assert rel_err(analytic, numeric) <= 1e-7


# ----------------------------------------------------------------------------- threads

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape, stride", [((7, 3, 12, 10), 2), ((23, 2, 20, 19), 1)])
def test_one_and_two_threads_give_the_same_bits(threads, dtype, x_shape, stride):
    # the work split depends on the batch only, never on the thread count
    x, w, b, rng = conv_problem(x_shape, (6, x_shape[1], 3, 2), dtype, seed=5)
    out_shape = kernels.conv2d_output_shape(x.shape, w.shape, stride, 1)
    dout = rng.standard_normal(out_shape).astype(dtype)
    results = {}
    for n in (1, 2, 3):
        convtrain.set_num_threads(n)
        assert convtrain.get_num_threads() == (n if convtrain.build_info()["openmp"] else 1)
        results[n] = (
            kernels.conv2d_forward(x, w, b, stride, 1),
            *kernels.conv2d_backward_filter(x, dout, (3, 2), stride, 1),
            kernels.conv2d_backward_input(dout, w, x.shape, stride, 1),
            kernels.im2col(x, (3, 2), stride, 1),
            kernels.col2im(kernels.im2col(x, (3, 2), stride, 1), x.shape, (3, 2), stride, 1),
            *kernels.maxpool2d_forward(x, 2),
            kernels.maxpool2d_backward(*kernels.maxpool2d_forward(x, 2), x.shape),
        )
    for one, two, three in zip(results[1], results[2], results[3]):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)


def test_thread_settings_and_build_info(threads):
    info = convtrain.build_info()
    assert {"cython", "openmp", "max_threads", "num_threads", "blas"} <= set(info)
    assert isinstance(info["openmp"], bool) and info["max_threads"] >= 1
    with pytest.raises(ValueError, match="n must be"):
        convtrain.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be"):
        convtrain.set_num_threads(1.5)


def _kernels_in_a_child(queue):
    x, w, _, _ = conv_problem((6, 2, 12, 12), (3, 2, 3, 3), np.float64)
    out = kernels.conv2d_forward(x, w, None)
    kernels.conv2d_backward_filter(x, out, 3)
    kernels.maxpool2d_forward(x, 2)
    queue.put((convtrain.get_num_threads(), float(out.sum())))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_after_multithreaded_kernels_does_not_hang(threads):
    import multiprocessing

    convtrain.set_num_threads(2)
    x, w, _, _ = conv_problem((6, 2, 12, 12), (3, 2, 3, 3), np.float64)
    expected = float(kernels.conv2d_forward(x, w, None).sum())  # starts the OpenMP team
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_kernels_in_a_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a kernel (GNU OpenMP after fork)")
    assert child.exitcode == 0
    child_threads, child_sum = queue.get(timeout=5)
    assert child_sum == pytest.approx(expected, rel=1e-12)
    if convtrain.build_info()["openmp"]:
        assert child_threads == 1


def test_blas_threads_are_restored_after_kernel_calls():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]
    x, w, b, rng = conv_problem((4, 2, 20, 20), (3, 2, 3, 3), np.float64)
    out = kernels.conv2d_forward(x, w, b)
    kernels.conv2d_backward_filter(x, out, 3)
    kernels.conv2d_backward_input(out, w, x.shape)
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info()] == before
    assert all(lib["pinned_during_kernels"] in ("c", "python", "not needed")
               for lib in convtrain.build_info()["blas"])


# ----------------------------------------------------------------------------- bad arguments

X64 = np.zeros((2, 3, 8, 8))
W64 = np.zeros((4, 3, 3, 3))
DOUT64 = np.zeros((2, 4, 6, 6))


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: kernels.conv2d_forward(X64.tolist(), W64, None), TypeError, "x must be a numpy"),
        (lambda: kernels.conv2d_forward(X64.astype(np.int64), W64, None), TypeError, "x must have dtype"),
        (lambda: kernels.conv2d_forward(X64.astype(np.float16), W64, None), TypeError, "float16"),
        (lambda: kernels.conv2d_forward(X64, W64.astype(np.float32), None), TypeError, "w has dtype float32"),
        (lambda: kernels.conv2d_forward(X64, W64, np.zeros(4, np.float32)), TypeError, "b has dtype"),
        (lambda: kernels.conv2d_forward(X64[0], W64, None), ValueError, "x must be 4-D"),
        (lambda: kernels.conv2d_forward(X64, W64[0], None), ValueError, "w must be 4-D"),
        (lambda: kernels.conv2d_forward(X64, W64[:, :2], None), ValueError, "2 input channels"),
        (lambda: kernels.conv2d_forward(X64, W64, np.zeros(3)), ValueError, r"b must have shape \(4,\)"),
        (lambda: kernels.conv2d_forward(X64, np.zeros((4, 3, 9, 3)), None), ValueError, "larger than the padded input"),
        (lambda: kernels.conv2d_forward(X64, np.zeros((4, 3, 10, 3)), None, padding=0), ValueError, r"\(10, 3\)"),
        (lambda: kernels.conv2d_forward(X64, W64, None, stride=0), ValueError, "stride must be >= 1"),
        (lambda: kernels.conv2d_forward(X64, W64, None, stride=(1, -2)), ValueError, r"stride must be >= 1.*\(1, -2\)"),
        (lambda: kernels.conv2d_forward(X64, W64, None, stride=1.0), TypeError, "stride must be an int"),
        (lambda: kernels.conv2d_forward(X64, W64, None, stride=(1, 2, 3)), ValueError, "stride must be an int or a pair"),
        (lambda: kernels.conv2d_forward(X64, W64, None, stride=True), TypeError, "stride"),
        (lambda: kernels.conv2d_forward(X64, W64, None, padding=-1), ValueError, "padding must be >= 0"),
        (lambda: kernels.conv2d_forward(X64, W64, None, padding="1"), TypeError, "padding"),
        (lambda: kernels.conv2d_forward(np.zeros((2, 0, 8, 8)), np.zeros((4, 0, 3, 3)), None), ValueError, "channel"),
        (lambda: kernels.conv2d_forward(X64, np.zeros((0, 3, 3, 3)), None), ValueError, "filter"),
        (lambda: kernels.conv2d_forward(X64, np.zeros((4, 3, 0, 3)), None), ValueError, "kernel_size must be >= 1"),
        (lambda: kernels.conv2d_backward_filter(X64, DOUT64, 0), ValueError, "kernel_size must be >= 1"),
        (lambda: kernels.conv2d_backward_filter(X64, DOUT64, 3, stride=0), ValueError, "stride"),
        (lambda: kernels.conv2d_backward_filter(X64, DOUT64[:, :, :5], 3), ValueError, r"dout has shape \(2, 4, 5, 6\), expected \(2, 4, 6, 6\)"),
        (lambda: kernels.conv2d_backward_filter(X64, DOUT64[:1], 3), ValueError, "dout has shape"),
        (lambda: kernels.conv2d_backward_filter(X64, DOUT64.astype(np.float32), 3), TypeError, "dout has dtype float32"),
        (lambda: kernels.conv2d_backward_filter(X64, DOUT64, 9), ValueError, "larger than the padded input"),
        (lambda: kernels.conv2d_backward_filter(X64, DOUT64, (3, 3, 3)), ValueError, "kernel_size"),
        (lambda: kernels.conv2d_backward_input(DOUT64, W64, (2, 3, 8)), ValueError, "x_shape must be 4"),
        (lambda: kernels.conv2d_backward_input(DOUT64, W64, (2, 3, 8, 8.0)), TypeError, "x_shape"),
        (lambda: kernels.conv2d_backward_input(DOUT64, W64, (2, 2, 8, 8)), ValueError, "3 input channels"),
        (lambda: kernels.conv2d_backward_input(DOUT64, W64, (2, 3, 9, 8)), ValueError, "dout has shape"),
        (lambda: kernels.conv2d_backward_input(DOUT64, W64.astype(np.float32), X64.shape), TypeError, "w has dtype"),
        (lambda: kernels.conv2d_backward_input(DOUT64, W64, X64.shape, padding=(1,)), ValueError, "padding"),
        (lambda: kernels.conv2d_backward_input(np.zeros((2, 4, 6, 9)), np.zeros((4, 3, 3, 0)), X64.shape), ValueError, "kernel_size must be >= 1"),
        (lambda: kernels.im2col(X64, 3, stride=0), ValueError, "stride"),
        (lambda: kernels.im2col(X64, (3, 11)), ValueError, "larger than the padded input"),
        (lambda: kernels.im2col(X64[0], 3), ValueError, "x must be 4-D"),
        (lambda: kernels.col2im(np.zeros((2, 27, 35)), X64.shape, 3), ValueError, r"cols has shape \(2, 27, 35\), expected \(2, 27, 36\)"),
        (lambda: kernels.col2im(np.zeros((2, 27, 36), np.int32), X64.shape, 3), TypeError, "cols must have dtype"),
        (lambda: kernels.maxpool2d_forward(X64, 0), ValueError, "size must be >= 1"),
        (lambda: kernels.maxpool2d_forward(X64, 9), ValueError, "size"),
        (lambda: kernels.maxpool2d_forward(X64, 2, stride=0), ValueError, "stride must be >= 1"),
        (lambda: kernels.maxpool2d_forward(X64.astype(np.int8), 2), TypeError, "x must have dtype"),
        (lambda: kernels.maxpool2d_backward(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4), np.int32), X64.shape), TypeError, "argmax"),
        (lambda: kernels.maxpool2d_backward(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 3), np.intp), X64.shape), ValueError, "argmax has shape"),
        (lambda: kernels.maxpool2d_backward(np.zeros((2, 3, 4, 4)), np.full((2, 3, 4, 4), 64, np.intp), X64.shape), ValueError, "outside"),
        (lambda: kernels.maxpool2d_backward(np.zeros((2, 3, 4, 4)), np.full((2, 3, 4, 4), -1, np.intp), X64.shape), ValueError, "outside"),
        (lambda: kernels.maxpool2d_backward(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4), np.intp), (2, 4, 8, 8)), ValueError, "dout has shape"),
    ],
)
def test_bad_arguments_raise_and_say_what_was_expected(call, error, words):
    with pytest.raises(error, match=words):
        call()


# ----------------------------------------------------------------------------- max pooling

POOL_CASES = [((2, 3, 8, 8), 2, None), ((1, 2, 9, 7), 3, 2), ((2, 1, 7, 10), (2, 3), (1, 2)),
              ((3, 2, 5, 5), 5, 1), ((1, 1, 6, 6), 1, 1), ((2, 2, 9, 9), 2, 3)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape, size, stride", POOL_CASES)
def test_maxpool_matches_the_reference(x_shape, size, stride, dtype):
    rng = np.random.default_rng(1)
    x = rng.permutation(np.prod(x_shape)).reshape(x_shape).astype(dtype)  # distinct: no ties
    out, argmax = kernels.maxpool2d_forward(x, size, stride)
    out_ref, argmax_ref = ref.maxpool_forward(x, size, stride)
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    assert out.dtype == dtype and argmax.dtype == np.intp
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = kernels.maxpool2d_backward(dout, argmax, x_shape)
    np.testing.assert_allclose(dx, ref.maxpool_backward(dout, argmax_ref, x_shape), rtol=1e-6)


def test_maxpool_ties_pick_the_first_and_nan_propagates():
    x = np.zeros((1, 1, 2, 6))
    x[0, 0, 1, 3] = np.nan
    x[0, 0, 0, 4] = 5.0
    x[0, 0, :, 5] = [np.nan, np.nan]
    out, argmax = kernels.maxpool2d_forward(x, 2)
    assert out[0, 0, 0, 0] == 0 and argmax[0, 0, 0, 0] == 0
    assert np.isnan(out[0, 0, 0, 1]) and argmax[0, 0, 0, 1] == 9    # a NaN wins
    assert np.isnan(out[0, 0, 0, 2]) and argmax[0, 0, 0, 2] == 5    # the first NaN wins


def test_maxpool_gradient_matches_centered_differences():
    rng = np.random.default_rng(2)
    x_shape = (2, 2, 7, 6)
    # distinct values spaced far apart compared to h, so no window changes its winner
    x = rng.permutation(np.prod(x_shape)).reshape(x_shape).astype(np.float64) * 0.01
    out, argmax = kernels.maxpool2d_forward(x, 3, 2)
    weights = rng.standard_normal(out.shape)

    def loss():
        return scalar_loss(kernels.maxpool2d_forward(x, 3, 2)[0], weights)

    dx = kernels.maxpool2d_backward(weights * (1 - np.tanh(out) ** 2), argmax, x_shape)
    assert rel_err(dx, numerical_gradient(loss, x)) <= 1e-7


# ----------------------------------------------------------------------------- PyTorch

@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES[::2], ids=SHAPE_IDS[::2])
def test_matches_torch(x_shape, w_shape, stride, padding):
    torch = pytest.importorskip("torch")
    x, w, b, rng = conv_problem(x_shape, w_shape, np.float64, seed=4)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    out_t = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding)
    out = kernels.conv2d_forward(x, w, b, stride, padding)
    assert rel_err(out, out_t.detach().numpy()) <= 1e-12
    dout = rng.standard_normal(out.shape)
    out_t.backward(torch.tensor(dout))
    dw, db = kernels.conv2d_backward_filter(x, dout, w_shape[2:], stride, padding)
    dx = kernels.conv2d_backward_input(dout, w, x_shape, stride, padding)
    assert rel_err(dw, wt.grad.numpy()) <= 1e-12
    assert rel_err(db, bt.grad.numpy()) <= 1e-12
    assert rel_err(dx, xt.grad.numpy()) <= 1e-12


def test_maxpool_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 9, 8))
    out, argmax = kernels.maxpool2d_forward(x, 3, 2)
    xt = torch.tensor(x, requires_grad=True)
    out_t = torch.nn.functional.max_pool2d(xt, 3, 2)
    np.testing.assert_array_equal(out, out_t.detach().numpy())
    dout = rng.standard_normal(out.shape)
    out_t.backward(torch.tensor(dout))
    np.testing.assert_allclose(kernels.maxpool2d_backward(dout, argmax, x.shape), xt.grad.numpy(),
                               rtol=1e-12, atol=1e-15)


def test_filter_gradient_accepts_read_only_and_non_contiguous_dout():
    # The filter gradient runs through the fused backward kernel, which takes a writeable
    # dout; a read-only or Fortran-ordered gradient must give the same bits, untouched.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 2, 7, 6))
    dout = rng.standard_normal((3, 4, 4, 7))
    expected_dw, expected_db = kernels.conv2d_backward_filter(x, dout.copy(), (3, 2), stride=(2, 1), padding=1)
    frozen = dout.copy()
    frozen.flags.writeable = False
    for variant in (frozen, np.asfortranarray(dout)):
        dw, db = kernels.conv2d_backward_filter(x, variant, (3, 2), stride=(2, 1), padding=1)
        assert np.array_equal(dw, expected_dw) and np.array_equal(db, expected_db)
    assert np.array_equal(frozen, dout)
