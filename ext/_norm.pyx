"""convtrain's batch-normalization kernels: per-channel statistics, normalization, backward.

What this file is: the passes batch norm makes over (N, C, P) activations (P = H*W for a conv's
output, 1 after a dense layer), written once for float32 and float64 (`floating`), with the GIL
released and OpenMP threads. What it refuses to be: a Python API; every `def` trusts its caller
(convtrain.nn.norm) to have checked shapes, dtypes and contiguity and to have allocated the
outputs. The row loops are C, in ext/norm_rows.h.

Three layouts of the same arithmetic; the caller chooses between the first two (`by_images`,
see convtrain.nn.norm for the measured rule), rows of one value always take the third:

* by images (long rows of an activation too large for the caches, such as a conv's output
  over a batch): threads take whole images, which lie contiguous in memory, and stream through
  them; each (image, channel) row leaves its sums in a small (N, C) table, added up per channel
  in image order. A channel's rows lie a whole image apart, a few KiB each: read channel by
  channel from memory, every row started with cache misses the hardware prefetcher had no time
  to hide (CIFAR's 64x26x26 activations: the backward twice as fast by images, docs/performance.md);
* by channels (activations the caches hold, short rows): each thread takes a contiguous range
  of channels (static schedule: with neighbouring channels on different threads, the lines
  their rows share were written by both), a row's sums kept in lanes across all its images;
* rows of one value (a dense layer's (N, F) output): threads take blocks of FEATURE_BLOCK
  features and sum each over the images in order, vectorized across the features.

Determinism: every sum is float64, taken in an order fixed by the shapes alone (lanes within
a row, ext/norm_rows.h, then rows in image order), never by the threads: the same bits for
any thread count, and, compiled without fused multiply-adds, for every build.
The variance is two-pass, not E[x^2] - E[x]^2 (no cancellation when the mean is large): by
channels and by features, the squared deviations from the channel's mean; by images, each
row's squared deviations from its own mean, taken while the row is in cache, then combined
exactly as sum_n (M2_n + P (mean_n - mean)^2).
The optional ReLU epilogue (forward: max(0, y); backward: dy where the output is > 0) spares
the pass a separate ReLU layer would make over the activations. The backward turns dout into
dx in place: no new array to fault in and write.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

import numpy as np

# Rows of one value (P = 1, after a dense layer) go by blocks of this many features per thread.
cdef Py_ssize_t FEATURE_BLOCK = 64

cdef extern from "norm_rows.h":
    enum: CT_NORM_LANES
    void ct_row_sum_float(const float *x, Py_ssize_t n, double *acc) noexcept nogil
    void ct_row_sum_double(const double *x, Py_ssize_t n, double *acc) noexcept nogil
    void ct_row_sq_dev_float(const float *x, Py_ssize_t n, double mean, double *acc) noexcept nogil
    void ct_row_sq_dev_double(const double *x, Py_ssize_t n, double mean, double *acc) noexcept nogil
    void ct_row_normalize_float(const float *x, float *out, Py_ssize_t n, float mu, float istd,
                                float g, float b, int relu) noexcept nogil
    void ct_row_normalize_double(const double *x, double *out, Py_ssize_t n, double mu,
                                 double istd, double g, double b, int relu) noexcept nogil
    void ct_row_normalize_add_float(const float *x, const float *a, float *out, Py_ssize_t n,
                                    float mu, float istd, float g, float b) noexcept nogil
    void ct_row_normalize_add_double(const double *x, const double *a, double *out, Py_ssize_t n,
                                     double mu, double istd, double g, double b) noexcept nogil
    void ct_row_affine_float(const float *x, float *out, Py_ssize_t n, float s, float t,
                             int relu) noexcept nogil
    void ct_row_affine_double(const double *x, double *out, Py_ssize_t n, double s, double t,
                              int relu) noexcept nogil
    void ct_row_relu_mask_float(float *g, const float *out, Py_ssize_t n) noexcept nogil
    void ct_row_relu_mask_double(double *g, const double *out, Py_ssize_t n) noexcept nogil
    void ct_row_grad_sums_float(const float *x, const float *g, Py_ssize_t n, double mean,
                                double *acc_g, double *acc_gx) noexcept nogil
    void ct_row_grad_sums_double(const double *x, const double *g, Py_ssize_t n, double mean,
                                 double *acc_g, double *acc_gx) noexcept nogil
    void ct_row_input_grad_float(const float *x, float *g, Py_ssize_t n, float mu, float istd,
                                 float k, float a, float b) noexcept nogil
    void ct_row_input_grad_double(const double *x, double *g, Py_ssize_t n, double mu,
                                  double istd, double k, double a, double b) noexcept nogil
    void ct_row_input_grad_to_float(const float *x, const float *g, float *dx, Py_ssize_t n,
                                    float mu, float istd, float k, float a, float b) noexcept nogil
    void ct_row_input_grad_to_double(const double *x, const double *g, double *dx, Py_ssize_t n,
                                     double mu, double istd, double k, double a,
                                     double b) noexcept nogil
    void ct_features_stats_float(const float *x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t c0,
                                 Py_ssize_t c1, double *mean, double *var) noexcept nogil
    void ct_features_stats_double(const double *x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t c0,
                                  Py_ssize_t c1, double *mean, double *var) noexcept nogil
    void ct_features_normalize_float(const float *x, float *out, Py_ssize_t N, Py_ssize_t C,
                                     Py_ssize_t c0, Py_ssize_t c1, const float *mu,
                                     const float *istd, const float *g, const float *b,
                                     int relu) noexcept nogil
    void ct_features_normalize_double(const double *x, double *out, Py_ssize_t N, Py_ssize_t C,
                                      Py_ssize_t c0, Py_ssize_t c1, const double *mu,
                                      const double *istd, const double *g, const double *b,
                                      int relu) noexcept nogil
    void ct_features_grad_sums_float(const float *x, float *g, const float *out, int relu,
                                     Py_ssize_t N, Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                                     const double *mean, double *sum_g, double *sum_gx) noexcept nogil
    void ct_features_grad_sums_double(const double *x, double *g, const double *out, int relu,
                                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                                      const double *mean, double *sum_g, double *sum_gx) noexcept nogil
    void ct_features_input_grad_float(const float *x, float *g, Py_ssize_t N, Py_ssize_t C,
                                      Py_ssize_t c0, Py_ssize_t c1, const float *mu,
                                      const float *istd, const float *kk, const float *a,
                                      const float *b) noexcept nogil
    void ct_features_input_grad_double(const double *x, double *g, Py_ssize_t N, Py_ssize_t C,
                                       Py_ssize_t c0, Py_ssize_t c1, const double *mu,
                                       const double *istd, const double *kk, const double *a,
                                       const double *b) noexcept nogil
    void ct_row_stats_float(const float *x, Py_ssize_t n, double *total, double *m2) noexcept nogil
    void ct_row_stats_double(const double *x, Py_ssize_t n, double *total, double *m2) noexcept nogil
    void ct_row_grad_totals_float(const float *x, float *g, const float *out, int relu, Py_ssize_t n,
                                  double mean, double *sum_g, double *sum_gx) noexcept nogil
    void ct_row_grad_totals_double(const double *x, double *g, const double *out, int relu,
                                   Py_ssize_t n, double mean, double *sum_g,
                                   double *sum_gx) noexcept nogil
    double ct_lanes_total(const double *acc) noexcept nogil
    void ct_lanes_clear(double *acc) noexcept nogil


cdef inline void row_sum(const floating *x, Py_ssize_t n, double *acc) noexcept nogil:
    if floating is float:
        ct_row_sum_float(x, n, acc)
    else:
        ct_row_sum_double(x, n, acc)


cdef inline void row_sq_dev(const floating *x, Py_ssize_t n, double mean, double *acc) noexcept nogil:
    if floating is float:
        ct_row_sq_dev_float(x, n, mean, acc)
    else:
        ct_row_sq_dev_double(x, n, mean, acc)


cdef inline void row_normalize(const floating *x, floating *out, Py_ssize_t n, floating mu,
                               floating istd, floating g, floating b, int relu,
                               const floating *add=NULL) noexcept nogil:
    """out = g * ((x - mu) * istd) + b, then max(0, .) if relu; with `add` (a row), max(. + add,
    0) instead (a residual block's sum and ReLU, NaN kept as add_relu_ keeps it)."""
    if add != NULL:
        if floating is float:
            ct_row_normalize_add_float(x, add, out, n, mu, istd, g, b)
        else:
            ct_row_normalize_add_double(x, add, out, n, mu, istd, g, b)
    elif floating is float:
        ct_row_normalize_float(x, out, n, mu, istd, g, b, relu)
    else:
        ct_row_normalize_double(x, out, n, mu, istd, g, b, relu)


cdef inline void row_affine(const floating *x, floating *out, Py_ssize_t n, floating s, floating t,
                            int relu) noexcept nogil:
    if floating is float:
        ct_row_affine_float(x, out, n, s, t, relu)
    else:
        ct_row_affine_double(x, out, n, s, t, relu)


cdef inline void row_relu_mask(floating *g, const floating *out, Py_ssize_t n) noexcept nogil:
    if floating is float:
        ct_row_relu_mask_float(g, out, n)
    else:
        ct_row_relu_mask_double(g, out, n)


cdef inline void row_grad_sums(const floating *x, const floating *g, Py_ssize_t n, double mean,
                               double *acc_g, double *acc_gx) noexcept nogil:
    if floating is float:
        ct_row_grad_sums_float(x, g, n, mean, acc_g, acc_gx)
    else:
        ct_row_grad_sums_double(x, g, n, mean, acc_g, acc_gx)


cdef inline void row_input_grad(const floating *x, floating *g, floating *dx, Py_ssize_t n,
                                floating mu, floating istd, floating k, floating a,
                                floating b) noexcept nogil:
    """dx = k * (g - a - (x - mu) * istd * b): in place of g where dx is g, else into dx."""
    if dx == g:
        if floating is float:
            ct_row_input_grad_float(x, g, n, mu, istd, k, a, b)
        else:
            ct_row_input_grad_double(x, g, n, mu, istd, k, a, b)
    elif floating is float:
        ct_row_input_grad_to_float(x, g, dx, n, mu, istd, k, a, b)
    else:
        ct_row_input_grad_to_double(x, g, dx, n, mu, istd, k, a, b)


# ---- statistics and normalization -------------------------------------------------------------

cdef inline const floating *add_row(const floating *add, Py_ssize_t row, Py_ssize_t P) noexcept nogil:
    return add + row * P if add != NULL else NULL


cdef void channel_train_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                                const floating[::1] beta, floating[:, :, ::1] out,
                                double *mean, double *var, double *inv_std,
                                double eps, bint relu, Py_ssize_t c,
                                const floating *add) noexcept nogil:
    """The channel layout: channel c whole, mean, variance, then normalize."""
    cdef Py_ssize_t N = x.shape[0], P = x.shape[2], n
    cdef double acc[CT_NORM_LANES]
    cdef double m = <double> (N * P)
    ct_lanes_clear(acc)
    for n in range(N):
        row_sum(&x[n, c, 0], P, acc)
    mean[c] = ct_lanes_total(acc) / m
    ct_lanes_clear(acc)
    for n in range(N):
        row_sq_dev(&x[n, c, 0], P, mean[c], acc)
    var[c] = ct_lanes_total(acc) / m
    inv_std[c] = 1.0 / sqrt(var[c] + eps)
    for n in range(N):
        row_normalize(&x[n, c, 0], &out[n, c, 0], P, <floating> mean[c], <floating> inv_std[c],
                      gamma[c], beta[c], relu, add_row(add, n * x.shape[1] + c, P))


