"""The float32 GEMM tiles of the x86-64-v3/v4 builds (ext/gemm_kernels.h) on awkward shapes.

Every path is run against the lecture's float64 formulas (convtrain.nn.reference) at the kernel
tests' float32 bound, and at 1, 2 and 3 threads for the same bits:

* direct (one image per GEMM, >= 64 taps, <= 15% dropped columns): the image's
  own rows as M_X^im^T, with
  and without padding; at strides the rows of its phase planes (odd and even sizes, uneven
  strides and padding, non-square kernels); the input gradient's col2im in the tile's store
  where no column is dropped (1x1 kernels, stride 1);
* sizes that are not multiples of the tiles: filters (8 rows AVX-512, 6 AVX2), columns
  (48 / 16), taps (6 / 4), N = 1;
* beside them the shapes that keep BLAS in every build (few taps, grouped images).

In the portable build (BLAS) the same assertions hold; the tests run on every build
(CONVTRAIN_KERNEL_ISA=baseline | x86-64-v3 | x86-64-v4).
"""

import numpy as np
import pytest

import convtrain
from convtrain.nn import kernels
from convtrain.nn import reference as ref
from tests.support.numerics import rel_err

FLOAT32_BOUND = 1e-5   # the kernel tests' float32 tolerance against the float64 reference

# (x_shape, w_shape, stride, padding)
SHAPES = [
    ((1, 8, 17, 33), (13, 8, 3, 5), 1, 0),         # N = 1, direct, F and taps off the tile
    ((3, 8, 20, 21), (9, 8, 3, 3), 1, 1),          # direct with padding
    ((2, 7, 15, 16), (17, 7, 5, 2), 1, (2, 1)),    # non-square kernel, uneven padding
    ((1, 70, 8, 50), (3, 70, 1, 1), 1, 0),         # 1x1: no dropped columns, tiled input gradient
    ((2, 65, 6, 30), (11, 65, 1, 1), 1, 0),        # ... with 65 taps (rows off the tile)
    ((2, 33, 12, 16), (50, 33, 3, 3), 1, 0),       # many channels, 50 filters
    ((2, 33, 12, 12), (50, 33, 3, 3), 1, 0),       # 20% of the columns dropped: BLAS
    ((2, 1, 30, 30), (20, 1, 5, 5), 1, 0),         # 25 taps: BLAS (MNIST conv1-like)
    ((4, 3, 19, 18), (6, 3, 3, 3), 2, 1),          # stride 2, 27 taps: BLAS
    ((3, 16, 32, 32), (32, 16, 3, 3), 2, 1),       # stride 2 direct (ResNet-8 res2.conv1)
    ((2, 9, 17, 35), (13, 9, 3, 3), 2, 1),         # stride 2 direct, odd sizes
    ((2, 8, 20, 33), (9, 8, 4, 3), 2, (1, 0)),     # even kernel height, uneven padding
    ((2, 5, 19, 40), (7, 5, 3, 5), (3, 2), (2, 1)),  # strides 3x2, 5 wide
    ((2, 70, 9, 17), (5, 70, 1, 1), 2, 0),         # 1x1 stride 2, 70 taps: direct
    ((32, 8, 16, 15), (4, 8, 3, 3), 2, 1),         # stride 2, 8x8 outputs: BLAS, one image a GEMM
    ((32, 8, 8, 8), (4, 8, 3, 3), 1, 1),           # stride 1, 8x8 outputs: BLAS, in groups
    ((3, 2, 21, 17), (10, 2, 4, 3), (3, 2), (0, 1)),
    ((40, 4, 7, 9), (11, 4, 2, 3), 1, 0),          # groups of small images: BLAS
]
IDS = [f"x{s[0]}-w{s[1]}-s{s[2]}-p{s[3]}" for s in SHAPES]


def problem(x_shape, w_shape, stride, padding, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    dout = rng.standard_normal(kernels.conv2d_output_shape(x_shape, w_shape, stride, padding))
    return x, w, b, dout


def float32_passes(x, w, b, dout, stride, padding):
    f32 = [a.astype(np.float32) for a in (x, w, b, dout)]
    x32, w32, b32, d32 = f32
    out = kernels.conv2d_forward(x32, w32, b32, stride, padding)
    relu = kernels.conv2d_forward(x32, w32, b32, stride, padding, relu=True)
    dw, db = kernels.conv2d_backward_filter(x32, d32, w.shape[2:], stride, padding)
    dx = kernels.conv2d_backward_input(d32, w32, x.shape, stride, padding)
    fused = kernels.conv2d_backward(x32, d32.copy(), w32, stride, padding)
    return out, relu, dw, db, dx, fused


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES, ids=IDS)
def test_float32_passes_match_the_float64_formulas(x_shape, w_shape, stride, padding):
    x, w, b, dout = problem(x_shape, w_shape, stride, padding)
    out, relu, dw, db, dx, (dx2, dw2, db2) = float32_passes(x, w, b, dout, stride, padding)
    expected = ref.conv_forward(x, w, b, stride, padding)
    assert rel_err(out, expected) <= FLOAT32_BOUND
    np.testing.assert_array_equal(relu, np.maximum(out, 0))
    dw_ref, db_ref = ref.filter_grad(x, dout, w_shape[2:], stride, padding)
    assert rel_err(dw, dw_ref) <= FLOAT32_BOUND
    assert rel_err(db, db_ref) <= FLOAT32_BOUND
    assert rel_err(dx, ref.input_grad(dout, w, x_shape, stride, padding)) <= FLOAT32_BOUND
    # the one-pass backward runs the same tiles in the same order
    for got, want in ((dx2, dx), (dw2, dw), (db2, db)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES[::2], ids=IDS[::2])
def test_float32_passes_give_the_same_bits_for_any_thread_count(x_shape, w_shape, stride, padding):
    x, w, b, dout = problem(x_shape, w_shape, stride, padding, seed=1)
    before = convtrain.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 3):
            convtrain.set_num_threads(n)
            out, relu, dw, db, dx, fused = float32_passes(x, w, b, dout, stride, padding)
            results[n] = (out, relu, dw, db, dx, *fused)
    finally:
        convtrain.set_num_threads(before)
    for one, two, three in zip(results[1], results[2], results[3]):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)


def test_images_per_gemm():
    assert kernels._plan(100, 64, 2)[1] == 4                  # 8x8 outputs: grouped
    assert kernels._plan(100, 64, 2, strided=True)[1] == 1    # ... but one at a time at strides
    assert kernels._plan(100, 36, 2, strided=True)[1] == 8    # 6x6: grouped at any stride
    assert kernels._plan(3, 16, 1)[1] == 1                    # at least MIN_GROUPS groups


def test_relu_in_the_tiles_store_keeps_nan_and_clears_negative_zero():
    x = np.zeros((1, 1, 4, 40), dtype=np.float32)
    w = np.ones((3, 1, 1, 1), dtype=np.float32)
    b = np.array([np.nan, -0.0, 2.0], dtype=np.float32)
    out = kernels.conv2d_forward(x, w, b, 1, 0, relu=True)
    assert np.isnan(out[0, 0]).all()
    assert (out[0, 1] == 0).all() and not np.signbit(out[0, 1]).any()
    assert (out[0, 2] == 2).all()
