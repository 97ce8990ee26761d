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
/* v[p*plane + tx] = (B^T d B)[p] for the tw tiles of one tile row: tile tx is rows r0..r3,     \
   columns 2tx .. 2tx+3 (each row holds 2*tw + 2 values). */                                    \
static inline void ct_winograd_input_row_##T(const T *CT_RESTRICT r0, const T *CT_RESTRICT r1,   \
                                             const T *CT_RESTRICT r2, const T *CT_RESTRICT r3,   \
                                             Py_ssize_t tw, T *CT_RESTRICT v, Py_ssize_t plane) { \
    Py_ssize_t tx, j, k;                                                                         \
    T b[4][4];                                                                                   \
    for (tx = 0; tx < tw; tx++) {                                                                \
        for (j = 0; j < 4; j++) {   /* B^T d, column j */                                        \
            k = 2 * tx + j;                                                                      \
            b[0][j] = r0[k] - r2[k];                                                             \
            b[1][j] = r1[k] + r2[k];                                                             \
            b[2][j] = r2[k] - r1[k];                                                             \
            b[3][j] = r1[k] - r3[k];                                                             \
        }                                                                                        \
        for (j = 0; j < 4; j++) {   /* (B^T d) B, row j */                                       \
            v[(4 * j + 0) * plane + tx] = b[j][0] - b[j][2];                                     \
            v[(4 * j + 1) * plane + tx] = b[j][1] + b[j][2];                                     \
            v[(4 * j + 2) * plane + tx] = b[j][2] - b[j][1];                                     \
            v[(4 * j + 3) * plane + tx] = b[j][1] - b[j][3];                                     \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* y[(2a + b)*n + t] = (A^T m A)[a, b] + bias (max(., 0) with relu: NaN kept, -0.0 -> 0) for    \
   the n tiles t whose products are m[p*plane + t]. */                                          \
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
            y00 = (y00 > 0 || y00 != y00) ? y00 : (T) 0;                                         \
            y01 = (y01 > 0 || y01 != y01) ? y01 : (T) 0;                                         \
            y10 = (y10 > 0 || y10 != y10) ? y10 : (T) 0;                                         \
            y11 = (y11 > 0 || y11 != y11) ? y11 : (T) 0;                                         \
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