cdef void image_row_stats(const floating[:, :, ::1] x, double[:, :, ::1] part,
                          Py_ssize_t n) noexcept nogil:
    """Image n's rows: part[n, c] = (sum, sum of squared deviations from the row's mean)."""
    cdef Py_ssize_t C = x.shape[1], P = x.shape[2], c
    for c in range(C):
        if floating is float:
            ct_row_stats_float(&x[n, c, 0], P, &part[n, c, 0], &part[n, c, 1])
        else:
            ct_row_stats_double(&x[n, c, 0], P, &part[n, c, 0], &part[n, c, 1])


cdef void combine_row_stats(const double[:, :, ::1] part, Py_ssize_t P, double *mean, double *var,
                            double *inv_std, double eps) noexcept nogil:
    """Per channel, the rows' statistics added up in image order."""
    cdef Py_ssize_t N = part.shape[0], C = part.shape[1], n, c
    cdef double total, m2, d, m = <double> (N * P)
    for c in range(C):
        total = 0.0
        for n in range(N):
            total = total + part[n, c, 0]
        mean[c] = total / m
        m2 = 0.0
        for n in range(N):
            d = part[n, c, 0] / <double> P - mean[c]
            m2 = m2 + (part[n, c, 1] + <double> P * (d * d))
        var[c] = m2 / m
        inv_std[c] = 1.0 / sqrt(var[c] + eps)


