/* convtrain's own float32 GEMM tiles for the conv layers (included by ext/_conv.pyx).

Two register-blocked kernels, written once over a few vector macros and compiled for the
instruction set of the build that includes them:

  * ct_gemm_nn: C (M x N) = A (M x Kd) . B (Kd x N), row k of B at brows[k] (anywhere: for a
    stride-1 convolution the rows of the lecture's M_X^im^T are slices of the image itself, so
    B can be the image, never copied out), C's rows `ldc` apart, or, with crows, C's row m
    *added* to crows[m] (col2im fused into the input gradient's store), optionally max(C, 0)
    on the store (np.maximum's bits: NaN kept, -0.0 -> +0.0). A is packed
    once per call (ct_pack_a) into panels of CT_MR rows. Outer products: each k broadcasts
    CT_MR values of A against CT_NV vectors of B's row k, into CT_MR x CT_NV accumulators.
    The forward pass (A = the filters with the bias column, B = the image's im2col columns
    with the ones row) and the input gradient (A = W^T, B = dout) are both this product.
  * ct_gemm_nt_acc: D (M x Nk) += A (M x L) . B^T (L x Nk), A's rows `lda` apart, B's row k at
    brows[k], both contiguous in L:
    dot products of rows, vectorized along L into CT_FM x CT_FK accumulators, each summed
    across its lanes once at the end. The filter gradient (A = dout, B = the im2col columns;
    with the ones row, column K is db) is this product.

Summation order, which fixes the bits: ct_gemm_nn sums k = 0, 1, ..., Kd-1 in one fused
multiply-add chain per output; ct_gemm_nt_acc sums every CT_VEC-th element of L in a lane,
then the lanes in a fixed tree, then adds that to D. Both depend on the sizes alone, never on
the thread count; they differ from BLAS's order (and between the AVX-512 and AVX2 builds,
whose vectors differ in width), so the builds agree to rounding, not bit for bit (see
tests/nn/test_isa_variants.py).

CT_TILES is 1 when the build has tiles (x86-64-v4: AVX-512, x86-64-v3: AVX2 + FMA), else 0 and
the kernels keep BLAS; the functions exist in every build so that the same Cython compiles. */
#ifndef CONVTRAIN_GEMM_KERNELS_H
#define CONVTRAIN_GEMM_KERNELS_H

