/* The loops of batch normalization (ext/_norm.pyx), for T = float and double: over one
   (image, channel) row of n values, or over a block of features of every image (rows of one
   value). Plain C loops over non-aliasing (restrict) pointers, so that the compiler vectorizes
   them (written in Cython, where every pointer may alias, it cannot).

   Sums are float64. Along a row they go in CT_NORM_LANES fixed lanes: position p of a row goes
   to lane p % LANES, each lane adds in row order, and the lanes are added up pairwise at the
   end (ct_lanes_total). A vector unit of any width then computes the same bits (each vector
   element is one lane), and the lanes are independent chains of adds, held in registers for
   the length of a row (32 lanes: four AVX-512 registers; with 8 or 16 lanes the backward's row
   sums ran at half the speed, on rows in cache).

   Nothing here may be contracted into fused multiply-adds, which would round differently in
   the x86-64-v3/v4 builds than in the portable one: setup.py builds this module with
   -ffp-contract=off. */
#ifndef CONVTRAIN_NORM_ROWS_H
#define CONVTRAIN_NORM_ROWS_H

#include <Python.h>  /* Py_ssize_t */

#if defined(_MSC_VER)
#define CT_RESTRICT __restrict
#else
#define CT_RESTRICT __restrict__
#endif

#define CT_NORM_LANES 32

/* The lanes added up pairwise, halving the width each step (lane k + lane k + w): a fixed
   order, so the same bits everywhere, and independent adds rather than one chain. */
static inline double ct_lanes_total(const double *acc) {
    double t[CT_NORM_LANES];
    int k, w;
    for (k = 0; k < CT_NORM_LANES; k++) t[k] = acc[k];
    for (w = CT_NORM_LANES / 2; w >= 1; w /= 2)
        for (k = 0; k < w; k++) t[k] = t[k] + t[k + w];
    return t[0];
}

#define CT_NORM_ROWS(T)                                                                            \
/* acc[k] += x[p] for p % LANES == k */                                                          \
static inline void ct_row_sum_##T(const T *CT_RESTRICT x, Py_ssize_t n, double *CT_RESTRICT acc) { \
    double a[CT_NORM_LANES];                                                                      \
    Py_ssize_t p = 0, k;                                                                          \
    if (n < CT_NORM_LANES) { /* a short row: straight into its lanes, 8 at a time */             \
        for (; p + 8 <= n; p += 8)                                                                \
            for (k = 0; k < 8; k++) acc[p + k] += (double) x[p + k];                              \
        for (; p < n; p++) acc[p] += (double) x[p];                                               \
        return;                                                                                   \
    }                                                                                             \
    for (k = 0; k < CT_NORM_LANES; k++) a[k] = acc[k];                                            \
    for (; p + CT_NORM_LANES <= n; p += CT_NORM_LANES)                                            \
        for (k = 0; k < CT_NORM_LANES; k++) a[k] += (double) x[p + k];                            \
    for (k = 0; p < n; p++, k++) a[k] += (double) x[p];                                           \
    for (k = 0; k < CT_NORM_LANES; k++) acc[k] = a[k];                                            \
}                                                                                                 \
/* acc[k] += (x[p] - mean)^2 */                                                                  \
static inline void ct_row_sq_dev_##T(const T *CT_RESTRICT x, Py_ssize_t n, double mean,          \
                                     double *CT_RESTRICT acc) {                                   \
    double a[CT_NORM_LANES], d;                                                                   \
    Py_ssize_t p = 0, k;                                                                          \
    if (n < CT_NORM_LANES) {                                                                      \
        for (; p + 8 <= n; p += 8)                                                                \
            for (k = 0; k < 8; k++) { d = (double) x[p + k] - mean; acc[p + k] += d * d; }        \
        for (; p < n; p++) { d = (double) x[p] - mean; acc[p] += d * d; }                         \
        return;                                                                                   \
    }                                                                                             \
    for (k = 0; k < CT_NORM_LANES; k++) a[k] = acc[k];                                            \
    for (; p + CT_NORM_LANES <= n; p += CT_NORM_LANES)                                            \
        for (k = 0; k < CT_NORM_LANES; k++) {                                                     \
            d = (double) x[p + k] - mean;                                                         \
            a[k] += d * d;                                                                        \
        }                                                                                         \
    for (k = 0; p < n; p++, k++) { d = (double) x[p] - mean; a[k] += d * d; }                     \
    for (k = 0; k < CT_NORM_LANES; k++) acc[k] = a[k];                                            \
}                                                                                                 \
/* out = g * ((x - mu) * istd) + b, then max(0, .) if relu. The ReLU is a select, not a        \
   branch: half the values are masked, and a branch would be mispredicted half the time. */      \
