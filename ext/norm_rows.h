/* The row kernels of batch normalization (ext/_norm.pyx): one (image, channel) row of n values
   at a time, for T = float and double. Plain C loops over non-aliasing (restrict) pointers, so
   that the compiler vectorizes them (written in Cython, where every pointer may alias, it
   cannot).

   Sums are float64, in CT_NORM_LANES fixed lanes: position p of a row goes to lane p % LANES,
   each lane adds in row order, and the lanes are added up in order at the end. A vector unit
   of any width then computes the same bits (each vector element is one lane), and the lanes
   are independent chains of adds that overlap in the pipeline: with one chain, or with one
   AVX-512 register of 8 lanes, the adds' latency set the pace. The lanes live in local arrays
   for the length of a row (through a pointer, the compiler stores them back after every add).

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

#define CT_NORM_ROWS(T)                                                                            \
/* acc[k] += x[p] for p % LANES == k */                                                          \
static inline void ct_row_sum_##T(const T *CT_RESTRICT x, Py_ssize_t n, double *CT_RESTRICT acc) { \
    double a[CT_NORM_LANES];                                                                      \
    Py_ssize_t p = 0, k;                                                                          \
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
/* g becomes dx = kk * (g - a - xhat * b), in place */                                           \
static inline void ct_row_input_grad_##T(const T *CT_RESTRICT x, T *CT_RESTRICT g, Py_ssize_t n,  \
                                         T mu, T istd, T kk, T a, T b) {                          \
    Py_ssize_t p;                                                                                 \
    for (p = 0; p < n; p++) g[p] = kk * (g[p] - a - ((x[p] - mu) * istd) * b);                    \
}

CT_NORM_ROWS(float)
CT_NORM_ROWS(double)

static inline double ct_lanes_total(const double *acc) {
    double total = 0.0;
    for (int k = 0; k < CT_NORM_LANES; k++) total += acc[k];
    return total;
}

static inline void ct_lanes_clear(double *acc) {
    for (int k = 0; k < CT_NORM_LANES; k++) acc[k] = 0.0;
}

#endif
