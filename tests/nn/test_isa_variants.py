"""The x86-64-v3/v4 builds of the kernels compute what the portable build computes.

setup.py compiles ext/_conv.pyx and ext/_norm.pyx more than once (convtrain/nn/backend.py picks one per CPU); every
kernel entry point is run through each build this machine can execute and compared with the
baseline, on shapes that exercise the vector loops' remainders (odd widths, padding, strides):

* bit for bit: everything in float64 (all builds use BLAS there), and in float32 everything but
  the im2col convolution GEMMs (im2col, col2im, pooling, dense layers, ReLU, and the Winograd
  passes: their transforms only add and subtract, their GEMMs are BLAS's in every build), and
  batch norm's passes (built without fused multiply-adds);
* to float32 rounding (relative error <= 1e-5, the kernel tests' float32 bound against the
  float64 reference): the float32 convolution passes (forward, filter and input gradients).
  The x86-64-v3 and v4 builds run convtrain's own AVX2 / AVX-512 GEMM tiles (ext/gemm_kernels.h),
  whose summation order is not BLAS's and differs between vector widths; the portable build
  keeps BLAS and stays the reference. Each build still gives the same bits for any thread
  count (tests/nn/test_kernels.py, test_kernels_fused.py run on every build).
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import convtrain
from convtrain.nn import backend, kernels
from convtrain.nn.geometry import pair
from tests.support.numerics import rel_err

VARIANTS = [name for name in backend.available_builds() if name != "baseline"]
needs_variants = pytest.mark.skipif(not VARIANTS, reason="no x86-64-v3/v4 build runs on this CPU")

# (x, w, stride, padding): odd and non-square sizes so that vector loops have remainders
SHAPES = [
    ((5, 3, 32, 32), (7, 3, 5, 5), 1, 0),
    ((4, 6, 13, 11), (5, 6, 3, 2), 1, 1),
    ((3, 2, 17, 19), (4, 2, 3, 5), (2, 3), (1, 2)),
    ((9, 4, 8, 8), (16, 4, 3, 3), 1, 0),
    ((3, 5, 11, 9), (6, 5, 3, 3), 1, 1),
]


def _every_kernel(module, dtype, threads):
    """All kernel entry points on fixed inputs, through convtrain.nn.kernels bound to `module`."""
    saved = kernels._conv
    kernels._conv = module
    module.set_num_threads(threads)
    results = []
    try:
        with threadpool_limits(1):
            for k, (x_shape, w_shape, stride, padding) in enumerate(SHAPES):
                rng = np.random.default_rng(k)
                x = rng.standard_normal(x_shape).astype(dtype)
                w = rng.standard_normal(w_shape).astype(dtype)
                b = rng.standard_normal(w_shape[0]).astype(dtype)
                out = kernels.conv2d_forward(x, w, b, stride, padding, relu=True)
                # the gradient inputs come from the baseline's bits, not this build's output
                dout = rng.standard_normal(out.shape).astype(dtype)
                relu_out = np.maximum(rng.standard_normal(out.shape), 0).astype(dtype)
                results += [("im2col", kernels.im2col(x, w_shape[2:], stride, padding)),
                            ("conv", out),
                            ("col2im", kernels.col2im(kernels.im2col(x, w_shape[2:], stride, padding),
                                                      x.shape, w_shape[2:], stride, padding))]
                results += [("conv", r) for r in kernels.conv2d_backward(
                    x, dout.copy(), w, stride, padding, relu_out=relu_out)]
                results += [("conv", r) for r in kernels.conv2d_backward_filter(
                    x, dout, w_shape[2:], stride, padding)]
                results.append(("conv", kernels.conv2d_backward_input(dout, w, x.shape, stride, padding)))
                if kernels.winograd_applies(w_shape[2:], pair("stride", stride, 1)):
                    results += [("winograd", kernels.conv2d_forward(x, w, b, stride, padding, relu=True,
                                                                    algo="winograd"))]
                    results += [("winograd", r) for r in kernels.conv2d_backward(
                        x, dout.copy(), w, stride, padding, relu_out=relu_out, algo="winograd")]
                pooled, argmax = kernels.maxpool2d_forward(x, 2)
                results += [("pool", pooled), ("pool", argmax),
                            ("pool", kernels.maxpool2d_backward(pooled, argmax, x.shape))]
                flat = x.reshape(len(x), -1)
                dense_w = rng.standard_normal((10, flat.shape[1])).astype(dtype)
                logits = kernels.dense_forward(flat, dense_w, b[:1].repeat(10))
                results += [("dense", logits)]
                results += [("dense", r) for r in kernels.dense_backward(logits, flat, dense_w)]
                relu = kernels.relu_(x.copy())
                results += [("relu", relu), ("relu", kernels.relu_backward_(x.copy(), relu))]
    finally:
        kernels._conv = saved
    return results


@needs_variants
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_instruction_set_build_gives_the_baseline_bits(variant, dtype):
    threads = convtrain.get_num_threads()
    try:
        baseline = _every_kernel(backend.load_build("baseline"), dtype, threads)
        other = _every_kernel(backend.load_build(variant), dtype, threads)
    finally:
        convtrain.set_num_threads(threads)
    assert len(baseline) == len(other) > 40
    for (kind, expected), (_, got) in zip(baseline, other):
        assert expected.dtype == got.dtype and expected.shape == got.shape
        if kind == "conv" and dtype == np.float32 and backend.load_build(variant).compiled_with()["gemm_tiles"]:
            assert rel_err(got, expected) <= 1e-5, kind   # own GEMM tiles: another summation order
        else:
            np.testing.assert_array_equal(got, expected)


def _batch_norm_passes(module, dtype, threads):
    """Every batch-norm kernel of `module` (a build of ext/_norm.pyx) on rows short, long and
    of one value, in both layouts (channel by channel, image by image), with and without the
    fused ReLU."""
    results = []
    for k, shape in enumerate([(6, 5, 7), (5, 4, 99), (9, 3, 1), (4, 70, 1)]):
        rng = np.random.default_rng(k)
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        gamma, beta = rng.standard_normal(shape[1]).astype(dtype), rng.standard_normal(shape[1]).astype(dtype)
        for relu, by_images in itertools.product((False, True), (False, True)):
            out = np.empty_like(x)
            mean, var, inv_std = np.empty(shape[1]), np.empty(shape[1]), np.empty(shape[1])
            module.bn_train_forward(x, gamma, beta, out, mean, var, inv_std, 1e-5, relu, by_images, threads)
            g = rng.standard_normal(shape).astype(dtype)
            dgamma, dbeta = np.empty_like(gamma), np.empty_like(beta)
            module.bn_backward_(x, g, out, relu, mean, inv_std, gamma, dgamma, dbeta, by_images, threads)
            affine = np.empty_like(x)
            module.bn_affine_forward(x, gamma, beta, affine, relu, by_images, threads)
            results += [out, mean, var, inv_std, g, dgamma, dbeta, affine]
    return results


@needs_variants
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_instruction_set_build_gives_the_baseline_batch_norm_bits(variant, dtype):
    # built without fused multiply-adds (setup.py): the wider vectors may not round otherwise
    for threads in (1, 2):
        baseline = _batch_norm_passes(backend.load_build("baseline", "_norm"), dtype, threads)
        other = _batch_norm_passes(backend.load_build(variant, "_norm"), dtype, threads)
        assert backend.load_build(variant, "_norm").__name__.endswith(variant.replace("-", "_"))
        for expected, got in zip(baseline, other, strict=True):
            np.testing.assert_array_equal(got, expected)


def test_the_build_in_use_is_the_newest_this_cpu_runs():
    info = convtrain.build_info()
    assert info["isa_available"][-1] == "baseline"
    expected = os.environ.get(backend.ISA_ENV, "auto")
    assert info["isa"] == (info["isa_available"][0] if expected == "auto" else expected)


def _isa_in_a_child(setting):
    env = {**os.environ, backend.ISA_ENV: setting}
    child = subprocess.run([sys.executable, "-c", "import json, convtrain; i = convtrain.build_info(); "
                            "print(json.dumps([i['isa'], i['isa_available']]))"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    return (*json.loads(child.stdout), child.stderr)


def test_the_environment_can_ask_for_the_portable_build():
    isa, _, stderr = _isa_in_a_child("baseline")
    assert isa == "baseline" and not stderr


def test_asking_for_a_build_that_is_not_here_warns_and_takes_the_best_one():
    isa, available, stderr = _isa_in_a_child("x86-64-v9")
    assert isa == available[0]
    assert "CONVTRAIN_KERNEL_ISA='x86-64-v9' is not available here" in stderr


def test_the_kernels_load_their_blas_without_scipy_linalg_and_a_later_import_still_works():
    import subprocess
    import sys

    check = ("import sys\n"
             "from convtrain.nn import kernels\n"
             "assert 'scipy.linalg' not in sys.modules, 'the kernels imported scipy.linalg'\n"
             "blas = sys.modules['scipy.linalg.cython_blas']\n"
             "import scipy.linalg\n"
             "import scipy.linalg.cython_blas\n"
             "assert scipy.linalg.cython_blas is blas\n"
             "assert abs(scipy.linalg.det([[2.0, 0.0], [0.0, 3.0]]) - 6.0) < 1e-12\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
