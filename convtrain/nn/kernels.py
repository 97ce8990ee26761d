"""Fast 2-D convolution and max pooling: checked, typed wrappers over the compiled ext/_conv.

Conventions (as in PyTorch and Caffe):

* images are NCHW ``(N, C, H, W)``; filters ``(F, C, kh, kw)``; biases ``(F,)``;
* float32 or float64, all arguments of one call in the same dtype (no silent casts);
* ``kernel_size``, ``stride`` and ``padding`` are an int or an ``(h, w)`` pair; padding is zero
  padding on both sides; the output is ``Ho = (H + 2*ph - kh) // sh + 1`` (likewise Wo);
* "convolution" is the lecture's ``*``: a correlation, ``S[f, l, m] = sum_{c,i,j}
  X[c, l*sh + i - ph, m*sw + j - pw] F[f, c, i, j]`` (no filter flip).

im2col column order (the lecture's vec ordering): ``cols[n]`` has one row per filter tap
``(c, i, j)``, row index ``(c*kh + i)*kw + j`` (channel blocks, then the kernel row-major), and one
column per output position ``(oh, ow)``, column index ``oh*Wo + ow``. So ``cols[n].T`` is the
lecture's M_X^im of image n, ``(M_X1 M_X2 ...)`` of size (Ho*Wo) x (C*kh*kw); for a 6x6 X and a
3x3 F its first row is (X11 X12 X13 X21 X22 X23 X31 X32 X33). Then
``out[n].reshape(F, -1) = w.reshape(F, -1) @ cols[n]`` (vec(S_f) = M_X^im vec(F_f)),
``dw = sum_n dout[n] @ cols[n].T`` (dL/dF = X * G) and
``dx[n] = col2im(w.reshape(F, -1).T @ dout[n])`` (dL/dX = G_zero-pad * F_rot180).

Two algorithms compute the same convolutions: im2col + GEMM (above; every shape) and, for 3x3
kernels with stride 1, Winograd F(2x2, 3x3) (``algo="winograd"``, ext/winograd.pxi): 16
products per 2x2 output tile and channel pair instead of 36, as 16 GEMMs per image; the rule
conv_algo "auto" applies per layer is ``choose_conv_algo``.

Inputs that are not C-contiguous (or not in native byte order) are copied once; outputs are
new C-contiguous arrays. Threads: ``convtrain.set_num_threads``; the kernels hand groups of
images to OpenMP threads, each running single-threaded GEMMs (BLAS is pinned to one thread
while they run, see convtrain.nn.backend); in the AVX2 / AVX-512 builds float32 stride-1
convolutions run on convtrain's own GEMM tiles instead, reading the image directly (ext/_conv.pyx,
ext/gemm_kernels.h). Results do not depend on the thread count, bit for bit.
A process forked after a multithreaded kernel call runs the kernels on 1 thread (GNU OpenMP
cannot start threads again after fork); use spawn/forkserver for multithreaded workers.
"""

import operator

import numpy as np

from convtrain.nn.backend import blas_pinned_to_one_thread, compiled
from convtrain.nn.choices import CONV_ALGOS
from convtrain.nn.geometry import output_size, pair

_conv = compiled()  # the build this CPU runs, loaded after OpenMP's environment is set

