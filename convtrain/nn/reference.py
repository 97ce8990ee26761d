"""The convolutional layer of lecture 6, literally: slow, readable, float64.

This module is the test oracle of convtrain.nn.kernels and a text to read beside the slides.
Each function builds the lecture's matrices explicitly with plain loops and computes the
layer's output and gradients through them. Nothing here is fast; everything is obvious.

Notation (0-based in code, 1-based on the slides):

* X is one image (C, H, W), F_f one filter (C, kh, kw); "*" is the lecture's convolution, a
  correlation: S_lm = sum_{k,i,j} X_{k, i+l-1, j+m-1} F_{kij} (no flip).
* vec() is row-major, channels blockwise: vec(X) = (vec(X_1); vec(X_2); ...), and
  vec(X_k) = (X_k11 X_k12 ... X_k1W X_k21 ...) -- row 1 of the image first, as on the slides.
* M_X^im, (Ho*Wo) x (C*kh*kw): row (l, m) holds the patch of X under the filter at output
  (l, m), so vec(S_f) = M_X^im vec(F_f).
* M_F^filter, (Ho*Wo) x (C*H*W): row (l, m) holds F_f placed on the image at (l, m), zeros
  elsewhere, so vec(S_f) = M_F^filter vec(X).
* Gradients with G_f = dL/dS_f and g_f = vec(G_f):
  dL/dvec(F_f) = g_f^T M_X^im           (= X * G_f, a correlation of the input with G),
  dL/dvec(X)   = sum_f g_f^T M_{F_f}^filter  (= sum_f G_f,zero-pad * F_f^rot180 per channel).

The lecture has stride 1 and no padding. Here stride (sh, sw) and zero padding (ph, pw) are
general: output (l, m) reads padded-image pixel (l*sh + i, m*sw + j); a pixel in the padding
is a zero and has no column in M_F^filter. The output is Ho x Wo with Ho = (H + 2ph - kh) // sh + 1
(likewise Wo), as everywhere in convtrain (convtrain.nn.geometry.output_size).
"""

import numpy as np

from convtrain.nn.geometry import output_size, pair

__all__ = [
    "correlate",
    "pad",
    "rot180",
    "mx_im",
    "mf_filter",
    "conv_forward",
    "conv_forward_by_filter_matrix",
    "filter_grad",
    "filter_grad_by_correlation",
    "input_grad",
    "input_grad_by_full_convolution",
    "maxpool_forward",
    "maxpool_backward",
]


def pad(X, padding):
    """X (..., H, W) with ph rows of zeros above and below and pw columns left and right."""
    ph, pw = pair("padding", padding)
    X = np.asarray(X, dtype=np.float64)
    out = np.zeros(X.shape[:-2] + (X.shape[-2] + 2 * ph, X.shape[-1] + 2 * pw))
    out[..., ph:ph + X.shape[-2], pw:pw + X.shape[-1]] = X
    return out


def rot180(F):
    """F rotated by 180 degrees in its last two axes: F^rot180_ij = F_{kh+1-i, kw+1-j}."""
    return np.asarray(F)[..., ::-1, ::-1]


def correlate(X, F, stride=1):
    """The lecture's S = X * F for 2-D X (H, W) and F (kh, kw), valid positions only:
    S_lm = sum_{i,j} X[l*sh + i, m*sw + j] F[i, j]."""
    X, F = np.asarray(X, dtype=np.float64), np.asarray(F, dtype=np.float64)
    sh, sw = pair("stride", stride, 1)
    kh, kw = F.shape
    Ho, Wo = output_size(X.shape, (kh, kw), (sh, sw))
    S = np.zeros((Ho, Wo))
    for l in range(Ho):
        for m in range(Wo):
            for i in range(kh):
                for j in range(kw):
                    S[l, m] += X[l * sh + i, m * sw + j] * F[i, j]
    return S


# ----------------------------------------------------------------------------- the two matrices

