/* Batch norm's per-row statistics, computed by the conv kernels (ext/_conv.pyx) on their own
   output while it is in cache, for the batch norm that follows the conv (convtrain.nn.norm):
   ext/norm_rows.h's ct_row_stats, the same function, so the same bits as the batch norm's own
   statistics pass (ext/_norm.pyx, image layout).

   _norm is built with -ffp-contract=off and _conv is not (its GEMM tiles want fused
   multiply-adds): the statistics are compiled here with contraction off, so that the
   x86-64-v3/v4 builds do not fuse the squared deviations' multiply-adds. GCC neither inlines
   these into callers with other floating-point options nor lets them be contracted
   (tests/nn/test_conv_norm_stats.py compares the bits with _norm's). */
#ifndef CONVTRAIN_CONV_ROW_STATS_H
#define CONVTRAIN_CONV_ROW_STATS_H

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include "norm_rows.h"

/* total = sum x and m2 = sum (x - total / n)^2 over each of `rows` rows of n values (row r at
   x + r * n), into stats[2 * r] and stats[2 * r + 1] */
static void ct_conv_row_stats_float(const float *x, Py_ssize_t rows, Py_ssize_t n, double *stats) {
    Py_ssize_t r;
    for (r = 0; r < rows; r++) ct_row_stats_float(x + r * n, n, stats + 2 * r, stats + 2 * r + 1);
}
static void ct_conv_row_stats_double(const double *x, Py_ssize_t rows, Py_ssize_t n, double *stats) {
    Py_ssize_t r;
    for (r = 0; r < rows; r++) ct_row_stats_double(x + r * n, n, stats + 2 * r, stats + 2 * r + 1);
}

/* g = where(out > 0, g, 0) in place, then sums[0] = sum g and sums[1] = sum g * (x - mean):
   ct_row_grad_totals with the ReLU, the first pass of batch norm's backward by images */
static void ct_conv_row_grad_totals_float(const float *x, float *g, const float *out, Py_ssize_t n,
                                          double mean, double *sums) {
    ct_row_grad_totals_float(x, g, out, 1, n, mean, sums, sums + 1);
}
static void ct_conv_row_grad_totals_double(const double *x, double *g, const double *out,
                                           Py_ssize_t n, double mean, double *sums) {
    ct_row_grad_totals_double(x, g, out, 1, n, mean, sums, sums + 1);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma STDC FP_CONTRACT DEFAULT
#endif

#endif
