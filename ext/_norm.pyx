"""convtrain's batch-normalization kernels: per-channel statistics, normalization, backward.

What this file is: the two passes batch norm makes over (N, C, P) activations (P = H*W for a
conv's output, 1 after a dense layer), written once for float32 and float64 (`floating`),
with the GIL released and OpenMP over channels. What it refuses to be: a Python API; every
`def` trusts its caller (convtrain.nn.norm) to have checked shapes, dtypes and contiguity
and to have allocated the outputs.

Determinism: one channel is reduced by one thread, always in the same order (images, then
positions), into eight float64 partial sums (position p goes to lane p % 8, the lanes are
added up in order at the end); so the results are the same bits for any thread count. The
eight independent lanes, not one running sum, let the adds overlap and vectorize: a single
chain of dependent adds ran batch norm at ~60% of a CIFAR conv step's cost.
The optional ReLU epilogue (forward: max(0, y); backward: dy where the output is > 0) spares
the pass a separate ReLU layer would make over the activations.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

cdef extern from *:
    """
    #define CONVTRAIN_LANES 8
    /* Row kernels over one (image, channel) row of P values, for T = float and double. Plain
       element-wise loops over restrict pointers and fixed lanes: GCC vectorizes them without
       reordering any sum, so every build gives the same bits. The ReLU mask is a select,
       not a branch (half the values are masked: a branch would be mispredicted half the time). */
    #define CONVTRAIN_NORM_ROWS(T)                                                                \
    static inline void row_sum_##T(const T *restrict x, Py_ssize_t n, double *restrict acc) {      \
        Py_ssize_t p = 0, k;                                                                      \
        for (; p + CONVTRAIN_LANES <= n; p += CONVTRAIN_LANES)                                    \
            for (k = 0; k < CONVTRAIN_LANES; k++) acc[k] += (double) x[p + k];                    \
        for (k = 0; p < n; p++, k++) acc[k] += (double) x[p];                                     \
    }                                                                                             \
    static inline void row_sq_dev_##T(const T *restrict x, Py_ssize_t n, double mean,             \
                                      double *restrict acc) {                                     \
        Py_ssize_t p = 0, k;                                                                      \
        double d;                                                                                 \
        for (; p + CONVTRAIN_LANES <= n; p += CONVTRAIN_LANES)                                    \
            for (k = 0; k < CONVTRAIN_LANES; k++) {                                               \
                d = (double) x[p + k] - mean;                                                     \
                acc[k] += d * d;                                                                  \
            }                                                                                     \
        for (k = 0; p < n; p++, k++) { d = (double) x[p] - mean; acc[k] += d * d; }               \
    }                                                                                             \
    static inline void row_normalize_##T(const T *restrict x, T *restrict out, Py_ssize_t n,      \
                                         T mu, T istd, T g, T b, int relu) {                      \
        Py_ssize_t p;                                                                             \
        T y;                                                                                      \
        if (relu) {                                                                               \
            for (p = 0; p < n; p++) { y = g * ((x[p] - mu) * istd) + b; out[p] = y > 0 ? y : 0; } \
        } else {                                                                                  \
            for (p = 0; p < n; p++) out[p] = g * ((x[p] - mu) * istd) + b;                        \
        }                                                                                         \
    }                                                                                             \
    static inline void row_affine_##T(const T *restrict x, T *restrict out, Py_ssize_t n,         \
                                      T s, T t, int relu) {                                       \
        Py_ssize_t p;                                                                             \
        T y;                                                                                      \
        if (relu) {                                                                               \
            for (p = 0; p < n; p++) { y = x[p] * s + t; out[p] = y > 0 ? y : 0; }                 \
        } else {                                                                                  \
            for (p = 0; p < n; p++) out[p] = x[p] * s + t;                                        \
        }                                                                                         \
    }                                                                                             \
    /* g = dout where out > 0, else 0 (the fused ReLU's gradient). dout is loaded whatever    \
       the mask: a load under the condition kept GCC from making the select branch-free, and  \
       a mispredicted branch per value made the backward 4x slower. */                        \
    static inline void row_relu_mask_##T(const T *restrict d, const T *restrict out,             \
                                         T *restrict g, Py_ssize_t n) {                           \
        Py_ssize_t p;                                                                             \
        T dv;                                                                                     \
        for (p = 0; p < n; p++) { dv = d[p]; g[p] = out[p] > 0 ? dv : (T) 0; }                    \
    }                                                                                             \
    /* sum g and sum g * (x - mean) */                                                            \
    static inline void row_grad_sums_##T(const T *restrict x, const T *restrict g, Py_ssize_t n,  \
                                         double mean, double *restrict acc_g,                     \
                                         double *restrict acc_gx) {                               \
        Py_ssize_t p = 0, k;                                                                      \
        double gv;                                                                                \
        for (; p + CONVTRAIN_LANES <= n; p += CONVTRAIN_LANES)                                    \
            for (k = 0; k < CONVTRAIN_LANES; k++) {                                               \
                gv = (double) g[p + k];                                                           \
                acc_g[k] += gv;                                                                   \
                acc_gx[k] += gv * ((double) x[p + k] - mean);                                     \
            }                                                                                     \
        for (k = 0; p < n; p++, k++) {                                                            \
            gv = (double) g[p];                                                                   \
            acc_g[k] += gv;                                                                       \
            acc_gx[k] += gv * ((double) x[p] - mean);                                             \
        }                                                                                         \
    }                                                                                             \
    /* dx = k * (g - a - xhat * b); g may be dx itself (then updated in place) */                 \
    static inline void row_input_grad_##T(const T *restrict x, const T *g, T *dx, Py_ssize_t n,   \
                                          T mu, T istd, T k, T a, T b) {                          \
        Py_ssize_t p;                                                                             \
        for (p = 0; p < n; p++) dx[p] = k * (g[p] - a - ((x[p] - mu) * istd) * b);                \
    }
    CONVTRAIN_NORM_ROWS(float)
    CONVTRAIN_NORM_ROWS(double)
    static inline double lanes_total(const double *acc) {
        double total = 0.0;
        for (int k = 0; k < CONVTRAIN_LANES; k++) total += acc[k];
        return total;
    }
    static inline void lanes_clear(double *acc) {
        for (int k = 0; k < CONVTRAIN_LANES; k++) acc[k] = 0.0;
    }
    """
    enum: CONVTRAIN_LANES
    void row_sum_float(const float *x, Py_ssize_t n, double *acc) noexcept nogil
    void row_sum_double(const double *x, Py_ssize_t n, double *acc) noexcept nogil
    void row_sq_dev_float(const float *x, Py_ssize_t n, double mean, double *acc) noexcept nogil
    void row_sq_dev_double(const double *x, Py_ssize_t n, double mean, double *acc) noexcept nogil
    void row_normalize_float(const float *x, float *out, Py_ssize_t n, float mu, float istd,
                             float g, float b, int relu) noexcept nogil
    void row_normalize_double(const double *x, double *out, Py_ssize_t n, double mu, double istd,
                              double g, double b, int relu) noexcept nogil
    void row_affine_float(const float *x, float *out, Py_ssize_t n, float s, float t, int relu) noexcept nogil
    void row_affine_double(const double *x, double *out, Py_ssize_t n, double s, double t,
                           int relu) noexcept nogil
    void row_relu_mask_float(const float *d, const float *out, float *g, Py_ssize_t n) noexcept nogil
    void row_relu_mask_double(const double *d, const double *out, double *g, Py_ssize_t n) noexcept nogil
    void row_grad_sums_float(const float *x, const float *g, Py_ssize_t n, double mean,
                             double *acc_g, double *acc_gx) noexcept nogil
    void row_grad_sums_double(const double *x, const double *g, Py_ssize_t n, double mean,
                              double *acc_g, double *acc_gx) noexcept nogil
    void row_input_grad_float(const float *x, const float *g, float *dx, Py_ssize_t n, float mu,
                              float istd, float k, float a, float b) noexcept nogil
    void row_input_grad_double(const double *x, const double *g, double *dx, Py_ssize_t n,
                               double mu, double istd, double k, double a, double b) noexcept nogil
    double lanes_total(const double *acc) noexcept nogil
    void lanes_clear(double *acc) noexcept nogil


cdef inline void row_sum(const floating *x, Py_ssize_t n, double *acc) noexcept nogil:
    if floating is float:
        row_sum_float(x, n, acc)
    else:
        row_sum_double(x, n, acc)


cdef inline void row_sq_dev(const floating *x, Py_ssize_t n, double mean, double *acc) noexcept nogil:
    if floating is float:
        row_sq_dev_float(x, n, mean, acc)
    else:
        row_sq_dev_double(x, n, mean, acc)


cdef inline void row_normalize(const floating *x, floating *out, Py_ssize_t n, floating mu,
                               floating istd, floating g, floating b, int relu) noexcept nogil:
    if floating is float:
        row_normalize_float(x, out, n, mu, istd, g, b, relu)
    else:
        row_normalize_double(x, out, n, mu, istd, g, b, relu)


cdef inline void row_affine(const floating *x, floating *out, Py_ssize_t n, floating s, floating t,
                            int relu) noexcept nogil:
    if floating is float:
        row_affine_float(x, out, n, s, t, relu)
    else:
        row_affine_double(x, out, n, s, t, relu)


cdef inline void row_relu_mask(const floating *d, const floating *out, floating *g,
                               Py_ssize_t n) noexcept nogil:
    if floating is float:
        row_relu_mask_float(d, out, g, n)
    else:
        row_relu_mask_double(d, out, g, n)


cdef inline void row_grad_sums(const floating *x, const floating *g, Py_ssize_t n, double mean,
                               double *acc_g, double *acc_gx) noexcept nogil:
    if floating is float:
        row_grad_sums_float(x, g, n, mean, acc_g, acc_gx)
    else:
        row_grad_sums_double(x, g, n, mean, acc_g, acc_gx)


cdef inline void row_input_grad(const floating *x, const floating *g, floating *dx, Py_ssize_t n,
                                floating mu, floating istd, floating k, floating a,
                                floating b) noexcept nogil:
    if floating is float:
        row_input_grad_float(x, g, dx, n, mu, istd, k, a, b)
    else:
        row_input_grad_double(x, g, dx, n, mu, istd, k, a, b)


cdef void channel_train_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                                const floating[::1] beta, floating[:, :, ::1] out,
                                double *mean, double *var, double *inv_std,
                                double eps, bint relu, Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], P = x.shape[2], n
    cdef double acc[CONVTRAIN_LANES]
    cdef double m = <double> (N * P)
    lanes_clear(acc)
    for n in range(N):
        row_sum(&x[n, c, 0], P, acc)
    mean[c] = lanes_total(acc) / m
    # Two passes (not E[x^2] - E[x]^2): no cancellation when the mean is large.
    lanes_clear(acc)
    for n in range(N):
        row_sq_dev(&x[n, c, 0], P, mean[c], acc)
    var[c] = lanes_total(acc) / m
    inv_std[c] = 1.0 / sqrt(var[c] + eps)
    for n in range(N):
        row_normalize(&x[n, c, 0], &out[n, c, 0], P, <floating> mean[c], <floating> inv_std[c],
                      gamma[c], beta[c], relu)


def bn_train_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                     const floating[::1] beta, floating[:, :, ::1] out,
                     double[::1] mean, double[::1] var, double[::1] inv_std,
                     double eps, bint relu, int num_threads):
    """Per channel c: mean[c], biased var[c] and inv_std[c] = 1/sqrt(var + eps) of x[:, c, :],
    then out[:, c, :] = gamma[c] * (x - mean) * inv_std + beta[c] (then max(0, .) if relu)."""
    cdef Py_ssize_t C = x.shape[1], c
    if x.shape[0] == 0 or x.shape[2] == 0:
        return
    with nogil:
        for c in prange(C, schedule="dynamic", num_threads=num_threads):
            channel_train_forward(x, gamma, beta, out, &mean[0], &var[0], &inv_std[0], eps, relu, c)


def bn_affine_forward(const floating[:, :, ::1] x, const floating[::1] scale,
                      const floating[::1] shift, floating[:, :, ::1] out,
                      bint relu, int num_threads):
    """Eval mode: out[:, c, :] = x[:, c, :] * scale[c] + shift[c] (then max(0, .) if relu)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2]
    cdef Py_ssize_t c, n
    if N == 0 or P == 0:
        return
    with nogil:
        for c in prange(C, schedule="dynamic", num_threads=num_threads):
            for n in range(N):
                row_affine(&x[n, c, 0], &out[n, c, 0], P, scale[c], shift[c], relu)