static inline void ct_row_normalize_##T(const T *CT_RESTRICT x, T *CT_RESTRICT out, Py_ssize_t n, \
                                        T mu, T istd, T g, T b, int relu) {                       \
    Py_ssize_t p;                                                                                 \
    T y;                                                                                          \
    if (relu) {                                                                                   \
        for (p = 0; p < n; p++) { y = g * ((x[p] - mu) * istd) + b; out[p] = y > 0 ? y : 0; }     \
    } else {                                                                                      \
        for (p = 0; p < n; p++) out[p] = g * ((x[p] - mu) * istd) + b;                            \
    }                                                                                             \
}                                                                                                 \
/* out = max(g * ((x - mu) * istd) + b + a, 0): the normalized row plus a residual block's   \
   shortcut row a, then the block's ReLU, with the bits of the two passes it replaces (y      \
   rounded, then y + a rounded, then NaN kept, -0.0 and negatives to +0.0 as add_relu_). */      \
static inline void ct_row_normalize_add_##T(const T *CT_RESTRICT x, const T *CT_RESTRICT a,      \
                                            T *CT_RESTRICT out, Py_ssize_t n, T mu, T istd, T g,  \
                                            T b) {                                                \
    Py_ssize_t p;                                                                                 \
    T y, t;                                                                                       \
    for (p = 0; p < n; p++) {                                                                     \
        y = g * ((x[p] - mu) * istd) + b;                                                         \
        t = y + a[p];                                                                             \
        out[p] = (t > 0 || t != t) ? t : (T) 0;                                                   \
    }                                                                                             \
}                                                                                                 \
/* eval mode: out = x * s + t, then max(0, .) if relu */                                         \
static inline void ct_row_affine_##T(const T *CT_RESTRICT x, T *CT_RESTRICT out, Py_ssize_t n,    \
                                     T s, T t, int relu) {                                        \
    Py_ssize_t p;                                                                                 \
    T y;                                                                                          \
    if (relu) {                                                                                   \
        for (p = 0; p < n; p++) { y = x[p] * s + t; out[p] = y > 0 ? y : 0; }                     \
    } else {                                                                                      \
        for (p = 0; p < n; p++) out[p] = x[p] * s + t;                                            \
    }                                                                                             \
}                                                                                                 \
/* g = g where out > 0, else 0 (the fused ReLU's gradient), in place. g is loaded whatever the  \
   mask: a load under the condition kept GCC from making the select branch-free, and a         \
   mispredicted branch per value made the backward 4x slower. */                                 \
