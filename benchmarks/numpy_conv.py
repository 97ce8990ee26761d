"""A pure-NumPy im2col convolution: the baseline convtrain's kernels are measured against.

Same conventions and signatures as convtrain.nn.kernels (NCHW, filters (F, C, kh, kw), int or pair
kernel_size/stride/padding, read by convtrain.nn.geometry), no other argument checking. The im2col is a strided view copied once
per call (N * C*kh*kw * Ho*Wo elements: the whole batch at once), the GEMMs are np.matmul /
np.tensordot (threaded BLAS), col2im is kh*kw vectorized strided additions.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from convtrain.nn.geometry import output_size, pair


def _geometry(kernel_size, stride, padding):
    return pair("kernel_size", kernel_size, 1), pair("stride", stride, 1), pair("padding", padding)


def _padded(x, ph, pw):
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def im2col(x, kernel_size, stride=1, padding=0):
    """cols (N, C*kh*kw, Ho*Wo), rows (c, i, j), columns (oh, ow), as convtrain.kernels.im2col."""
    (kh, kw), (sh, sw), (ph, pw) = _geometry(kernel_size, stride, padding)
    N, C = x.shape[:2]
    windows = sliding_window_view(_padded(x, ph, pw), (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    Ho, Wo = windows.shape[2:4]
    # (N, C, Ho, Wo, kh, kw) -> (N, C, kh, kw, Ho, Wo): one copy
    return windows.transpose(0, 1, 4, 5, 2, 3).reshape(N, C * kh * kw, Ho * Wo)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0):
    """The adjoint of im2col: x (N, C, H, W)."""
    (kh, kw), (sh, sw), (ph, pw) = _geometry(kernel_size, stride, padding)
    N, C, H, W = x_shape
    Ho, Wo = output_size((H, W), (kh, kw), (sh, sw), (ph, pw))
    cols = cols.reshape(N, C, kh, kw, Ho, Wo)
    xp = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xp[:, :, i:i + sh * Ho:sh, j:j + sw * Wo:sw] += cols[:, :, i, j]
    return xp[:, :, ph:ph + H, pw:pw + W].copy() if (ph or pw) else xp


def conv2d_forward(x, w, b, stride=1, padding=0):
    """out (N, F, Ho, Wo) = w.reshape(F, -1) @ im2col(x) + b."""
    N, _, H, W = x.shape
    F, _, kh, kw = w.shape
    Ho, Wo = output_size((H, W), *_geometry((kh, kw), stride, padding))
    out = np.matmul(w.reshape(F, -1), im2col(x, (kh, kw), stride, padding))
    if b is not None:
        out += b[:, None]
    return out.reshape(N, F, Ho, Wo)


def conv2d_backward_filter(x, dout, kernel_size, stride=1, padding=0):
    """(dw, db): dw = sum_n dout[n] @ im2col(x)[n].T, db = dout summed over n, h, w."""
    kh, kw = pair("kernel_size", kernel_size, 1)
    N, C = x.shape[:2]
    F = dout.shape[1]
    cols = im2col(x, (kh, kw), stride, padding)
    dw = np.tensordot(dout.reshape(N, F, -1), cols, axes=([0, 2], [0, 2]))
    return dw.reshape(F, C, kh, kw), dout.sum(axis=(0, 2, 3))


def conv2d_backward_input(dout, w, x_shape, stride=1, padding=0):
    """dx = col2im(w.reshape(F, -1).T @ dout)."""
    N, F = dout.shape[:2]
    kernel = w.shape[2:]
    dcols = np.matmul(w.reshape(F, -1).T, dout.reshape(N, F, -1))
    return col2im(dcols, x_shape, kernel, stride, padding)