cdef void features_train_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                                 const floating[::1] beta, floating[:, :, ::1] out,
                                 double[::1] mean, double[::1] var, double[::1] inv_std,
                                 double eps, bint relu, int num_threads):
    """Rows of one value: blocks of features per thread, each summed over the images in order."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], blocks = (C + FEATURE_BLOCK - 1) // FEATURE_BLOCK
    cdef Py_ssize_t block, c0, c1, c
    cdef floating[::1] mu = np.empty(C, dtype=np.float32 if floating is float else np.float64)
    cdef floating[::1] istd = np.empty_like(mu)
    with nogil:
        for block in prange(blocks, schedule="dynamic", num_threads=num_threads):
            c0 = block * FEATURE_BLOCK
            c1 = min(c0 + FEATURE_BLOCK, C)
            if floating is float:
                ct_features_stats_float(&x[0, 0, 0], N, C, c0, c1, &mean[0], &var[0])
            else:
                ct_features_stats_double(&x[0, 0, 0], N, C, c0, c1, &mean[0], &var[0])
            for c in range(c0, c1):
                inv_std[c] = 1.0 / sqrt(var[c] + eps)
                mu[c] = <floating> mean[c]
                istd[c] = <floating> inv_std[c]
            if floating is float:
                ct_features_normalize_float(&x[0, 0, 0], &out[0, 0, 0], N, C, c0, c1, &mu[0], &istd[0],
                                            &gamma[0], &beta[0], relu)
            else:
                ct_features_normalize_double(&x[0, 0, 0], &out[0, 0, 0], N, C, c0, c1, &mu[0], &istd[0],
                                             &gamma[0], &beta[0], relu)


def bn_train_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                     const floating[::1] beta, floating[:, :, ::1] out,
                     double[::1] mean, double[::1] var, double[::1] inv_std,
                     double eps, bint relu, bint by_images, int num_threads,
                     double[:, :, ::1] row_stats=None, const floating[:, :, ::1] add=None):
    """Per channel c: mean[c], biased var[c] and inv_std[c] = 1/sqrt(var + eps) of x[:, c, :],
    then out[:, c, :] = gamma[c] * (x - mean) * inv_std + beta[c] (then max(0, .) if relu).
    row_stats (N, C, 2), unless None: each row's (sum, sum of squared deviations from its own
    mean), as the image layout computes them (the conv before computed them on its output,
    ext/conv_row_stats.h): the statistics are combined from them, with the image layout's bits
    in either layout, and x is read once, to normalize it.
    add (N, C, P), unless None (rows of more than one value; not with relu): out = max(bn(x) +
    add, 0), a residual block's sum and ReLU in the same pass, add_relu_'s bits."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2], c, n
    cdef double[:, :, ::1] part
    cdef const floating *add_ptr = NULL
    if N == 0 or P == 0:
        return
    if add is not None:
        if P == 1 or relu:
            raise ValueError("bn_train_forward: add takes rows of more than one value, without relu")
        add_ptr = &add[0, 0, 0]
    if P == 1:
        features_train_forward(x, gamma, beta, out, mean, var, inv_std, eps, relu, num_threads)
        return
    if row_stats is not None:
        with nogil:
            combine_row_stats(row_stats, P, &mean[0], &var[0], &inv_std[0], eps)
            if by_images:
                for n in prange(N, schedule="dynamic", num_threads=num_threads):
                    for c in range(C):
                        row_normalize(&x[n, c, 0], &out[n, c, 0], P, <floating> mean[c],
                                      <floating> inv_std[c], gamma[c], beta[c], relu,
                                      add_row(add_ptr, n * C + c, P))
            else:
                for c in prange(C, schedule="static", num_threads=num_threads):
                    for n in range(N):
                        row_normalize(&x[n, c, 0], &out[n, c, 0], P, <floating> mean[c],
                                      <floating> inv_std[c], gamma[c], beta[c], relu,
                                      add_row(add_ptr, n * C + c, P))
        return
    if not by_images:
        with nogil:
            for c in prange(C, schedule="static", num_threads=num_threads):
                channel_train_forward(x, gamma, beta, out, &mean[0], &var[0], &inv_std[0], eps, relu, c,
                                      add_ptr)
        return
    part = np.empty((N, C, 2))
    with nogil:
        for n in prange(N, schedule="dynamic", num_threads=num_threads):
            image_row_stats(x, part, n)
        combine_row_stats(part, P, &mean[0], &var[0], &inv_std[0], eps)
        for n in prange(N, schedule="dynamic", num_threads=num_threads):
            for c in range(C):
                row_normalize(&x[n, c, 0], &out[n, c, 0], P, <floating> mean[c],
                              <floating> inv_std[c], gamma[c], beta[c], relu,
                              add_row(add_ptr, n * C + c, P))


