"""convtrain's batch-normalization kernels: per-channel statistics, normalization, backward.

What this file is: the two passes batch norm makes over (N, C, P) activations (P = H*W for a
conv's output, 1 after a dense layer), written once for float32 and float64 (`floating`),
with the GIL released and OpenMP over channels. What it refuses to be: a Python API; every
`def` trusts its caller (convtrain.nn.norm) to have checked shapes, dtypes and contiguity
and to have allocated the outputs.

Determinism: one channel is reduced by one thread, always in the same order (images, then
positions), into float64 sums; so the results are the same bits for any thread count.
The optional ReLU epilogue (forward: max(0, y); backward: dy where the output is > 0) spares
the pass a separate ReLU layer would make over the activations.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt


def bn_train_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                     const floating[::1] beta, floating[:, :, ::1] out,
                     double[::1] mean, double[::1] var, double[::1] inv_std,
                     double eps, bint relu, int num_threads):
    """Per channel c: mean[c], biased var[c] and inv_std[c] = 1/sqrt(var + eps) of x[:, c, :],
    then out[:, c, :] = gamma[c] * (x - mean) * inv_std + beta[c] (then max(0, .) if relu)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2]
    cdef Py_ssize_t c, n, p
    cdef double total, centered, m = <double> (N * P)
    cdef floating mu, istd, g, b, y
    with nogil:
        for c in prange(C, schedule="dynamic", num_threads=num_threads):
            total = 0.0
            for n in range(N):
                for p in range(P):
                    total = total + x[n, c, p]
            mean[c] = total / m
            # Two passes (not E[x^2] - E[x]^2): no cancellation when the mean is large.
            total = 0.0
            for n in range(N):
                for p in range(P):
                    centered = x[n, c, p] - mean[c]
                    total = total + centered * centered
            var[c] = total / m
            inv_std[c] = 1.0 / sqrt(var[c] + eps)
            mu = <floating> mean[c]
            istd = <floating> inv_std[c]
            g = gamma[c]
            b = beta[c]
            for n in range(N):
                for p in range(P):
                    y = g * ((x[n, c, p] - mu) * istd) + b
                    if relu and y < 0:
                        y = 0
                    out[n, c, p] = y


def bn_affine_forward(const floating[:, :, ::1] x, const floating[::1] scale,
                      const floating[::1] shift, floating[:, :, ::1] out,
                      bint relu, int num_threads):
    """Eval mode: out[:, c, :] = x[:, c, :] * scale[c] + shift[c] (then max(0, .) if relu)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2]
    cdef Py_ssize_t c, n, p
    cdef floating s, t, y
    with nogil:
        for c in prange(C, schedule="dynamic", num_threads=num_threads):
            s = scale[c]
            t = shift[c]
            for n in range(N):
                for p in range(P):
                    y = x[n, c, p] * s + t
                    if relu and y < 0:
                        y = 0
                    out[n, c, p] = y


def bn_backward(const floating[:, :, ::1] x, const floating[:, :, ::1] dout,
                const floating[:, :, ::1] out, bint relu,
                const double[::1] mean, const double[::1] inv_std, const floating[::1] gamma,
                floating[:, :, ::1] dx, floating[::1] dgamma, floating[::1] dbeta,
                int num_threads):
    """Gradients of batch norm in train mode (batch statistics), per channel c:

        xhat = (x - mean) * inv_std,  g = dout (masked by out > 0 if relu)
        dbeta = sum g,  dgamma = sum g * xhat
        dx = gamma * inv_std * (g - dbeta / M - xhat * dgamma / M),  M = N * P
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2]
    cdef Py_ssize_t c, n, p
    cdef double sum_g, sum_gx, m = <double> (N * P)
    cdef floating mu, istd, g, xhat, k, a, b
    with nogil:
        for c in prange(C, schedule="dynamic", num_threads=num_threads):
            mu = <floating> mean[c]
            istd = <floating> inv_std[c]
            sum_g = 0.0
            sum_gx = 0.0
            for n in range(N):
                for p in range(P):
                    g = dout[n, c, p]
                    if relu and not (out[n, c, p] > 0):
                        g = 0
                    sum_g = sum_g + g
                    sum_gx = sum_gx + <double> g * ((x[n, c, p] - mean[c]) * inv_std[c])
            dbeta[c] = <floating> sum_g
            dgamma[c] = <floating> sum_gx
            k = <floating> (gamma[c] * inv_std[c])
            a = <floating> (sum_g / m)
            b = <floating> (sum_gx / m)
            for n in range(N):
                for p in range(P):
                    g = dout[n, c, p]
                    if relu and not (out[n, c, p] > 0):
                        g = 0
                    xhat = (x[n, c, p] - mu) * istd
                    dx[n, c, p] = k * (g - a - xhat * b)