cdef void channel_backward(const floating[:, :, ::1] x, const floating[:, :, ::1] dout,
                           const floating[:, :, ::1] out, bint relu, const double *mean,
                           const double *inv_std, const floating[::1] gamma,
                           floating[:, :, ::1] dx, floating[::1] dgamma, floating[::1] dbeta,
                           Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], P = x.shape[2], n
    cdef double acc_g[CONVTRAIN_LANES]
    cdef double acc_gx[CONVTRAIN_LANES]
    cdef double sum_g, sum_gx, m = <double> (N * P)
    cdef const floating *g
    lanes_clear(acc_g)
    lanes_clear(acc_gx)
    # With the fused ReLU, g (dout masked) is made in dx's row first, then used from there.
    for n in range(N):
        if relu:
            row_relu_mask(&dout[n, c, 0], &out[n, c, 0], &dx[n, c, 0], P)
            row_grad_sums(&x[n, c, 0], &dx[n, c, 0], P, mean[c], acc_g, acc_gx)
        else:
            row_grad_sums(&x[n, c, 0], &dout[n, c, 0], P, mean[c], acc_g, acc_gx)
    sum_g = lanes_total(acc_g)
    sum_gx = lanes_total(acc_gx) * inv_std[c]  # sum g * xhat
    dbeta[c] = <floating> sum_g
    dgamma[c] = <floating> sum_gx
    for n in range(N):
        if relu:
            g = &dx[n, c, 0]
        else:
            g = &dout[n, c, 0]
        row_input_grad(&x[n, c, 0], g, &dx[n, c, 0], P,
                       <floating> mean[c], <floating> inv_std[c], <floating> (gamma[c] * inv_std[c]),
                       <floating> (sum_g / m), <floating> (sum_gx / m))


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
    cdef Py_ssize_t C = x.shape[1], c
    if x.shape[0] == 0 or x.shape[2] == 0:
        return
    with nogil:
        for c in prange(C, schedule="dynamic", num_threads=num_threads):
            channel_backward(x, dout, out, relu, &mean[0], &inv_std[0], gamma, dx, dgamma, dbeta, c)