#include <Python.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define CT_TILES 1
#define CT_VEC 16
#define CT_MR 8    /* ct_gemm_nn: 8 rows x 3 vectors = 24 of the 32 zmm registers */
#define CT_NV 3
#define CT_FM 4    /* ct_gemm_nt_acc: 4 x 6 = 24 accumulators, 10 loads per 24 FMAs */
#define CT_FK 6
typedef __m512 ct_v;
typedef __mmask16 ct_m;
static inline ct_m ct_tail(Py_ssize_t n) {
    return n >= 16 ? (ct_m) 0xFFFF : n <= 0 ? (ct_m) 0 : (ct_m) ((1u << n) - 1u);
}
#define CT_LOAD(p) _mm512_loadu_ps(p)
#define CT_MLOAD(p, m) _mm512_maskz_loadu_ps((m), (p))
#define CT_STORE(p, v) _mm512_storeu_ps((p), (v))
#define CT_MSTORE(p, m, v) _mm512_mask_storeu_ps((p), (m), (v))
#define CT_SET1(x) _mm512_set1_ps(x)
#define CT_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define CT_ZERO() _mm512_setzero_ps()
#define CT_ADD(a, b) _mm512_add_ps((a), (b))
static inline ct_v ct_relu(ct_v v) {
    /* keep v unless v <= 0 (ordered): NaN kept, -0.0 and negatives become +0.0 */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLE_UQ), v);
}
static inline float ct_hsum(ct_v v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CT_TILES 1
#define CT_VEC 8
#define CT_MR 6    /* 6 rows x 2 vectors = 12 of the 16 ymm registers */
#define CT_NV 2
#define CT_FM 3    /* 3 x 4 = 12 accumulators */
#define CT_FK 4
typedef __m256 ct_v;
typedef __m256i ct_m;
static inline ct_m ct_tail(Py_ssize_t n) {
    int k = n >= 8 ? 8 : n <= 0 ? 0 : (int) n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#define CT_LOAD(p) _mm256_loadu_ps(p)
#define CT_MLOAD(p, m) _mm256_maskload_ps((p), (m))
#define CT_STORE(p, v) _mm256_storeu_ps((p), (v))
#define CT_MSTORE(p, m, v) _mm256_maskstore_ps((p), (m), (v))
#define CT_SET1(x) _mm256_set1_ps(x)
#define CT_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define CT_ZERO() _mm256_setzero_ps()
#define CT_ADD(a, b) _mm256_add_ps((a), (b))
static inline ct_v ct_relu(ct_v v) {
    return _mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NLE_UQ), v);
}
static inline float ct_hsum(ct_v v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
#else
#define CT_TILES 0
#define CT_MR 1
#endif

static const int CONVTRAIN_HAVE_TILES = CT_TILES;
static volatile float ct_fma_sink;

/* Floats of the packed A of an M x Kd product (whole panels of CT_MR rows). */
static inline Py_ssize_t ct_packed_a_floats(Py_ssize_t M, Py_ssize_t Kd) {
    return ((M + CT_MR - 1) / CT_MR) * CT_MR * Kd;
}

/* packed[(t*Kd + k)*CT_MR + r] = A[t*CT_MR + r, k] = a[(t*CT_MR + r)*row_step + k*col_step],
   0 for rows past M: panel t holds CT_MR rows, column by column. The steps let A be W
   (row_step Kd, col_step 1) or W^T (row_step 1, col_step K). */
static inline void ct_pack_a(const float *a, Py_ssize_t row_step, Py_ssize_t col_step,
                             Py_ssize_t M, Py_ssize_t Kd, float *packed) {
    Py_ssize_t t, k, r, panels = (M + CT_MR - 1) / CT_MR;
    for (t = 0; t < panels; t++)
        for (k = 0; k < Kd; k++)
            for (r = 0; r < CT_MR; r++) {
                Py_ssize_t m = t * CT_MR + r;
                packed[(t * Kd + k) * CT_MR + r] = m < M ? a[m * row_step + k * col_step] : 0.0f;
            }
}

/* ct_pack_a with the rows taken in the order rows[0], rows[1], ...: A's row m is a's row
   rows[m]. */
static inline void ct_pack_a_rows(const float *a, const Py_ssize_t *rows, Py_ssize_t row_step,
                                  Py_ssize_t col_step, Py_ssize_t M, Py_ssize_t Kd, float *packed) {
    Py_ssize_t t, k, r, panels = (M + CT_MR - 1) / CT_MR;
    for (t = 0; t < panels; t++)
        for (k = 0; k < Kd; k++)
            for (r = 0; r < CT_MR; r++) {
                Py_ssize_t m = t * CT_MR + r;
                packed[(t * Kd + k) * CT_MR + r] =
                    m < M ? a[rows[m] * row_step + k * col_step] : 0.0f;
            }
}

#if CT_TILES

/* One CT_MR x (CT_NV*CT_VEC) tile of C; rows >= mr and columns >= ncols are neither read
   from B nor stored. */
static inline void ct_nn_tile(Py_ssize_t Kd, const float *restrict ap,
                              const float *const *brows, Py_ssize_t j, float *c, Py_ssize_t ldc,
                              float *const *crows, Py_ssize_t mr, Py_ssize_t ncols, int relu) {
    ct_v acc[CT_MR][CT_NV];
    Py_ssize_t k;
    int r, v;
    for (r = 0; r < CT_MR; r++)
        for (v = 0; v < CT_NV; v++) acc[r][v] = CT_ZERO();
    if (ncols == CT_NV * CT_VEC) {
        for (k = 0; k < Kd; k++) {
            const float *bk = brows[k] + j;
            const float *ak = ap + k * CT_MR;
            ct_v bv[CT_NV];
            for (v = 0; v < CT_NV; v++) bv[v] = CT_LOAD(bk + v * CT_VEC);
            for (r = 0; r < CT_MR; r++) {
                ct_v a = CT_SET1(ak[r]);
                for (v = 0; v < CT_NV; v++) acc[r][v] = CT_FMA(a, bv[v], acc[r][v]);
            }
        }
        if (crows != NULL) {  /* one row at a time: rows of taps may overlap in the image */
            for (r = 0; r < mr; r++)
                for (v = 0; v < CT_NV; v++) {
                    float *dst = crows[r] + j + v * CT_VEC;
                    CT_STORE(dst, CT_ADD(CT_LOAD(dst), acc[r][v]));
                }
            return;
        }
        for (r = 0; r < mr; r++)
            for (v = 0; v < CT_NV; v++)
                CT_STORE(c + r * ldc + j + v * CT_VEC, relu ? ct_relu(acc[r][v]) : acc[r][v]);
        return;
    }
    ct_m m[CT_NV];
    for (v = 0; v < CT_NV; v++) m[v] = ct_tail(ncols - v * CT_VEC);
    for (k = 0; k < Kd; k++) {
        const float *bk = brows[k] + j;
        const float *ak = ap + k * CT_MR;
        ct_v bv[CT_NV];
        for (v = 0; v < CT_NV; v++) bv[v] = CT_MLOAD(bk + v * CT_VEC, m[v]);
        for (r = 0; r < CT_MR; r++) {
            ct_v a = CT_SET1(ak[r]);
            for (v = 0; v < CT_NV; v++) acc[r][v] = CT_FMA(a, bv[v], acc[r][v]);
        }
    }
    if (crows != NULL) {
        for (r = 0; r < mr; r++)
            for (v = 0; v < CT_NV; v++) {
                float *dst = crows[r] + j + v * CT_VEC;
                CT_MSTORE(dst, m[v], CT_ADD(CT_MLOAD(dst, m[v]), acc[r][v]));
            }
        return;
    }
    for (r = 0; r < mr; r++)
        for (v = 0; v < CT_NV; v++)
            CT_MSTORE(c + r * ldc + j + v * CT_VEC, m[v], relu ? ct_relu(acc[r][v]) : acc[r][v]);
}

static void ct_gemm_nn(Py_ssize_t M, Py_ssize_t N, Py_ssize_t Kd, const float *apacked,
                       const float *const *brows, float *c, Py_ssize_t ldc, float *const *crows,
                       int relu) {
    const Py_ssize_t NR = CT_NV * CT_VEC;
    Py_ssize_t j, i;
    /* column panels outside: one panel of B (Kd x NR) is reused by every row tile while in cache */
    for (j = 0; j < N; j += NR) {
        Py_ssize_t ncols = N - j < NR ? N - j : NR;
        for (i = 0; i < M; i += CT_MR)
            ct_nn_tile(Kd, apacked + (i / CT_MR) * Kd * CT_MR, brows, j, c + i * ldc, ldc,
                       crows != NULL ? crows + i : NULL, M - i < CT_MR ? M - i : CT_MR, ncols, relu);
    }
}

/* One CT_FM x CT_FK block of D += A . B^T over L; rows past fm (of A) / fk (of B) are read
   from the last valid row and not stored. */
static inline void ct_nt_tile(Py_ssize_t L, const float *a, Py_ssize_t lda,
                              const float *const *brows, float *d, Py_ssize_t ldd, int fm, int fk) {
    ct_v acc[CT_FM][CT_FK];
    const float *ar[CT_FM];
    const float *br[CT_FK];
    Py_ssize_t p;
    int r, s;
    for (r = 0; r < CT_FM; r++) ar[r] = a + (r < fm ? r : fm - 1) * lda;
    for (s = 0; s < CT_FK; s++) br[s] = brows[s < fk ? s : fk - 1];
    for (r = 0; r < CT_FM; r++)
        for (s = 0; s < CT_FK; s++) acc[r][s] = CT_ZERO();
    for (p = 0; p + CT_VEC <= L; p += CT_VEC) {
        ct_v bv[CT_FK];
        for (s = 0; s < CT_FK; s++) bv[s] = CT_LOAD(br[s] + p);
        for (r = 0; r < CT_FM; r++) {
            ct_v av = CT_LOAD(ar[r] + p);
            for (s = 0; s < CT_FK; s++) acc[r][s] = CT_FMA(av, bv[s], acc[r][s]);
        }
    }
    if (p < L) {
        ct_m m = ct_tail(L - p);
        ct_v bv[CT_FK];
        for (s = 0; s < CT_FK; s++) bv[s] = CT_MLOAD(br[s] + p, m);
        for (r = 0; r < CT_FM; r++) {
            ct_v av = CT_MLOAD(ar[r] + p, m);
            for (s = 0; s < CT_FK; s++) acc[r][s] = CT_FMA(av, bv[s], acc[r][s]);
        }
    }
    for (r = 0; r < fm; r++)
        for (s = 0; s < fk; s++) d[r * ldd + s] += ct_hsum(acc[r][s]);
}

static void ct_gemm_nt_acc(Py_ssize_t M, Py_ssize_t Nk, Py_ssize_t L, const float *a,
                           Py_ssize_t lda, const float *const *brows, float *d, Py_ssize_t ldd) {
    Py_ssize_t f, k;
    /* CT_FK rows of B (the im2col columns) stay in L1 while every block of A streams by */
    for (k = 0; k < Nk; k += CT_FK)
        for (f = 0; f < M; f += CT_FM)
            ct_nt_tile(L, a + f * lda, lda, brows + k, d + f * ldd + k, ldd,
                       (int) (M - f < CT_FM ? M - f : CT_FM), (int) (Nk - k < CT_FK ? Nk - k : CT_FK));
}

/* Floating-point operations per second one thread's FMA units sustain: `iters` rounds of
   12 independent fused multiply-add chains (enough to cover the FMA latency on either
   vector width). Returns the number of operations done (2 per lane per FMA). */
static double ct_fma_loop(long iters, float seed) {
    ct_v acc[12];
    ct_v x = CT_SET1(seed), y = CT_SET1(1.0f - seed * 1e-7f);
    long i;
    int r;
    float sink = 0.0f;
    for (r = 0; r < 12; r++) acc[r] = CT_SET1((float) r);
    for (i = 0; i < iters; i++)
        for (r = 0; r < 12; r++) acc[r] = CT_FMA(acc[r], y, x);
    for (r = 0; r < 12; r++) sink += ct_hsum(acc[r]);
    ct_fma_sink = sink;  /* a use of the result, so that the loop is kept */
    return 2.0 * CT_VEC * 12.0 * (double) iters;
}

#else  /* no tiles in this build: never called (the kernels test CONVTRAIN_HAVE_TILES) */

static void ct_gemm_nn(Py_ssize_t M, Py_ssize_t N, Py_ssize_t Kd, const float *apacked,
                       const float *const *brows, float *c, Py_ssize_t ldc, float *const *crows,
                       int relu) {
    (void) M; (void) N; (void) Kd; (void) apacked; (void) brows; (void) c; (void) ldc;
    (void) crows; (void) relu;
}
static void ct_gemm_nt_acc(Py_ssize_t M, Py_ssize_t Nk, Py_ssize_t L, const float *a,
                           Py_ssize_t lda, const float *const *brows, float *d, Py_ssize_t ldd) {
    (void) M; (void) Nk; (void) L; (void) a; (void) lda; (void) brows; (void) d; (void) ldd;
}
/* scalar chains: what the portable build's compiled code sustains, not the CPU's peak */
static double ct_fma_loop(long iters, float seed) {
    float acc[12], y = 1.0f - seed * 1e-7f, sink = 0.0f;
    long i;
    int r;
    for (r = 0; r < 12; r++) acc[r] = (float) r;
    for (i = 0; i < iters; i++)
        for (r = 0; r < 12; r++) acc[r] = acc[r] * y + seed;
    for (r = 0; r < 12; r++) sink += acc[r];
    ct_fma_sink = sink;
    return 2.0 * 12.0 * (double) iters;
}

#endif  /* CT_TILES */

#endif  /* CONVTRAIN_GEMM_KERNELS_H */