def mx_im(X, kernel_size, stride=1, padding=0):
    """M_X^im of one image X (C, H, W) (or (H, W) for one channel): (Ho*Wo) x (C*kh*kw).

    M_X^im[l*Wo + m, (k*kh + i)*kw + j] = X_pad[k, l*sh + i, m*sw + j], i.e.
    M_X^im = (M_X1^im M_X2^im ...), channels blockwise; vec(S_f) = M_X^im vec(F_f).
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 2:
        X = X[None]
    C, H, W = X.shape
    (kh, kw), (sh, sw) = pair("kernel_size", kernel_size, 1), pair("stride", stride, 1)
    Ho, Wo = output_size((H, W), (kh, kw), (sh, sw), pair("padding", padding))
    Xp = pad(X, padding)
    M = np.zeros((Ho * Wo, C * kh * kw))
    for l in range(Ho):
        for m in range(Wo):
            for k in range(C):
                for i in range(kh):
                    for j in range(kw):
                        M[l * Wo + m, (k * kh + i) * kw + j] = Xp[k, l * sh + i, m * sw + j]
    return M


def mf_filter(F, image_shape, stride=1, padding=0):
    """M_F^filter of one filter F (C, kh, kw) (or (kh, kw)) for images (C, H, W) (or (H, W)):
    (Ho*Wo) x (C*H*W), vec(S) = M_F^filter vec(X).

    M_F^filter[l*Wo + m, (k*H + r)*W + s] = F[k, r + ph - l*sh, s + pw - m*sw] where that filter
    index exists, else 0. M_F^filter = (M_F1^filter M_F2^filter ...), channels blockwise.
    """
    F = np.asarray(F, dtype=np.float64)
    if F.ndim == 2:
        F = F[None]
    image_shape = tuple(image_shape)
    if len(image_shape) == 2:
        image_shape = (1,) + image_shape
    C, H, W = image_shape
    if F.shape[0] != C:
        raise ValueError(f"filter has {F.shape[0]} channels, image_shape {image_shape} has {C}")
    _, kh, kw = F.shape
    (sh, sw), (ph, pw) = pair("stride", stride, 1), pair("padding", padding)
    Ho, Wo = output_size((H, W), (kh, kw), (sh, sw), (ph, pw))
    M = np.zeros((Ho * Wo, C * H * W))
    for l in range(Ho):
        for m in range(Wo):
            for k in range(C):
                for i in range(kh):
                    for j in range(kw):
                        r, s = l * sh + i - ph, m * sw + j - pw  # image pixel under F[k, i, j]
                        if 0 <= r < H and 0 <= s < W:
                            M[l * Wo + m, (k * H + r) * W + s] = F[k, i, j]
    return M


# ----------------------------------------------------------------------------- forward

def conv_forward(x, w, b=None, stride=1, padding=0):
    """S (N, F, Ho, Wo) with vec(S[n, f]) = M_{x[n]}^im vec(w[f]) + b[f]."""
    x, w = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    N, C, H, W = x.shape
    F, _, kh, kw = w.shape
    Ho, Wo = output_size((H, W), (kh, kw), pair("stride", stride, 1), pair("padding", padding))
    S = np.zeros((N, F, Ho, Wo))
    for n in range(N):
        M = mx_im(x[n], (kh, kw), stride, padding)
        for f in range(F):
            S[n, f] = (M @ w[f].reshape(-1)).reshape(Ho, Wo)
            if b is not None:
                S[n, f] += b[f]
    return S


def conv_forward_by_filter_matrix(x, w, b=None, stride=1, padding=0):
    """S (N, F, Ho, Wo) with vec(S[n, f]) = M_{w[f]}^filter vec(x[n]) + b[f]."""
    x, w = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    N, C, H, W = x.shape
    F, _, kh, kw = w.shape
    Ho, Wo = output_size((H, W), (kh, kw), pair("stride", stride, 1), pair("padding", padding))
    S = np.zeros((N, F, Ho, Wo))
    for f in range(F):
        M = mf_filter(w[f], (C, H, W), stride, padding)
        for n in range(N):
            S[n, f] = (M @ x[n].reshape(-1)).reshape(Ho, Wo)
            if b is not None:
                S[n, f] += b[f]
    return S


# ----------------------------------------------------------------------------- gradients

def filter_grad(x, dout, kernel_size, stride=1, padding=0):
    """(dw (F, C, kh, kw), db (F,)): dL/dvec(F_f) = sum_n g_{n,f}^T M_{x[n]}^im,
    dL/db_f = sum_n sum_lm G_{n,f,lm}, where G = dout = dL/dS."""
    x, dout = np.asarray(x, dtype=np.float64), np.asarray(dout, dtype=np.float64)
    N, C, H, W = x.shape
    F = dout.shape[1]
    kh, kw = pair("kernel_size", kernel_size, 1)
    dw = np.zeros((F, C * kh * kw))
    for n in range(N):
        M = mx_im(x[n], (kh, kw), stride, padding)
        for f in range(F):
            dw[f] += dout[n, f].reshape(-1) @ M
    return dw.reshape(F, C, kh, kw), dout.sum(axis=(0, 2, 3))


def dilate(G, stride):
    """G (Ho, Wo) with sh-1 rows and sw-1 columns of zeros between its entries:
    ((Ho-1)*sh + 1, (Wo-1)*sw + 1). A strided convolution's G, seen at stride 1."""
    sh, sw = pair("stride", stride, 1)
    G = np.asarray(G, dtype=np.float64)
    out = np.zeros(((G.shape[0] - 1) * sh + 1, (G.shape[1] - 1) * sw + 1))
    out[::sh, ::sw] = G
    return out