static inline void ct_row_relu_mask_##T(T *CT_RESTRICT g, const T *CT_RESTRICT out, Py_ssize_t n) { \
    Py_ssize_t p;                                                                                 \
    T gv;                                                                                         \
    for (p = 0; p < n; p++) { gv = g[p]; g[p] = out[p] > 0 ? gv : (T) 0; }                        \
}                                                                                                 \
/* acc_g[k] += g[p] and acc_gx[k] += g[p] * (x[p] - mean) */                                     \
static inline void ct_row_grad_sums_##T(const T *CT_RESTRICT x, const T *CT_RESTRICT g,          \
                                        Py_ssize_t n, double mean, double *CT_RESTRICT acc_g,     \
                                        double *CT_RESTRICT acc_gx) {                             \
    double a[CT_NORM_LANES], b[CT_NORM_LANES], gv;                                                \
    Py_ssize_t p = 0, k;                                                                          \
    if (n < CT_NORM_LANES) {                                                                      \
        for (; p + 8 <= n; p += 8)                                                                \
            for (k = 0; k < 8; k++) {                                                             \
                gv = (double) g[p + k];                                                           \
                acc_g[p + k] += gv;                                                               \
                acc_gx[p + k] += gv * ((double) x[p + k] - mean);                                 \
            }                                                                                     \
        for (; p < n; p++) {                                                                      \
            gv = (double) g[p];                                                                   \
            acc_g[p] += gv;                                                                       \
            acc_gx[p] += gv * ((double) x[p] - mean);                                             \
        }                                                                                         \
        return;                                                                                   \
    }                                                                                             \
    for (k = 0; k < CT_NORM_LANES; k++) { a[k] = acc_g[k]; b[k] = acc_gx[k]; }                    \
    for (; p + CT_NORM_LANES <= n; p += CT_NORM_LANES)                                            \
        for (k = 0; k < CT_NORM_LANES; k++) {                                                     \
            gv = (double) g[p + k];                                                               \
            a[k] += gv;                                                                           \
            b[k] += gv * ((double) x[p + k] - mean);                                              \
        }                                                                                         \
    for (k = 0; p < n; p++, k++) {                                                                \
        gv = (double) g[p];                                                                       \
        a[k] += gv;                                                                               \
        b[k] += gv * ((double) x[p] - mean);                                                      \
    }                                                                                             \
    for (k = 0; k < CT_NORM_LANES; k++) { acc_g[k] = a[k]; acc_gx[k] = b[k]; }                    \
}                                                                                                 \
/* One row's own statistics, for the image-streaming layout: *total = sum x and *m2 = sum of   \
   (x - total / n)^2, the row read twice while it is in L1. */                                  \
static inline void ct_row_stats_##T(const T *CT_RESTRICT x, Py_ssize_t n, double *total,         \
                                    double *m2) {                                                 \
    double a[CT_NORM_LANES] = {0}, b[CT_NORM_LANES] = {0};                                        \
    ct_row_sum_##T(x, n, a);                                                                      \
    *total = ct_lanes_total(a);                                                                   \
    ct_row_sq_dev_##T(x, n, *total / (double) n, b);                                              \
    *m2 = ct_lanes_total(b);                                                                      \
}                                                                                                 \
/* One row's gradient sums, for the image-streaming layout: g masked in place by out > 0 if     \
   relu, then *sum_g = sum g and *sum_gx = sum g * (x - mean). */                               \
static inline void ct_row_grad_totals_##T(const T *CT_RESTRICT x, T *CT_RESTRICT g,              \
                                          const T *CT_RESTRICT out, int relu, Py_ssize_t n,       \
                                          double mean, double *sum_g, double *sum_gx) {           \
    double a[CT_NORM_LANES] = {0}, b[CT_NORM_LANES] = {0};                                        \
    if (relu) ct_row_relu_mask_##T(g, out, n);                                                    \
    ct_row_grad_sums_##T(x, g, n, mean, a, b);                                                    \
    *sum_g = ct_lanes_total(a);                                                                   \
    *sum_gx = ct_lanes_total(b);                                                                  \
}                                                                                                 \
/* g becomes dx = kk * (g - a - xhat * b), in place */                                           \
static inline void ct_row_input_grad_##T(const T *CT_RESTRICT x, T *CT_RESTRICT g, Py_ssize_t n,  \
                                         T mu, T istd, T kk, T a, T b) {                          \
    Py_ssize_t p;                                                                                 \
    for (p = 0; p < n; p++) g[p] = kk * (g[p] - a - ((x[p] - mu) * istd) * b);                    \
}                                                                                                 \
/* the same dx into its own row (g kept): the same arithmetic, the same bits */                   \
static inline void ct_row_input_grad_to_##T(const T *CT_RESTRICT x, const T *CT_RESTRICT g,       \
                                            T *CT_RESTRICT dx, Py_ssize_t n,                      \
                                            T mu, T istd, T kk, T a, T b) {                       \
    Py_ssize_t p;                                                                                 \
    for (p = 0; p < n; p++) dx[p] = kk * (g[p] - a - ((x[p] - mu) * istd) * b);                   \
}

/* Rows of one value (a dense layer's (N, F) output): features c0 <= c < c1 of all N images at
   once, each feature's sums in image order, vectorized across the features (contiguous). */
