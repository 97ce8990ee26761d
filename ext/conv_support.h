/* C helpers of ext/_conv.pyx (included there with `cdef extern from "conv_support.h"`):
   what plain C states better than Cython. The build's settings as macros (OpenMP, debug
   checks, Cython version, instruction set: setup.py defines them), the OpenMP thread count,
   the CPU's x86-64 level (which compiled build can run here), and the copies and adds of
   short im2col rows that the loops in _conv.pyx call. Static and inline: each module that
   includes it gets its own copy, compiled with that module's instruction set. */
#ifndef CONVTRAIN_CONV_SUPPORT_H
#define CONVTRAIN_CONV_SUPPORT_H

#include <Python.h>  /* Py_ssize_t; already included first by the Cython module */
#include <string.h>

/* ---- the build ----------------------------------------------------------------------- */
#ifdef _OPENMP
#include <omp.h>
#define CONVTRAIN_HAVE_OPENMP 1
static int convtrain_max_threads(void) { return omp_get_max_threads(); }
#else
#define CONVTRAIN_HAVE_OPENMP 0
static int convtrain_max_threads(void) { return 1; }
#endif
#ifndef CONVTRAIN_CYTHON_VERSION
#define CONVTRAIN_CYTHON_VERSION "unknown"
#endif
#ifndef CONVTRAIN_DEBUG_CHECKS
#define CONVTRAIN_DEBUG_CHECKS 0
#endif
#ifndef CONVTRAIN_ISA
#define CONVTRAIN_ISA "baseline"
#endif

/* ---- the CPU ------------------------------------------------------------------------- */
/* The newest x86-64 level (3: AVX2+FMA, 4: AVX-512) this CPU and OS run, else 0. */
static int convtrain_cpu_x86_64_level(void) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
             && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
             && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq")
             && __builtin_cpu_supports("avx512vl");
    return v4 ? 4 : v3 ? 3 : 0;
#else
    return 0;
#endif
}

/* ---- short rows of im2col / col2im --------------------------------------------------- */
/* Copy `rows` short rows of an im2col matrix (n values, under 64 bytes: Wo = 4-6 on
   DIGITS), the source rows `step` apart, the destination rows back to back: with whole
   32- or 16-byte vector moves, two overlapping ones when n is between sizes (they rewrite
   a few values with themselves), the size worked out once per block, not per row. Left
   to itself, the AVX-512 build copied such rows one value at a time and ran DIGITS'
   im2col 1.8x slower than the SSE2 build. Longer rows stay in the kernels' own loops:
   GCC turns a separate copy loop into a memcpy call, 1.5-1.8x slower on rows of 20-30
   values. Plain copies and element-wise adds: the same bits in every build. */
#define CONVTRAIN_SHORT_ROWS(T)                                                           \
static inline void copy_short_rows_##T(T *restrict dst, const T *restrict src,            \
                                       Py_ssize_t rows, Py_ssize_t n, Py_ssize_t step) {  \
    const Py_ssize_t bytes = n * (Py_ssize_t) sizeof(T);                                  \
    Py_ssize_t r, k;                                                                      \
    if (bytes >= 32) {                                                                    \
        for (r = 0; r < rows; r++, dst += n, src += step) {                               \
            memcpy(dst, src, 32);                                                         \
            memcpy((char *) dst + bytes - 32, (const char *) src + bytes - 32, 32);       \
        }                                                                                 \
    } else if (bytes == 16) {                                                             \
        for (r = 0; r < rows; r++, dst += n, src += step) memcpy(dst, src, 16);           \
    } else if (bytes > 16) {                                                              \
        for (r = 0; r < rows; r++, dst += n, src += step) {                               \
            memcpy(dst, src, 16);                                                         \
            memcpy((char *) dst + bytes - 16, (const char *) src + bytes - 16, 16);       \
        }                                                                                 \
    } else {                                                                              \
        for (r = 0; r < rows; r++, dst += n, src += step)                                 \
            for (k = 0; k < n; k++) dst[k] = src[k];                                      \
    }                                                                                     \
}                                                                                         \
/* And accumulate them (col2im): dst rows `step` apart, src rows back to back;         \
   16-byte vector adds, then single values. */                                          \
typedef T convtrain_v16_##T __attribute__((vector_size(16)));                             \
static inline void add_short_rows_##T(T *restrict dst, Py_ssize_t step, const T *restrict src, \
                                      Py_ssize_t rows, Py_ssize_t n) {                    \
    const Py_ssize_t lanes = 16 / (Py_ssize_t) sizeof(T);                                 \
    Py_ssize_t r, k;                                                                      \
    if (n == lanes) {  /* DIGITS' 4-wide rows: one add a row, no inner loop */            \
        for (r = 0; r < rows; r++, dst += step, src += n) {                               \
            convtrain_v16_##T a, b;                                                       \
            memcpy(&a, dst, 16); memcpy(&b, src, 16);                                     \
            a += b;                                                                       \
            memcpy(dst, &a, 16);                                                          \
        }                                                                                 \
        return;                                                                           \
    }                                                                                     \
    for (r = 0; r < rows; r++, dst += step, src += n) {                                   \
        for (k = 0; k + lanes <= n; k += lanes) {                                         \
            convtrain_v16_##T a, b;                                                       \
            memcpy(&a, dst + k, 16); memcpy(&b, src + k, 16);                             \
            a += b;                                                                       \
            memcpy(dst + k, &a, 16);                                                      \
        }                                                                                 \
        for (; k < n; k++) dst[k] += src[k];                                              \
    }                                                                                     \
}
CONVTRAIN_SHORT_ROWS(float)
CONVTRAIN_SHORT_ROWS(double)

#endif  /* CONVTRAIN_CONV_SUPPORT_H */