def bn_affine_forward(const floating[:, :, ::1] x, const floating[::1] scale,
                      const floating[::1] shift, floating[:, :, ::1] out,
                      bint relu, bint by_images, int num_threads):
    """Eval mode: out[:, c, :] = x[:, c, :] * scale[c] + shift[c] (then max(0, .) if relu)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2]
    cdef Py_ssize_t c, n
    if N == 0 or P == 0:
        return
    with nogil:
        if P > 1 and not by_images:  # (rows of one value: the images' rows are contiguous)
            for c in prange(C, schedule="static", num_threads=num_threads):
                for n in range(N):
                    row_affine(&x[n, c, 0], &out[n, c, 0], P, scale[c], shift[c], relu)
        else:
            for n in prange(N, schedule="dynamic", num_threads=num_threads):
                for c in range(C):
                    row_affine(&x[n, c, 0], &out[n, c, 0], P, scale[c], shift[c], relu)


# ---- backward -----------------------------------------------------------------------------

cdef void channel_backward(const floating[:, :, ::1] x, floating[:, :, ::1] g,
                           const floating[:, :, ::1] out, bint relu, const double *mean,
                           const double *inv_std, const floating[::1] gamma,
                           floating[::1] dgamma, floating[::1] dbeta, floating *dx,
                           Py_ssize_t c) noexcept nogil:
    """The channel layout: channel c whole, mask, sums, then dx in place of g (dx is g's
    start) or into dx (N, C, P)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2], n
    cdef double acc_g[CT_NORM_LANES]
    cdef double acc_gx[CT_NORM_LANES]
    cdef double sum_g, sum_gx, m = <double> (N * P)
    ct_lanes_clear(acc_g)
    ct_lanes_clear(acc_gx)
    for n in range(N):
        if relu:
            row_relu_mask(&g[n, c, 0], &out[n, c, 0], P)
        row_grad_sums(&x[n, c, 0], &g[n, c, 0], P, mean[c], acc_g, acc_gx)
    sum_g = ct_lanes_total(acc_g)
    sum_gx = ct_lanes_total(acc_gx) * inv_std[c]  # sum g * xhat
    dbeta[c] = <floating> sum_g
    dgamma[c] = <floating> sum_gx
    for n in range(N):
        row_input_grad(&x[n, c, 0], &g[n, c, 0], dx + (n * C + c) * P, P,
                       <floating> mean[c], <floating> inv_std[c], <floating> (gamma[c] * inv_std[c]),
                       <floating> (sum_g / m), <floating> (sum_gx / m))