def filter_grad_by_correlation(x, dout, kernel_size, stride=1, padding=0):
    """dw (F, C, kh, kw): dL/dF_{f,k} = sum_n X_pad[n, k] * G_{n,f} (the lecture's X * G).

    With stride s, G is dilated first (zeros between its entries); the correlation then has
    at least kh x kw valid positions, of which the first kh x kw are the taps of the filter.
    """
    x, dout = np.asarray(x, dtype=np.float64), np.asarray(dout, dtype=np.float64)
    N, C, H, W = x.shape
    F = dout.shape[1]
    kh, kw = pair("kernel_size", kernel_size, 1)
    xp = pad(x, padding)
    dw = np.zeros((F, C, kh, kw))
    for n in range(N):
        for f in range(F):
            G = dilate(dout[n, f], stride)
            for k in range(C):
                dw[f, k] += correlate(xp[n, k], G)[:kh, :kw]
    return dw


def input_grad(dout, w, x_shape, stride=1, padding=0):
    """dx (N, C, H, W): dL/dvec(x[n]) = sum_f g_{n,f}^T M_{w[f]}^filter."""
    dout, w = np.asarray(dout, dtype=np.float64), np.asarray(w, dtype=np.float64)
    N, C, H, W = x_shape
    F = w.shape[0]
    dx = np.zeros((N, C * H * W))
    for f in range(F):
        M = mf_filter(w[f], (C, H, W), stride, padding)
        for n in range(N):
            dx[n] += dout[n, f].reshape(-1) @ M
    return dx.reshape(N, C, H, W)


def input_grad_by_full_convolution(dout, w, x_shape, stride=1, padding=0):
    """dx (N, C, H, W): dL/dX_k = sum_f G_f,zero-pad * F_{f,k}^rot180 (the lecture's full
    convolution), generalized to stride and padding:

    1. dilate G_f by the stride (zeros between entries: the positions the stride skipped);
    2. zero-pad it by kh-1 rows and kw-1 columns on every side;
    3. correlate with the 180-degree rotated filter -> the gradient w.r.t. the padded image,
       except rows/columns at the bottom/right that no window reached (they stay 0);
    4. crop the padding away.
    """
    dout, w = np.asarray(dout, dtype=np.float64), np.asarray(w, dtype=np.float64)
    N, C, H, W = x_shape
    F, _, kh, kw = w.shape
    ph, pw = pair("padding", padding)
    dx_padded = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    for n in range(N):
        for f in range(F):
            G_zero_pad = pad(dilate(dout[n, f], stride), (kh - 1, kw - 1))
            for k in range(C):
                V = correlate(G_zero_pad, rot180(w[f, k]))
                dx_padded[n, k, :V.shape[0], :V.shape[1]] += V
    return dx_padded[:, :, ph:ph + H, pw:pw + W]


# ----------------------------------------------------------------------------- max pooling

def maxpool_forward(x, size, stride=None):
    """(out, argmax): out[n, c, l, m] = max of the window x[n, c, l*sh : l*sh+kh, m*sw : m*sw+kw];
    argmax the flat index r*W + s of its (first) maximum in the (H, W) plane."""
    x = np.asarray(x)
    kh, kw = pair("size", size, 1)
    sh, sw = pair("stride", size if stride is None else stride, 1)
    N, C, H, W = x.shape
    Ho, Wo = output_size((H, W), (kh, kw), (sh, sw), what="size")
    out = np.zeros((N, C, Ho, Wo), dtype=x.dtype)
    argmax = np.zeros((N, C, Ho, Wo), dtype=np.intp)
    for n in range(N):
        for c in range(C):
            for l in range(Ho):
                for m in range(Wo):
                    window = x[n, c, l * sh:l * sh + kh, m * sw:m * sw + kw]
                    i, j = np.unravel_index(np.argmax(window), window.shape)
                    out[n, c, l, m] = window[i, j]
                    argmax[n, c, l, m] = (l * sh + i) * W + (m * sw + j)
    return out, argmax


def maxpool_backward(dout, argmax, x_shape):
    """dx: each output's gradient routed to the input pixel that won its window."""
    N, C, H, W = x_shape
    dx = np.zeros((N, C, H * W), dtype=np.asarray(dout).dtype)
    for n in range(N):
        for c in range(C):
            for index, g in zip(argmax[n, c].ravel(), dout[n, c].ravel()):
                dx[n, c, index] += g
    return dx.reshape(x_shape)
