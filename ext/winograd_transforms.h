/* The tile transforms of Winograd F(2x2, 3x3) (ext/winograd.pxi), float and double: plain C
   loops with non-aliasing (restrict) pointers, so that the compiler keeps a tile in registers
   and vectorizes across tiles (written in Cython, where every pointer may alias, the
   transforms took longer than the 16 GEMMs between them).

   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1]. */
#ifndef CONVTRAIN_WINOGRAD_TRANSFORMS_H
#define CONVTRAIN_WINOGRAD_TRANSFORMS_H

#include <Python.h>  /* Py_ssize_t */

#if defined(_MSC_VER)
#define CT_RESTRICT __restrict
#else
#define CT_RESTRICT __restrict__
#endif

#define CONVTRAIN_WINOGRAD_TRANSFORMS(T)                                                          \
/* B^T down the columns: b_i[k] = (B^T d)[i] for the column d = (r0[k], r1[k], r2[k], r3[k]),    \
   k < n (contiguous: vectorized). */                                                            \
static inline void ct_winograd_columns_##T(const T *CT_RESTRICT r0, const T *CT_RESTRICT r1,     \
                                           const T *CT_RESTRICT r2, const T *CT_RESTRICT r3,     \
                                           Py_ssize_t n, T *CT_RESTRICT b0, T *CT_RESTRICT b1,   \
                                           T *CT_RESTRICT b2, T *CT_RESTRICT b3) {               \
    Py_ssize_t k;                                                                                \
    for (k = 0; k < n; k++) {                                                                    \
        b0[k] = r0[k] - r2[k];                                                                   \
        b1[k] = r1[k] + r2[k];                                                                   \
        b2[k] = r2[k] - r1[k];                                                                   \
        b3[k] = r1[k] - r3[k];                                                                   \
    }                                                                                            \
}                                                                                                \
/* B along a row: v[j*plane + u] = (b B)[j] for the 4 values b[2u .. 2u+3], u < n (tiles that   \
   overlap by two columns; stride-2 reads, vectorized across the n tiles). */                   \
static inline void ct_winograd_row_##T(const T *CT_RESTRICT b, Py_ssize_t n, T *CT_RESTRICT v,   \
                                       Py_ssize_t plane) {                                       \
    Py_ssize_t u;                                                                                \
    T *CT_RESTRICT v0 = v;                                                                       \
    T *CT_RESTRICT v1 = v + plane;                                                               \
    T *CT_RESTRICT v2 = v + 2 * plane;                                                           \
    T *CT_RESTRICT v3 = v + 3 * plane;                                                           \
    for (u = 0; u < n; u++) {                                                                    \
        v0[u] = b[2 * u] - b[2 * u + 2];                                                         \
        v1[u] = b[2 * u + 1] + b[2 * u + 2];                                                     \
        v2[u] = b[2 * u + 2] - b[2 * u + 1];                                                     \
        v3[u] = b[2 * u + 1] - b[2 * u + 3];                                                     \
    }                                                                                            \
}                                                                                                \
/* The filter gradient's transform of the output gradient: d[(4i + j)*plane + u] = (A g A^T)[i, j] \
   for the 2x2 tiles g = (e0[2u], e0[2u+1]; e1[2u], e1[2u+1]), u < n (A = (A^T)^T, 4x2). */       \
static inline void ct_winograd_gradient_tiles_##T(const T *CT_RESTRICT e0, const T *CT_RESTRICT e1, \
                                                  Py_ssize_t n, T *CT_RESTRICT d, Py_ssize_t plane) { \
    Py_ssize_t u;                                                                                \
    T c0[4], c1[4];                                                                              \
    int j;                                                                                       \
    for (u = 0; u < n; u++) {                                                                    \
        c0[0] = e0[2 * u]; c0[1] = e0[2 * u] + e0[2 * u + 1];                                    \
        c0[2] = e0[2 * u] - e0[2 * u + 1]; c0[3] = -e0[2 * u + 1];                               \
        c1[0] = e1[2 * u]; c1[1] = e1[2 * u] + e1[2 * u + 1];                                    \
        c1[2] = e1[2 * u] - e1[2 * u + 1]; c1[3] = -e1[2 * u + 1];                               \
        for (j = 0; j < 4; j++) {                                                                \
            d[j * plane + u] = c0[j];                                                            \
            d[(4 + j) * plane + u] = c0[j] + c1[j];                                              \
            d[(8 + j) * plane + u] = c0[j] - c1[j];                                              \
            d[(12 + j) * plane + u] = -c1[j];                                                    \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* y[(2a + b)*n + t] = (A^T m A)[a, b] + bias (max(., 0) with relu: NaN kept, -0.0 -> 0, as     \
   relu_inplace; one compare, so that it vectorizes) for the n tiles t whose products are      \
   m[p*plane + t]. */                                          \
static inline void ct_winograd_output_##T(const T *CT_RESTRICT m, Py_ssize_t plane, Py_ssize_t n, \
                                          T bias, int relu, T *CT_RESTRICT y) {                  \
    Py_ssize_t t;                                                                                \
    T z0[4], z1[4], y00, y01, y10, y11;                                                          \
    int i;                                                                                       \
    for (t = 0; t < n; t++) {                                                                    \
        for (i = 0; i < 4; i++) {   /* m A, row i */                                             \
            z0[i] = m[(4 * i) * plane + t] + m[(4 * i + 1) * plane + t] + m[(4 * i + 2) * plane + t]; \
            z1[i] = m[(4 * i + 1) * plane + t] - m[(4 * i + 2) * plane + t]                      \
                    - m[(4 * i + 3) * plane + t];                                                \
        }                                                                                        \
        y00 = z0[0] + z0[1] + z0[2] + bias;                                                      \
        y01 = z1[0] + z1[1] + z1[2] + bias;                                                      \
        y10 = z0[1] - z0[2] - z0[3] + bias;                                                      \
        y11 = z1[1] - z1[2] - z1[3] + bias;                                                      \
        if (relu) {                                                                              \
            y00 = y00 <= 0 ? (T) 0 : y00;                                         \
            y01 = y01 <= 0 ? (T) 0 : y01;                                         \
            y10 = y10 <= 0 ? (T) 0 : y10;                                         \
            y11 = y11 <= 0 ? (T) 0 : y11;                                         \
        }                                                                                        \
        y[t] = y00;                                                                              \
        y[n + t] = y01;                                                                          \
        y[2 * n + t] = y10;                                                                      \
        y[3 * n + t] = y11;                                                                      \
    }                                                                                            \
}

CONVTRAIN_WINOGRAD_TRANSFORMS(float)
CONVTRAIN_WINOGRAD_TRANSFORMS(double)

#endif