cdef void image_grad_sums(const floating[:, :, ::1] x, floating[:, :, ::1] g,
                          const floating[:, :, ::1] out, bint relu, const double *mean,
                          double[:, :, ::1] part, Py_ssize_t n) noexcept nogil:
    """Image n's rows: mask g in place, then part[n, c] = (sum g, sum g * (x - mean))."""
    cdef Py_ssize_t C = x.shape[1], P = x.shape[2], c
    for c in range(C):
        if floating is float:
            ct_row_grad_totals_float(&x[n, c, 0], &g[n, c, 0], &out[n, c, 0], relu, P, mean[c],
                                     &part[n, c, 0], &part[n, c, 1])
        else:
            ct_row_grad_totals_double(&x[n, c, 0], &g[n, c, 0], &out[n, c, 0], relu, P, mean[c],
                                      &part[n, c, 0], &part[n, c, 1])


cdef void features_backward(const floating[:, :, ::1] x, floating[:, :, ::1] g,
                            const floating[:, :, ::1] out, bint relu, const double[::1] mean,
                            const double[::1] inv_std, const floating[::1] gamma,
                            floating[::1] dgamma, floating[::1] dbeta, int num_threads):
    """Rows of one value: blocks of features per thread, each summed over the images in order."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], blocks = (C + FEATURE_BLOCK - 1) // FEATURE_BLOCK
    cdef Py_ssize_t block, c0, c1, c
    cdef double[::1] sum_g = np.empty(C), sum_gx = np.empty(C)
    # per feature, in the dtype of the data: mean, inv_std, gamma * inv_std, dbeta / M, dgamma / M
    cdef floating[:, ::1] coef = np.empty((5, C), dtype=np.float32 if floating is float else np.float64)
    with nogil:
        for block in prange(blocks, schedule="dynamic", num_threads=num_threads):
            c0 = block * FEATURE_BLOCK
            c1 = min(c0 + FEATURE_BLOCK, C)
            if floating is float:
                ct_features_grad_sums_float(&x[0, 0, 0], &g[0, 0, 0], &out[0, 0, 0], relu, N, C, c0, c1,
                                            &mean[0], &sum_g[0], &sum_gx[0])
            else:
                ct_features_grad_sums_double(&x[0, 0, 0], &g[0, 0, 0], &out[0, 0, 0], relu, N, C, c0, c1,
                                             &mean[0], &sum_g[0], &sum_gx[0])
            for c in range(c0, c1):
                sum_gx[c] = sum_gx[c] * inv_std[c]  # sum g * xhat
                dbeta[c] = <floating> sum_g[c]
                dgamma[c] = <floating> sum_gx[c]
                coef[0, c] = <floating> mean[c]
                coef[1, c] = <floating> inv_std[c]
                coef[2, c] = <floating> (gamma[c] * inv_std[c])
                coef[3, c] = <floating> (sum_g[c] / <double> N)
                coef[4, c] = <floating> (sum_gx[c] / <double> N)
            if floating is float:
                ct_features_input_grad_float(&x[0, 0, 0], &g[0, 0, 0], N, C, c0, c1, &coef[0, 0],
                                             &coef[1, 0], &coef[2, 0], &coef[3, 0], &coef[4, 0])
            else:
                ct_features_input_grad_double(&x[0, 0, 0], &g[0, 0, 0], N, C, c0, c1, &coef[0, 0],
                                              &coef[1, 0], &coef[2, 0], &coef[3, 0], &coef[4, 0])


def bn_backward_(const floating[:, :, ::1] x, floating[:, :, ::1] dout,
                 const floating[:, :, ::1] out, bint relu,
                 const double[::1] mean, const double[::1] inv_std, const floating[::1] gamma,
                 floating[::1] dgamma, floating[::1] dbeta, bint by_images, int num_threads,
                 floating[:, :, ::1] dx=None, double[:, :, ::1] row_sums=None):
    """Gradients of batch norm in train mode (batch statistics), per channel c; dout becomes
    dx in place, or (with dx, rows of more than one value) dout is kept (masked by out > 0 in
    place if relu) and dx is written there, with the same bits:

        xhat = (x - mean) * inv_std,  g = dout (masked by out > 0 if relu)
        dbeta = sum g,  dgamma = sum g * xhat
        dx = gamma * inv_std * (g - dbeta / M - xhat * dgamma / M),  M = N * P

    row_sums (N, C, 2), unless None: each row's (sum g, sum g * (x - mean)), dout already
    masked (the conv that computed dout took them while it was in cache, ext/conv_row_stats.h):
    the first pass is skipped, the sums combined in image order (the bits of the image layout,
    in either layout), then dx."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2], c, n
    cdef double sum_g, sum_gx, m = <double> (N * P)
    cdef double[:, :, ::1] part
    cdef double[:, ::1] coef
    cdef floating *dst
    cdef bint have_sums = row_sums is not None
    if N == 0 or P == 0:
        return
    if P == 1:
        if have_sums:
            raise ValueError("bn_backward_: row_sums take rows of more than one value")
        if dx is not None:
            raise ValueError("bn_backward_: dx apart from dout takes rows of more than one value")
        features_backward(x, dout, out, relu, mean, inv_std, gamma, dgamma, dbeta, num_threads)
        return
    dst = &dout[0, 0, 0] if dx is None else &dx[0, 0, 0]
    if have_sums:
        part = row_sums
    elif not by_images:
        with nogil:
            for c in prange(C, schedule="static", num_threads=num_threads):
                channel_backward(x, dout, out, relu, &mean[0], &inv_std[0], gamma, dgamma, dbeta,
                                 dst, c)
        return
    else:
        part = np.empty((N, C, 2))
    coef = np.empty((C, 3))  # per channel: gamma * inv_std, dbeta / M, dgamma / M
    with nogil:
        if not have_sums:
            for n in prange(N, schedule="dynamic", num_threads=num_threads):
                image_grad_sums(x, dout, out, relu, &mean[0], part, n)
        for c in range(C):
            sum_g = 0.0
            sum_gx = 0.0
            for n in range(N):
                sum_g = sum_g + part[n, c, 0]
                sum_gx = sum_gx + part[n, c, 1]
            sum_gx = sum_gx * inv_std[c]  # sum g * xhat
            dbeta[c] = <floating> sum_g
            dgamma[c] = <floating> sum_gx
            coef[c, 0] = gamma[c] * inv_std[c]
            coef[c, 1] = sum_g / m
            coef[c, 2] = sum_gx / m
        if by_images:
            for n in prange(N, schedule="dynamic", num_threads=num_threads):
                for c in range(C):
                    row_input_grad(&x[n, c, 0], &dout[n, c, 0], dst + (n * C + c) * P, P,
                                   <floating> mean[c], <floating> inv_std[c], <floating> coef[c, 0],
                                   <floating> coef[c, 1], <floating> coef[c, 2])
        else:   # (row sums given) channel by channel, as the caches hold these activations
            for c in prange(C, schedule="static", num_threads=num_threads):
                for n in range(N):
                    row_input_grad(&x[n, c, 0], &dout[n, c, 0], dst + (n * C + c) * P, P,
                                   <floating> mean[c], <floating> inv_std[c], <floating> coef[c, 0],
                                   <floating> coef[c, 1], <floating> coef[c, 2])