#define CT_NORM_FEATURES(T)                                                                        \
static inline void ct_features_stats_##T(const T *CT_RESTRICT x, Py_ssize_t N, Py_ssize_t C,      \
                                         Py_ssize_t c0, Py_ssize_t c1, double *CT_RESTRICT mean,  \
                                         double *CT_RESTRICT var) {                               \
    Py_ssize_t n, c;                                                                              \
    double d;                                                                                     \
    for (c = c0; c < c1; c++) mean[c] = var[c] = 0.0;                                             \
    for (n = 0; n < N; n++)                                                                       \
        for (c = c0; c < c1; c++) mean[c] += (double) x[n * C + c];                               \
    for (c = c0; c < c1; c++) mean[c] /= (double) N;                                              \
    for (n = 0; n < N; n++)                                                                       \
        for (c = c0; c < c1; c++) { d = (double) x[n * C + c] - mean[c]; var[c] += d * d; }       \
    for (c = c0; c < c1; c++) var[c] /= (double) N;                                               \
}                                                                                                 \
/* out = g * ((x - mu) * istd) + b per feature (then max(0, .) if relu): the arithmetic of     \
   ct_row_normalize, with per-feature parameters */                                              \
static inline void ct_features_normalize_##T(const T *CT_RESTRICT x, T *CT_RESTRICT out,         \
                                             Py_ssize_t N, Py_ssize_t C, Py_ssize_t c0,           \
                                             Py_ssize_t c1, const T *CT_RESTRICT mu,              \
                                             const T *CT_RESTRICT istd, const T *CT_RESTRICT g,   \
                                             const T *CT_RESTRICT b, int relu) {                  \
    Py_ssize_t n, c;                                                                              \
    T y;                                                                                          \
    for (n = 0; n < N; n++)                                                                       \
        for (c = c0; c < c1; c++) {                                                               \
            y = g[c] * ((x[n * C + c] - mu[c]) * istd[c]) + b[c];                                 \
            out[n * C + c] = (relu && !(y > 0)) ? (T) 0 : y;                                      \
        }                                                                                         \
}                                                                                                 \
/* the fused ReLU's mask on g in place, then per feature sum g and sum g * (x - mean) */        \
static inline void ct_features_grad_sums_##T(const T *CT_RESTRICT x, T *CT_RESTRICT g,           \
                                             const T *CT_RESTRICT out, int relu, Py_ssize_t N,    \
                                             Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,          \
                                             const double *CT_RESTRICT mean,                      \
                                             double *CT_RESTRICT sum_g, double *CT_RESTRICT sum_gx) { \
    Py_ssize_t n, c;                                                                              \
    T gv;                                                                                         \
    for (c = c0; c < c1; c++) sum_g[c] = sum_gx[c] = 0.0;                                         \
    for (n = 0; n < N; n++) {                                                                     \
        if (relu)                                                                                 \
            for (c = c0; c < c1; c++) { gv = g[n * C + c]; g[n * C + c] = out[n * C + c] > 0 ? gv : (T) 0; } \
        for (c = c0; c < c1; c++) {                                                               \
            sum_g[c] += (double) g[n * C + c];                                                    \
            sum_gx[c] += (double) g[n * C + c] * ((double) x[n * C + c] - mean[c]);               \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
/* g becomes dx = kk * (g - a - xhat * b) per feature, in place (ct_row_input_grad's arithmetic) */ \
static inline void ct_features_input_grad_##T(const T *CT_RESTRICT x, T *CT_RESTRICT g,          \
                                              Py_ssize_t N, Py_ssize_t C, Py_ssize_t c0,          \
                                              Py_ssize_t c1, const T *CT_RESTRICT mu,             \
                                              const T *CT_RESTRICT istd, const T *CT_RESTRICT kk, \
                                              const T *CT_RESTRICT a, const T *CT_RESTRICT b) {   \
    Py_ssize_t n, c;                                                                              \
    for (n = 0; n < N; n++)                                                                       \
        for (c = c0; c < c1; c++)                                                                 \
            g[n * C + c] = kk[c] * (g[n * C + c] - a[c] - ((x[n * C + c] - mu[c]) * istd[c]) * b[c]); \
}

CT_NORM_ROWS(float)
CT_NORM_ROWS(double)
CT_NORM_FEATURES(float)
CT_NORM_FEATURES(double)

static inline void ct_lanes_clear(double *acc) {
    for (int k = 0; k < CT_NORM_LANES; k++) acc[k] = 0.0;
}

#endif