__all__ = [
    "im2col",
    "col2im",
    "conv2d_forward",
    "conv2d_backward_filter",
    "conv2d_backward_input",
    "conv2d_backward",
    "CONV_ALGOS",
    "winograd_applies",
    "choose_conv_algo",
    "choose_conv_algos",
    "relu_",
    "relu_backward_",
    "add_",
    "dense_forward",
    "dense_backward",
    "conv2d_output_shape",
    "maxpool2d_forward",
    "maxpool2d_backward",
    "maxpool2d_output_shape",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_BLAS_INT_MAX = 2**31 - 1  # GEMM dimensions are Fortran INTEGER (32-bit) in scipy's BLAS


# ----------------------------------------------------------------------------- argument checks

def _array(name, value, ndim, dtype=None):
    """A C-contiguous, native-order float32/float64 ndarray of the given ndim (and dtype)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray of float32 or float64, got {type(value).__name__}"
        )
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype} but the other arguments are {dtype}; "
            f"convert explicitly (no silent casts)"
        )
    if value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {value.shape} ({value.ndim}-D)")
    if not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
    return np.ascontiguousarray(value)


def _shape(name, value, length):
    """A tuple of `length` non-negative ints."""
    try:
        shape = tuple(operator.index(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of {length} ints, got {value!r}") from None
    if len(shape) != length or min(shape) < 0:
        raise ValueError(f"{name} must be {length} non-negative ints, got {value!r}")
    return shape


def _check_positive(name, value, what):
    if value < 1:
        raise ValueError(f"{name} must have at least one {what}, got shape {value}")


def _check_blas_dims(*dims):
    if max(dims) > _BLAS_INT_MAX:
        raise ValueError(
            f"a GEMM dimension of this convolution exceeds 2**31 - 1 ({max(dims)}); "
            f"split the input"
        )


def conv2d_output_shape(x_shape, w_shape, stride=1, padding=0):
    """(N, F, Ho, Wo) of conv2d_forward for x (N, C, H, W) and w (F, C, kh, kw)."""
    N, C, H, W = _shape("x_shape", x_shape, 4)
    F, Cw, kh, kw = _shape("w_shape", w_shape, 4)
    if C != Cw:
        raise ValueError(f"w_shape {tuple(w_shape)} has {Cw} input channels, x_shape has {C}")
    stride, padding = pair("stride", stride, 1), pair("padding", padding, 0)
    return (N, F) + output_size((H, W), pair("kernel_size", (kh, kw), 1), stride, padding)


# ----------------------------------------------------------------------------- im2col / col2im

def im2col(x, kernel_size, stride=1, padding=0):
    """cols (N, C*kh*kw, Ho*Wo): cols[n] = (M_X^im of x[n])^T, see the module docstring.

    cols[n, (c*kh + i)*kw + j, oh*Wo + ow] = x[n, c, oh*sh - ph + i, ow*sw - pw + j]
    (0 where that index falls into the padding).
    """
    x = _array("x", x, 4)
    kernel = pair("kernel_size", kernel_size, 1)
    stride, padding = pair("stride", stride, 1), pair("padding", padding, 0)
    N, C, H, W = x.shape
    Ho, Wo = output_size((H, W), kernel, stride, padding)
    cols = np.empty((N, C * kernel[0] * kernel[1], Ho * Wo), dtype=x.dtype)
    _conv.im2col(x, cols, *kernel, *stride, *padding)
    return cols


def col2im(cols, x_shape, kernel_size, stride=1, padding=0):
    """x (N, C, H, W): the exact adjoint of im2col (x = 0, then x[...] += cols[...]).

    <im2col(x), cols> == <x, col2im(cols)> for all x and cols; entries of cols that belong to
    the padding are dropped. cols must be (N, C*kh*kw, Ho*Wo).
    """
    cols = _array("cols", cols, 3)
    N, C, H, W = _shape("x_shape", x_shape, 4)
    kernel = pair("kernel_size", kernel_size, 1)
    stride, padding = pair("stride", stride, 1), pair("padding", padding, 0)
    Ho, Wo = output_size((H, W), kernel, stride, padding)
    expected = (N, C * kernel[0] * kernel[1], Ho * Wo)
    if cols.shape != expected:
        raise ValueError(
            f"cols has shape {cols.shape}, expected {expected} for x_shape {(N, C, H, W)}, "
            f"kernel_size {kernel}, stride {stride}, padding {padding}"
        )
    x = np.empty((N, C, H, W), dtype=cols.dtype)
    _conv.col2im(cols, x, *kernel, *stride, *padding)
    return x


# ----------------------------------------------------------------------------- convolution

# Images are processed in groups of G with G*Ho*Wo >= GEMM_MIN_COLUMNS (G = 1 from 16x16
# outputs up), so that small images still give GEMMs wide enough to run at BLAS speed.
GEMM_MIN_COLUMNS = 256
# ... but into no fewer than this many groups when the batch allows, so that the threads get
# equal shares (DIGITS conv2, P = 16, N = 100: 8 groups of 13 split 4/4 on 2 threads, where
# 7 groups of 16 split 4/3). Like G, this depends on N and P only, never on the threads, so
# the results stay the same bit for bit for any thread count.
MIN_GROUPS = 8
# The filter gradient accumulates into at most this many per-chunk buffers (see _conv).
FILTER_GRAD_CHUNKS = 16


# Strided convolutions take one image per GEMM from this many output pixels up: in groups of 4,
# ResNet-8's res3.conv1 (stride 2, 8x8 out) ran both its gradients in 10.2 ms against 8.0 one
# image at a time (its forward 3.8 against 4.0; its 1x1 stride-2 shortcut faster both ways),
# where MNIST conv2 (stride 1, 8x8 out) ran faster in groups (6.9 against 7.4).
STRIDED_MIN_COLUMNS = 64


def _plan(N, P, threads, strided=False):
    """(threads, G, groups): OpenMP threads, images per group, number of groups."""
    if strided and P >= STRIDED_MIN_COLUMNS:
        G = 1
    else:
        G = max(1, min(N, -(-GEMM_MIN_COLUMNS // P), -(-N // MIN_GROUPS)))
    groups = -(-N // G)
    return max(1, min(threads, groups)), G, groups


def _group_scratch(threads, G, rows, P, F, dtype):
    """Per-thread scratch: (rows, G*P) column matrices, and (F, G*P) staging for G > 1 (else None:
    one image's output or gradient is used where it lies)."""
    cols = np.empty((threads, rows * G * P), dtype=dtype)
    staging = np.empty((threads, F * G * P), dtype=dtype) if G > 1 else None
    return cols, staging


def conv2d_forward(x, w, b, stride=1, padding=0, relu=False, algo="im2col", row_stats=None):
    """out (N, F, Ho, Wo) = x * w + b (the lecture's S_f = X * F_f + b_f, for every image);
    with relu=True, max(x * w + b, 0) (np.maximum's bits), applied while each image's output
    is in cache instead of in a second pass over the batch.
    row_stats: None, or a float64 (N, F, 2) array the kernels fill with each output row's
    batch-norm statistics, (sum, sum of squared deviations from the row's own mean) of
    out[n, f], also while it is in cache (for the batch norm after the conv: norm.py).
    algo: "im2col" (below) or "winograd" (3x3 stride-1 filters only: Winograd F(2x2, 3x3),
    see winograd_forward).

    x (N, C, H, W), w (F, C, kh, kw), b (F,) or None (no bias); same dtype.
    Per image: out[n] = [w.reshape(F, -1) | b] @ [im2col(x[n]); ones], a GEMM of shape
    (F x C*kh*kw+1) . (C*kh*kw+1 x Ho*Wo); images with small outputs are grouped G at a time
    (G*Ho*Wo >= GEMM_MIN_COLUMNS) into one wider GEMM.
    Scratch: threads * (C*kh*kw + 1) * G*Ho*Wo elements of x's dtype (one group's im2col
    matrices per thread), plus threads * F * G*Ho*Wo when G > 1; independent of N.
    """
    x = _array("x", x, 4)
    w = _array("w", w, 4, x.dtype)
    N, C, H, W = x.shape
    F, Cw, kh, kw = w.shape
    _check_positive("x", C, "channel")
    _check_positive("w", F, "filter")
    if Cw != C:
        raise ValueError(
            f"w has shape {w.shape} with {Cw} input channels but x has {C} (shape {x.shape}); "
            f"expected w of shape (F, {C}, kh, kw)"
        )
    if min(kh, kw) < 1:
        raise ValueError(f"w has shape {w.shape}: kernel_size must be >= 1, got {(kh, kw)}")
    K = C * kh * kw
    bias = None
    if b is not None:
        bias = _array("b", b, 1, x.dtype)
        if bias.shape != (F,):
            raise ValueError(f"b must have shape ({F},) (one bias per filter), got {bias.shape}")
    stride, padding = pair("stride", stride, 1), pair("padding", padding, 0)
    Ho, Wo = output_size((H, W), (kh, kw), stride, padding)
    if row_stats is not None:
        if (not isinstance(row_stats, np.ndarray) or row_stats.dtype != np.float64
                or row_stats.shape != (N, F, 2) or not row_stats.flags.c_contiguous
                or not row_stats.flags.writeable):
            raise ValueError(f"row_stats must be a writeable C-contiguous float64 array of shape "
                             f"{(N, F, 2)}, got {getattr(row_stats, 'shape', type(row_stats).__name__)}")
    if _checked_algo(algo, (kh, kw), stride) == "winograd":
        return _winograd_forward(x, w, bias, padding, relu, row_stats)
    w_ext = w.reshape(F, K) if bias is None else np.concatenate([w.reshape(F, K), bias[:, None]], axis=1)
    out = np.empty((N, F, Ho, Wo), dtype=x.dtype)
    if N == 0:
        return out
    P = Ho * Wo
    threads, G, _ = _plan(N, P, _conv.get_num_threads(), stride != (1, 1))
    _check_blas_dims(F, K + 1, G * P)
    cols, staging = _group_scratch(threads, G, w_ext.shape[1], P, F, x.dtype)
    with blas_pinned_to_one_thread():
        _conv.conv2d_forward(x, w_ext, out, kh, kw, *stride, *padding, G, cols, staging, threads,
                             bool(relu), row_stats)
    return out


def conv2d_backward_filter(x, dout, kernel_size, stride=1, padding=0, algo="im2col"):
    """(dw (F, C, kh, kw), db (F,)): the gradients of the loss w.r.t. the filters and biases.

    dw[f] = sum_n x[n] * dout[n, f] (the lecture's dL/dF = X * G, i.e. g^T M_X^im),
    db[f] = sum_{n, oh, ow} dout[n, f, oh, ow]. x (N, C, H, W), dout (N, F, Ho, Wo), same dtype.
    One GEMM per group of images: dW_ext (F x C*kh*kw+1) += dout_group . [cols_group; ones]^T,
    whose last column is db. Race-free and deterministic: the batch is cut into at most
    FILTER_GRAD_CHUNKS chunks (independent of the thread count, so 1 and 2 threads give the same
    bits), each accumulated by one thread into its own buffer, summed in chunk order afterwards.
    Scratch: threads * (C*kh*kw + 1) * G*Ho*Wo elements of x's dtype (plus threads * F * G*Ho*Wo
    when G > 1) and chunks * F * (C*kh*kw + 1) for the accumulators; independent of N.
    algo "winograd" (3x3 stride-1 filters only): the same sums by Winograd F(2x2, 3x3)
    (winograd_backward_filter), chunked the same way.
    """
    x = _array("x", x, 4)
    dout = _array("dout", dout, 4, x.dtype)
    N, C, H, W = x.shape
    kh, kw = pair("kernel_size", kernel_size, 1)
    stride, padding = pair("stride", stride, 1), pair("padding", padding, 0)
    _check_positive("x", C, "channel")
    Ho, Wo = output_size((H, W), (kh, kw), stride, padding)
    F = dout.shape[1]
    _check_positive("dout", F, "channel (filter)")
    if dout.shape != (N, F, Ho, Wo):
        raise ValueError(
            f"dout has shape {dout.shape}, expected {(N, F, Ho, Wo)} for x of shape {x.shape}, "
            f"kernel_size {(kh, kw)}, stride {stride}, padding {padding}"
        )
    if _checked_algo(algo, (kh, kw), stride) == "winograd":
        return _winograd_backward_filter(x, dout, padding)
    K, P = C * kh * kw, Ho * Wo
    if N == 0:
        return np.zeros((F, C, kh, kw), dtype=x.dtype), np.zeros(F, dtype=x.dtype)
    threads, G, groups = _plan(N, P, _conv.get_num_threads(), stride != (1, 1))
    _check_blas_dims(F, K + 1, G * P)
    chunks = min(groups, FILTER_GRAD_CHUNKS)
    dw_ext = np.zeros((chunks, F * (K + 1)), dtype=x.dtype)
    cols, staging = _group_scratch(threads, G, K + 1, P, F, x.dtype)
    if not dout.flags.writeable:  # the fused kernel takes a writeable dout (it can mask it)
        dout = dout.copy()
    with blas_pinned_to_one_thread():  # no weights, ReLU output or dx: the filter gradient alone
        _conv.conv2d_backward(x, dout, None, None, dw_ext, None, kh, kw, *stride, *padding, G, cols,
                              staging, threads)
    total = (dw_ext[0] if chunks == 1 else dw_ext.sum(axis=0)).reshape(F, K + 1)
    return np.ascontiguousarray(total[:, :K]).reshape(F, C, kh, kw), total[:, K].copy()


def conv2d_backward_input(dout, w, x_shape, stride=1, padding=0, algo="im2col", norm_grad=None):
    """dx (N, C, H, W): the gradient of the loss w.r.t. the layer's input.

    dx[n] = col2im(w.reshape(F, -1).T @ dout[n]): the lecture's g^T M_F^filter, i.e. the full
    convolution G_zero-pad * F_rot180 summed over filters. dout (N, F, Ho, Wo), w (F, C, kh, kw),
    x_shape = (N, C, H, W) of the forward input (it fixes H, W when stride > 1).
    algo "winograd" (3x3 stride-1 filters only): the same full convolution by Winograd
    F(2x2, 3x3) (winograd_backward_input).
    norm_grad (algo "winograd" only): None, or (bn_x, bn_out, mean, part) when dx is the
    gradient w.r.t. the output of a batch norm with a fused ReLU: bn_x (N, C, H*W) its input,
    bn_out (N, C, H*W) its output, mean (C,) float64 its batch mean, part a float64 (N, C, 2)
    array to fill. Then each plane of dx is masked by bn_out > 0 in place and part[n, c] =
    (sum dx[n, c], sum dx[n, c] * (bn_x[n, c] - mean[c])) taken while it is in cache: the
    first pass of the batch norm's backward (norm.py), with its bits.
    Scratch: threads * C*kh*kw * G*Ho*Wo elements of dout's dtype (one group's column gradients
    per thread), plus threads * F * G*Ho*Wo when G > 1; independent of N.
    """
    dout = _array("dout", dout, 4)
    w = _array("w", w, 4, dout.dtype)
    N, C, H, W = _shape("x_shape", x_shape, 4)
    F, Cw, kh, kw = w.shape
    _check_positive("x_shape", C, "channel")
    _check_positive("w", F, "filter")
    if min(kh, kw) < 1:
        raise ValueError(f"w has shape {w.shape}: kernel_size must be >= 1, got {(kh, kw)}")
    if Cw != C:
        raise ValueError(
            f"w has shape {w.shape} with {Cw} input channels but x_shape {(N, C, H, W)} has {C}"
        )
    stride, padding = pair("stride", stride, 1), pair("padding", padding, 0)
    Ho, Wo = output_size((H, W), (kh, kw), stride, padding)
    if dout.shape != (N, F, Ho, Wo):
        raise ValueError(
            f"dout has shape {dout.shape}, expected {(N, F, Ho, Wo)} for x_shape {(N, C, H, W)}, "
            f"w of shape {w.shape}, stride {stride}, padding {padding}"
        )
    if _checked_algo(algo, (kh, kw), stride) == "winograd":
        return _winograd_backward_input(dout, w, (H, W), padding,
                                        _checked_norm_grad(norm_grad, (N, C, H, W), dout.dtype))
    if norm_grad is not None:
        raise ValueError("norm_grad goes with the input gradient by Winograd")
    dx = np.empty((N, C, H, W), dtype=dout.dtype)
    if N == 0:
        return dx
    K, P = C * kh * kw, Ho * Wo
    threads, G, _ = _plan(N, P, _conv.get_num_threads(), stride != (1, 1))
    _check_blas_dims(F, K, G * P)
    cols, staging = _group_scratch(threads, G, K, P, F, dout.dtype)
    with blas_pinned_to_one_thread():
        _conv.conv2d_backward_input(dout, w, dx, *stride, *padding, G, cols, staging, threads)
    return dx


def conv2d_backward(x, dout, w, stride=1, padding=0, relu_out=None, input_grad=True,
                    algo="im2col", filter_algo=None, norm_grad=None):
    """(dx or None, dw, db): conv2d_backward_input and conv2d_backward_filter in one pass over
    the batch, with the same bits, each image's dout used by both GEMMs while in cache.

    relu_out: the output of a ReLU applied to this layer's output (conv2d_forward(...,
    relu=True)); then dout is first replaced, in place, by where(relu_out > 0, dout, 0), the
    ReLU's backward (relu_backward_). So dout must be a C-contiguous array the caller lets go of. input_grad=False
    skips dx (the first layer's input is the data) and returns None for it.
    algo "winograd" (3x3 stride-1 filters only): dout masked in place (relu_backward_), then
    the filter and input gradients by Winograd F(2x2, 3x3), one pass each.
    filter_algo (default: algo): the filter gradient's algorithm, where it differs from the
    input gradient's (conv_algo "auto", choose_conv_algos): dout masked in place, then
    conv2d_backward_filter and conv2d_backward_input, each with its algorithm's bits.
    norm_grad: see conv2d_backward_input (algo "winograd" only).
    """
    x = _array("x", x, 4)
    w = _array("w", w, 4, x.dtype)
    if not isinstance(dout, np.ndarray) or dout.dtype != x.dtype or not dout.flags.c_contiguous \
            or not dout.flags.writeable or not dout.dtype.isnative:
        raise TypeError(
            f"dout must be a writeable C-contiguous {x.dtype} ndarray (it is masked in place), "
            f"got {type(dout).__name__}"
            + (f" of dtype {dout.dtype}" if isinstance(dout, np.ndarray) else ""))
    N, C, H, W = x.shape
    F, Cw, kh, kw = w.shape
    _check_positive("x", C, "channel")
    _check_positive("w", F, "filter")
    if Cw != C:
        raise ValueError(f"w has shape {w.shape} with {Cw} input channels but x has {C} "
                         f"(shape {x.shape}); expected w of shape (F, {C}, kh, kw)")
    stride, padding = pair("stride", stride, 1), pair("padding", padding, 0)
    Ho, Wo = output_size((H, W), (kh, kw), stride, padding)
    if dout.shape != (N, F, Ho, Wo):
        raise ValueError(
            f"dout has shape {dout.shape}, expected {(N, F, Ho, Wo)} for x of shape {x.shape}, "
            f"w of shape {w.shape}, stride {stride}, padding {padding}")
    if relu_out is not None:
        relu_out = _array("relu_out", relu_out, 4, x.dtype)
        if relu_out.shape != dout.shape:
            raise ValueError(f"relu_out has shape {relu_out.shape}, expected dout's shape {dout.shape}")
    filter_algo = _checked_algo(algo if filter_algo is None else filter_algo, (kh, kw), stride)
    if norm_grad is not None and (not input_grad or _checked_algo(algo, (kh, kw), stride) != "winograd"):
        raise ValueError("norm_grad goes with the input gradient by Winograd")
    if _checked_algo(algo, (kh, kw), stride) != filter_algo:
        if relu_out is not None:
            relu_backward_(dout, relu_out)
        dw, db = conv2d_backward_filter(x, dout, (kh, kw), stride, padding, algo=filter_algo)
        dx = (conv2d_backward_input(dout, w, x.shape, stride, padding, algo=algo, norm_grad=norm_grad)
              if input_grad else None)
        return dx, dw, db
    if algo == "winograd":
        if relu_out is not None:
            relu_backward_(dout, relu_out)
        dw, db = _winograd_backward_filter(x, dout, padding)
        dx = (_winograd_backward_input(dout, w, (H, W), padding, _checked_norm_grad(norm_grad, x.shape, x.dtype))
              if input_grad else None)
        return dx, dw, db
    dx = np.empty((N, C, H, W), dtype=x.dtype) if input_grad else None
    K, P = C * kh * kw, Ho * Wo
    if N == 0:
        return dx, np.zeros((F, C, kh, kw), dtype=x.dtype), np.zeros(F, dtype=x.dtype)
    threads, G, groups = _plan(N, P, _conv.get_num_threads(), stride != (1, 1))
    _check_blas_dims(F, K + 1, G * P)
    chunks = min(groups, FILTER_GRAD_CHUNKS)
    dw_ext = np.zeros((chunks, F * (K + 1)), dtype=x.dtype)
    cols, staging = _group_scratch(threads, G, K + 1, P, F, x.dtype)
    with blas_pinned_to_one_thread():
        _conv.conv2d_backward(x, dout, w.reshape(F, K) if input_grad else None, relu_out, dw_ext, dx,
                              kh, kw, *stride, *padding, G, cols, staging, threads)
    total = (dw_ext[0] if chunks == 1 else dw_ext.sum(axis=0)).reshape(F, K + 1)
    return dx, np.ascontiguousarray(total[:, :K]).reshape(F, C, kh, kw), total[:, K].copy()


# ----------------------------------------------------------------------------- Winograd

# The transformed tiles V (16, Cin, tiles) and their products M (16, Cout, tiles) are made a
# block of tile rows at a time, at most this many bytes of them (the block depends on the
# shapes only, never on the threads). Wider blocks make wider GEMMs, which won over keeping
# the block in L2 (CIFAR conv2's timings per block size: docs/performance.md). The bound only
# splits large images, to bound the scratch per thread.
WINOGRAD_BLOCK_BYTES = 4 * 1024 * 1024
# Small images are taken several at a time (whole images, their tiles side by side), so that
# the forward's and the input gradient's 16 GEMMs get at least this many columns where the
# batch allows (an 8x8 output has 20): no more images than make it, and no fewer than
# MIN_GROUPS groups (as im2col's). Measured on ResNet-8 (1 thread): 128 took res3.conv2's
# forward and input gradient 4.1 -> 3.5 ms each (res2.conv2's, in pairs, ~3%); 256 made both
# forwards slower than one image at a time (res3.conv2 4.5 -> 5.6 ms).
WINOGRAD_MIN_COLUMNS = 128


# conv_algo "auto": Winograd where it applies and both channel counts are at least
# AUTO_WINOGRAD_MIN_CHANNELS and the output at least AUTO_WINOGRAD_MIN_OUTPUT pixels, else
# im2col: the shapes where Winograd was measured to pay (the timings, per shape and pass:
# docs/performance.md, "The measurements behind the kernels' rules"). With few channels the
# 16 GEMMs per image are too thin for BLAS to run fast, and with few tiles the per-image
# overhead dominates; the transforms then cost more than the multiplies they save. From 8x8
# outputs up Winograd won every shape with >= 16 channels (ResNet-8's 64-channel 8x8 layer
# 1.4x); DIGITS conv2's 4x4 output is where it lost.
AUTO_WINOGRAD_MIN_CHANNELS = 16
AUTO_WINOGRAD_MIN_OUTPUT = 64
# ... and per pass: a Winograd layer under "auto" computes its filter gradient by im2col where
# a channel count is below AUTO_WINOGRAD_FILTER_MIN_CHANNELS and the output has at least
# AUTO_IM2COL_FILTER_MIN_OUTPUT pixels (from there the own tiles take it, see direct_applies in
# ext/_conv.pyx). Measured (1 thread, float32, batch 100, ms im2col against Winograd): ResNet-8's
# res1 convs 16->16 at 32x32 7.5 against 8.3-9.5, 16->32 at 32x32 14.0 against 16.7, 16->32 at
# 16x16 4.5 against 4.9, 16->16 at 16x16 2.5 against 2.9; Winograd kept it at 16->16 8x8 (1.4
# against 1.2, BLAS there), 32->32 16x16 (8.2 against 7.5), 32->32 32x32 (25.3 against 20.3)
# and CIFAR conv2 (32.8 against 28.7). Its forward and input gradient stay Winograd (the input
# gradient won every one of these shapes, 16->16 at 32x32 12.1 against 6.3).
AUTO_WINOGRAD_FILTER_MIN_CHANNELS = 32
AUTO_IM2COL_FILTER_MIN_OUTPUT = 128


def choose_conv_algo(algo, in_channels, filters, kernel_size, stride, output_hw):
    """The algorithm a conv layer runs its forward with for conv_algo `algo`: "im2col";
    "winograd" where it applies (3x3 stride 1), im2col elsewhere; "auto" by the measured rule
    above. choose_conv_algos gives every pass's."""
    return choose_conv_algos(algo, in_channels, filters, kernel_size, stride, output_hw)[0]


def choose_conv_algos(algo, in_channels, filters, kernel_size, stride, output_hw):
    """(forward, filter gradient, input gradient) algorithms of a conv layer for conv_algo
    `algo`, from the shapes alone (never from timings, so every run and thread count gets the
    same bits). An explicit "im2col" or "winograd" is one algorithm for all three passes
    (Winograd where it applies); "auto" may take the filter gradient by im2col under a
    Winograd forward (the rule above)."""
    if algo not in ("auto", *CONV_ALGOS):
        raise ValueError(f"conv_algo must be one of auto, {', '.join(CONV_ALGOS)}, got {algo!r}")
    if algo == "im2col" or not winograd_applies(kernel_size, stride):
        return ("im2col",) * 3
    if algo == "winograd":
        return ("winograd",) * 3
    pixels = output_hw[0] * output_hw[1]
    if min(in_channels, filters) < AUTO_WINOGRAD_MIN_CHANNELS or pixels < AUTO_WINOGRAD_MIN_OUTPUT:
        return ("im2col",) * 3
    thin = (min(in_channels, filters) < AUTO_WINOGRAD_FILTER_MIN_CHANNELS
            and pixels >= AUTO_IM2COL_FILTER_MIN_OUTPUT)
    return ("winograd", "im2col" if thin else "winograd", "winograd")


def winograd_applies(kernel_size, stride):
    """Whether Winograd F(2x2, 3x3) computes a layer with this kernel and stride: 3x3, stride 1
    (any padding)."""
    return tuple(kernel_size) == (3, 3) and tuple(stride) == (1, 1)


def _checked_algo(algo, kernel, stride):
    if algo not in CONV_ALGOS:
        raise ValueError(f"algo must be one of {', '.join(CONV_ALGOS)}, got {algo!r}")
    if algo == "winograd" and not winograd_applies(kernel, stride):
        raise ValueError(
            f"algo 'winograd' computes 3x3 stride-1 convolutions only, got kernel "
            f"{kernel[0]}x{kernel[1]} stride {stride[0]}x{stride[1]}; use algo 'im2col'")
    return algo


def _winograd_scratch(cin, cout, Ho, Wo, N, dtype, group=True):
    """(tile rows per block, images per group, per-thread scratch, threads) for one Winograd
    call: all depend on the shapes and N only, never on the threads. group=False: one image at
    a time (the filter gradient)."""
    row_bytes = 16 * (cin + cout) * ((Wo + 1) // 2) * np.dtype(dtype).itemsize
    tile_rows, image_tiles = (Ho + 1) // 2, ((Ho + 1) // 2) * ((Wo + 1) // 2 + 1)
    block_rows = max(1, WINOGRAD_BLOCK_BYTES // row_bytes)
    images = 1
    if group and block_rows >= tile_rows:   # whole images fit a block: group the small ones
        images = max(1, min(-(-WINOGRAD_MIN_COLUMNS // image_tiles), -(-N // MIN_GROUPS),
                            WINOGRAD_BLOCK_BYTES // (row_bytes * tile_rows)))
    groups = -(-N // images)
    threads = max(1, min(_conv.get_num_threads(), groups))
    size = _conv.winograd_scratch_elements(cin, cout, Ho, Wo, block_rows, images)
    _check_blas_dims(cin, cout, size)
    return block_rows, images, np.empty((threads, size), dtype=dtype), threads


def _winograd_forward(x, w, b, padding, relu, row_stats=None):
    """conv2d_forward by Winograd F(2x2, 3x3) (arguments checked by the caller)."""
    N, C, H, W = x.shape
    F = w.shape[0]
    Ho, Wo = output_size((H, W), (3, 3), (1, 1), padding)
    out = np.empty((N, F, Ho, Wo), dtype=x.dtype)
    if N == 0:
        return out
    block_rows, images, scratch, threads = _winograd_scratch(C, F, Ho, Wo, N, x.dtype)
    filters = np.empty(16 * F * C, dtype=x.dtype)
    with blas_pinned_to_one_thread():
        _conv.winograd_forward(x, w, b, out, *padding, block_rows, filters, scratch, threads,
                               bool(relu), images, row_stats)
    return out


def _checked_norm_grad(norm_grad, x_shape, dtype):
    if norm_grad is None:
        return None
    bn_x, bn_out, mean, part = norm_grad
    N, C, H, W = x_shape
    ok = (all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in (bn_x, bn_out, mean, part))
          and bn_x.shape == bn_out.shape == (N, C, H * W) and bn_x.dtype == bn_out.dtype == dtype
          and mean.shape == (C,) and mean.dtype == np.float64
          and part.shape == (N, C, 2) and part.dtype == np.float64 and part.flags.writeable)
    if not ok:
        raise ValueError(f"norm_grad must be C-contiguous (bn_x, bn_out) of shape {(N, C, H * W)} and dtype {dtype}, "
                         f"a float64 mean ({C},) and a writeable float64 part {(N, C, 2)}")
    return norm_grad


def _winograd_backward_input(dout, w, hw, padding, norm_grad=None):
    """conv2d_backward_input by Winograd F(2x2, 3x3) (arguments checked by the caller)."""
    N, F = dout.shape[:2]
    C = w.shape[1]
    dx = np.empty((N, C, *hw), dtype=dout.dtype)
    if N == 0:
        return dx
    block_rows, images, scratch, threads = _winograd_scratch(F, C, *hw, N, dout.dtype)
    filters = np.empty(16 * F * C, dtype=dout.dtype)
    with blas_pinned_to_one_thread():
        _conv.winograd_backward_input(dout, w, dx, *padding, block_rows, filters, scratch, threads,
                                      images, *(norm_grad if norm_grad is not None else ()))
    return dx


# ----------------------------------------------------------------------------- dense layer

# Rows of x per forward block and columns of the input per backward block: fixed, so that
# the results are the same bit for bit for any thread count; sized so that CIFAR's fc runs
# about as fast as np.matmul (the timings: docs/performance.md).
DENSE_ROW_BLOCK = 50
DENSE_COLUMN_BLOCK = 512
# Below this many multiply-adds a dense GEMM runs on the calling thread alone: waking a
# sleeping OpenMP thread costs more than it saves (DIGITS' fc is 100 x 512 x 10).
DENSE_MIN_PARALLEL_WORK = 2**21


def _dense_threads(work_items, multiply_adds):
    if multiply_adds < DENSE_MIN_PARALLEL_WORK:
        return 1
    return max(1, min(_conv.get_num_threads(), work_items))


def dense_forward(x, w, b):
    """out (N, O) = x (N, I) @ w.T + b, w (O, I) (the lecture's s = W x + b per row of x).

    OpenMP over blocks of rows, each a single-threaded GEMM (NumPy's threaded BLAS is kept
    out of the training step: its spinning pool slows the kernels' threads down)."""
    x = _array("x", x, 2)
    w = _array("w", w, 2, x.dtype)
    b = _array("b", b, 1, x.dtype)
    N, I = x.shape
    if w.shape[1] != I or b.shape != (w.shape[0],):
        raise ValueError(f"x {x.shape}, w {w.shape} and b {b.shape} do not fit: expected "
                         f"w (O, {I}) and b (O,)")
    out = np.empty((N, w.shape[0]), dtype=x.dtype)
    blocks = -(-N // DENSE_ROW_BLOCK)
    with blas_pinned_to_one_thread():
        _conv.dense_forward(x, w, b, out, DENSE_ROW_BLOCK, _dense_threads(blocks, N * I * w.shape[0]))
    return out


def dense_backward(dout, x, w, input_grad=True):
    """(dx or None, dw, db) of out = x @ w.T + b: dw = dout.T @ x, db = dout.sum(0),
    dx = dout @ w (skipped when input_grad is False). OpenMP over blocks of input columns."""
    dout = _array("dout", dout, 2)
    x = _array("x", x, 2, dout.dtype)
    w = _array("w", w, 2, dout.dtype)
    (N, O), I = dout.shape, x.shape[1]
    if x.shape[0] != N or w.shape != (O, I):
        raise ValueError(f"dout {dout.shape}, x {x.shape} and w {w.shape} do not fit: expected "
                         f"x ({N}, I) and w ({O}, I)")
    dw = np.empty((O, I), dtype=dout.dtype)
    dx = np.empty((N, I), dtype=dout.dtype) if input_grad else None
    blocks = -(-I // DENSE_COLUMN_BLOCK)
    with blas_pinned_to_one_thread():
        _conv.dense_backward(dout, x, w, dw, dx, DENSE_COLUMN_BLOCK, _dense_threads(blocks, N * I * O))
    return dx, dw, dout.sum(axis=0)


# ----------------------------------------------------------------------------- ReLU

def _writeable_flat(name, a, dtype=None):
    if not isinstance(a, np.ndarray) or a.dtype not in _FLOAT_DTYPES or not a.flags.c_contiguous \
            or not a.flags.writeable or not a.dtype.isnative or (dtype is not None and a.dtype != dtype):
        raise TypeError(f"{name} must be a writeable C-contiguous float32/float64 ndarray"
                        + (f" of dtype {dtype}" if dtype is not None else "")
                        + f", got {type(a).__name__}"
                        + (f" of dtype {a.dtype}" if isinstance(a, np.ndarray) else ""))
    return a.reshape(-1)


def relu_(a):
    """a = max(a, 0) in place (np.maximum's bits), OpenMP over blocks; returns a."""
    _conv.relu_forward(_writeable_flat("a", a))
    return a


def add_relu_(a, b):
    """a = max(a + b, 0) in place, one threaded pass (np.add then relu_, the same bits): a
    residual block's sum and ReLU; returns a."""
    flat = _writeable_flat("a", a)
    b = _array("b", b, b.ndim if isinstance(b, np.ndarray) else 1, a.dtype)
    if b.shape != a.shape:
        raise ValueError(f"b has shape {b.shape}, expected a's shape {a.shape}")
    _conv.add_relu_forward(flat, np.ascontiguousarray(b).reshape(-1))
    return a


def add_(a, b):
    """a = a + b in place, one threaded pass (np.add's bits); returns a."""
    flat = _writeable_flat("a", a)
    b = _array("b", b, b.ndim if isinstance(b, np.ndarray) else 1, a.dtype)
    if b.shape != a.shape:
        raise ValueError(f"b has shape {b.shape}, expected a's shape {a.shape}")
    if np.may_share_memory(a, b):   # numpy buffers overlapping operands; the threaded loop does not
        return np.add(a, b, out=a)
    _conv.add_forward(flat, np.ascontiguousarray(b).reshape(-1))
    return a


def relu_backward_(dout, out):
    """dout = where(out > 0, dout, 0) in place; returns dout. The same values as
    dout * (out > 0) except that a masked NaN or -0.0 becomes +0.0 (as in PyTorch)."""
    flat = _writeable_flat("dout", dout)
    out = _array("out", out, out.ndim if isinstance(out, np.ndarray) else 1, dout.dtype)
    if out.shape != dout.shape:
        raise ValueError(f"out has shape {out.shape}, expected dout's shape {dout.shape}")
    _conv.relu_backward(flat, out.reshape(-1))
    return dout


# ----------------------------------------------------------------------------- max pooling

def maxpool2d_output_shape(x_shape, size, stride=None):
    """(N, C, Ho, Wo) of maxpool2d_forward: Ho = (H - size_h) // stride_h + 1 (no padding)."""
    N, C, H, W = _shape("x_shape", x_shape, 4)
    size = pair("size", size, 1)
    stride = size if stride is None else pair("stride", stride, 1)
    return (N, C) + output_size((H, W), size, stride, (0, 0), what="size")


def maxpool2d_forward(x, size, stride=None):
    """(out (N, C, Ho, Wo), argmax (N, C, Ho, Wo) intp): max over each size window.

    out[n, c, oh, ow] = max_{i<kh, j<kw} x[n, c, oh*sh + i, ow*sw + j]; no padding, the output is
    floored: Ho = (H - kh) // sh + 1. argmax is the flat index h*W + w of the maximum inside its
    (H, W) plane (the first one on ties; NaN propagates). stride defaults to size.
    """
    x = _array("x", x, 4)
    N, C, H, W = x.shape
    size = pair("size", size, 1)
    stride = size if stride is None else pair("stride", stride, 1)
    Ho, Wo = output_size((H, W), size, stride, (0, 0), what="size")
    out = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    argmax = np.empty((N, C, Ho, Wo), dtype=np.intp)
    _conv.maxpool2d_forward(x, out, argmax, *size, *stride)
    return out, argmax


def maxpool2d_backward(dout, argmax, x_shape):
    """dx (N, C, H, W): dx = 0, then dx[n, c].flat[argmax[n, c, oh, ow]] += dout[n, c, oh, ow].

    dout and argmax as returned with out by maxpool2d_forward; overlapping windows accumulate.
    """
    dout = _array("dout", dout, 4)
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.intp:
        raise TypeError(
            f"argmax must be the intp ndarray returned by maxpool2d_forward, got "
            f"{type(argmax).__name__}{'' if not isinstance(argmax, np.ndarray) else ' of dtype ' + str(argmax.dtype)}"
        )
    if argmax.shape != dout.shape:
        raise ValueError(f"argmax has shape {argmax.shape}, expected dout's shape {dout.shape}")
    argmax = np.ascontiguousarray(argmax)
    N, C, H, W = _shape("x_shape", x_shape, 4)
    if dout.shape[:2] != (N, C):
        raise ValueError(f"dout has shape {dout.shape}, expected ({N}, {C}, Ho, Wo) for x_shape")
    dx = np.empty((N, C, H, W), dtype=dout.dtype)
    outside = _conv.maxpool2d_backward(dout, argmax, dx)
    if outside:
        raise ValueError(
            f"argmax has {outside} entries outside [0, {H * W}) (H*W of x_shape {(N, C, H, W)}); "
            f"expected flat indices into the (H, W) planes, as returned by maxpool2d_forward"
        )
    return dx


def _winograd_backward_filter(x, dout, padding):
    """(dw, db) of conv2d_backward_filter by Winograd F(2x2, 3x3) (arguments checked by the
    caller): the sums over the batch in at most FILTER_GRAD_CHUNKS chunks, as im2col's."""
    N, C, H, W = x.shape
    F, Ho, Wo = dout.shape[1:]
    if N == 0:
        return np.zeros((F, C, 3, 3), dtype=x.dtype), np.zeros(F, dtype=x.dtype)
    block_rows, _, scratch, threads = _winograd_scratch(C, F, Ho, Wo, N, x.dtype, group=False)
    chunks = min(N, FILTER_GRAD_CHUNKS)
    sums = np.zeros((chunks, 16 * F * C + F), dtype=x.dtype)   # dL/dU and db per chunk
    dw, db = np.empty((F, C, 3, 3), dtype=x.dtype), np.empty(F, dtype=x.dtype)
    with blas_pinned_to_one_thread():
        _conv.winograd_backward_filter(x, dout, dw, db, *padding, block_rows, sums, scratch,
                                       min(threads, chunks))
    return dw, db
