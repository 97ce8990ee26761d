"""convtrain's compiled kernels: 2-D convolution (im2col + GEMM) and max pooling.

What this file is: the few loops that dominate a ConvNet's training time, written once for
float32 and float64 (`floating`), over NCHW tensors and (F, C, kh, kw) filters, with the GIL
released, OpenMP over the batch and GEMMs through scipy's BLAS (`scipy.linalg.cython_blas`).
What it refuses to be: a Python API. Every `def` here trusts its caller (convtrain.kernels)
to have checked shapes, dtypes and contiguity and to have allocated outputs and scratch.

Threading: the batch is split statically over OpenMP threads; each thread owns one scratch
im2col matrix and calls a *single-threaded* GEMM per image (the caller pins BLAS to one thread
for the duration of the call, so a threaded BLAS never runs inside the parallel region).
Compiler directives (boundscheck, wraparound, cdivision, ...) are set in setup.py.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, sgemm

cdef extern from *:
    """
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
    """
    int CONVTRAIN_HAVE_OPENMP
    int CONVTRAIN_DEBUG_CHECKS
    const char *CONVTRAIN_CYTHON_VERSION
    int convtrain_max_threads() noexcept nogil


# ----------------------------------------------------------------------------- build & threads

cdef int _num_threads = convtrain_max_threads()


def compiled_with():
    """What this extension was built with: {'cython', 'openmp', 'debug_checks', 'max_threads'}."""
    return {
        "cython": CONVTRAIN_CYTHON_VERSION.decode(),
        "openmp": bool(CONVTRAIN_HAVE_OPENMP),
        "debug_checks": bool(CONVTRAIN_DEBUG_CHECKS),
        "max_threads": convtrain_max_threads(),
    }


def set_num_threads(int n):
    """Use n OpenMP threads in the kernels (n >= 1; 1 without OpenMP, whatever n)."""
    global _num_threads
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    _num_threads = n if CONVTRAIN_HAVE_OPENMP else 1


def get_num_threads():
    """The number of OpenMP threads the kernels use."""
    return _num_threads


# ----------------------------------------------------------------------------- GEMM

cdef inline void gemm_rowmajor(char transa, char transb, int m, int n, int k,
                               floating alpha, const floating *a, int lda,
                               const floating *b, int ldb, floating beta,
                               floating *c, int ldc) noexcept nogil:
    """C (m x n) := alpha * op(A) . op(B) + beta * C, all row-major.

    Fortran BLAS is column-major and a row-major matrix is its transpose in column-major,
    so C^T = op(B)^T . op(A)^T: swap A and B (and m and n), keep the trans flags.
    """
    if floating is float:
        sgemm(&transb, &transa, &n, &m, &k, &alpha, <float *> b, &ldb,
              <float *> a, &lda, &beta, c, &ldc)
    else:
        dgemm(&transb, &transa, &n, &m, &k, &alpha, <double *> b, &ldb,
              <double *> a, &lda, &beta, c, &ldc)


# ----------------------------------------------------------------------------- im2col / col2im

cdef struct Geometry:
    Py_ssize_t C, H, W        # input image (C, H, W)
    Py_ssize_t kh, kw         # kernel
    Py_ssize_t sh, sw         # stride
    Py_ssize_t ph, pw         # zero padding
    Py_ssize_t Ho, Wo         # output (Ho, Wo)


cdef inline void valid_range(Py_ssize_t offset, Py_ssize_t stride, Py_ssize_t size,
                             Py_ssize_t n_out, Py_ssize_t *lo, Py_ssize_t *hi) noexcept nogil:
    """[lo, hi): the outputs o in [0, n_out) whose input index o*stride + offset is in [0, size)."""
    cdef Py_ssize_t first = 0, last
    if offset < 0:
        first = (-offset + stride - 1) // stride   # numerators kept >= 0 (C division)
    if size - 1 - offset < 0:
        last = 0
    else:
        last = (size - 1 - offset) // stride + 1
    if last > n_out:
        last = n_out
    if first > last:
        first = last
    lo[0] = first
    hi[0] = last


cdef void im2col_image(const floating *x, floating *cols, Py_ssize_t ld,
                       const Geometry *g) noexcept nogil:
    """cols[(c*kh + i)*kw + j, oh*Wo + ow] = x[c, oh*sh - ph + i, ow*sw - pw + j]  (0 outside x).

    x is one image (C, H, W); cols has C*kh*kw rows of Ho*Wo used entries, leading dimension ld.
    Row r of cols^T is row r of the lecture's M_X^im (channels blockwise, (i, j) row-major).
    """
    cdef Py_ssize_t c, i, j, oh, ow, ih, ow_lo, ow_hi
    cdef const floating *src
    cdef floating *dst
    for c in range(g.C):
        for i in range(g.kh):
            for j in range(g.kw):
                dst = cols + ((c * g.kh + i) * g.kw + j) * ld
                valid_range(j - g.pw, g.sw, g.W, g.Wo, &ow_lo, &ow_hi)
                for oh in range(g.Ho):
                    ih = oh * g.sh - g.ph + i
                    if ih < 0 or ih >= g.H:
                        memset(dst, 0, g.Wo * sizeof(floating))
                    else:
                        src = x + (c * g.H + ih) * g.W   # input row; column of ow: ow*sw + j - pw
                        if ow_lo > 0:
                            memset(dst, 0, ow_lo * sizeof(floating))
                        if g.sw == 1:
                            if ow_hi > ow_lo:
                                memcpy(dst + ow_lo, src + ow_lo + j - g.pw,
                                       (ow_hi - ow_lo) * sizeof(floating))
                        else:
                            for ow in range(ow_lo, ow_hi):
                                dst[ow] = src[ow * g.sw + j - g.pw]
                        if ow_hi < g.Wo:
                            memset(dst + ow_hi, 0, (g.Wo - ow_hi) * sizeof(floating))
                    dst += g.Wo


cdef void col2im_image(const floating *cols, Py_ssize_t ld, floating *x,
                       const Geometry *g) noexcept nogil:
    """The adjoint of im2col_image: x = 0, then x[c, oh*sh - ph + i, ow*sw - pw + j] += cols[...].

    Entries of cols that fall into the padding are dropped.
    """
    cdef Py_ssize_t c, i, j, oh, ow, ih, ow_lo, ow_hi
    cdef const floating *src
    cdef floating *dst
    memset(x, 0, g.C * g.H * g.W * sizeof(floating))
    for c in range(g.C):
        for i in range(g.kh):
            for j in range(g.kw):
                src = cols + ((c * g.kh + i) * g.kw + j) * ld
                valid_range(j - g.pw, g.sw, g.W, g.Wo, &ow_lo, &ow_hi)
                for oh in range(g.Ho):
                    ih = oh * g.sh - g.ph + i
                    if ih >= 0 and ih < g.H:
                        dst = x + (c * g.H + ih) * g.W
                        for ow in range(ow_lo, ow_hi):
                            dst[ow * g.sw + j - g.pw] += src[ow]
                    src += g.Wo


cdef Geometry make_geometry(Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                            Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                            Py_ssize_t ph, Py_ssize_t pw):
    cdef Geometry g
    g.C = C; g.H = H; g.W = W
    g.kh = kh; g.kw = kw
    g.sh = sh; g.sw = sw
    g.ph = ph; g.pw = pw
    g.Ho = (H + 2 * ph - kh) // sh + 1
    g.Wo = (W + 2 * pw - kw) // sw + 1
    return g


cdef inline bint is_pointwise(const Geometry *g) noexcept nogil:
    """A 1x1 kernel, stride 1, no padding: im2col is the identity, x[n] is already (C, H*W)."""
    return g.kh == 1 and g.kw == 1 and g.sh == 1 and g.sw == 1 and g.ph == 0 and g.pw == 0


def im2col(const floating[:, :, :, ::1] x, floating[:, :, ::1] cols,
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
           Py_ssize_t ph, Py_ssize_t pw):
    """cols[n] (C*kh*kw, Ho*Wo) = im2col of x[n] (C, H, W), OpenMP over n."""
    cdef Geometry g = make_geometry(x.shape[1], x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw)
    cdef Py_ssize_t n, N = x.shape[0], P = g.Ho * g.Wo
    if N == 0:
        return
    with nogil:
        for n in prange(N, schedule="static", num_threads=_num_threads):
            im2col_image(&x[n, 0, 0, 0], &cols[n, 0, 0], P, &g)


def col2im(const floating[:, :, ::1] cols, floating[:, :, :, ::1] x,
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
           Py_ssize_t ph, Py_ssize_t pw):
    """x[n] (C, H, W) = col2im of cols[n] (C*kh*kw, Ho*Wo), OpenMP over n."""
    cdef Geometry g = make_geometry(x.shape[1], x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw)
    cdef Py_ssize_t n, N = x.shape[0], P = g.Ho * g.Wo
    if N == 0:
        return
    with nogil:
        for n in prange(N, schedule="static", num_threads=_num_threads):
            col2im_image(&cols[n, 0, 0], P, &x[n, 0, 0, 0], &g)


# ----------------------------------------------------------------------------- convolution

def conv2d_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                   const floating[::1] b, bint has_bias, floating[:, :, :, ::1] out,
                   floating[:, ::1] scratch,
                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                   int num_threads):
    """out[n] (F, Ho*Wo) = W (F, C*kh*kw) . cols[n] (C*kh*kw, Ho*Wo) + b  for every image n.

    scratch is (num_threads, C*kh*kw*Ho*Wo): one im2col matrix per thread (unused for a
    pointwise kernel, where cols[n] is x[n] itself).
    """
    cdef Geometry g = make_geometry(x.shape[1], x.shape[2], x.shape[3],
                                    w.shape[2], w.shape[3], sh, sw, ph, pw)
    cdef Py_ssize_t N = x.shape[0], F = w.shape[0]
    cdef Py_ssize_t K = g.C * g.kh * g.kw, P = g.Ho * g.Wo
    cdef Py_ssize_t n, f, p
    cdef floating *cols
    cdef const floating *cols_n
    cdef floating *out_n
    cdef floating beta = 1 if has_bias else 0
    cdef bint pointwise = is_pointwise(&g)
    if N == 0:
        return
    with nogil, parallel(num_threads=num_threads):
        cols = &scratch[threadid(), 0]
        for n in prange(N, schedule="static"):
            if pointwise:
                cols_n = &x[n, 0, 0, 0]
            else:
                im2col_image(&x[n, 0, 0, 0], cols, P, &g)
                cols_n = cols
            out_n = &out[n, 0, 0, 0]
            if has_bias:
                for f in range(F):
                    for p in range(P):
                        out_n[f * P + p] = b[f]
            gemm_rowmajor(c"N", c"N", <int> F, <int> P, <int> K, <floating> 1.0,
                          &w[0, 0, 0, 0], <int> K, cols_n, <int> P, beta, out_n, <int> P)


def conv2d_backward_filter(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] dout,
                           Py_ssize_t kh, Py_ssize_t kw,
                           floating[:, ::1] dw_per_thread, double[:, ::1] db_per_thread,
                           floating[:, ::1] scratch,
                           Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                           int num_threads):
    """dW_t (F, C*kh*kw) += dout[n] (F, Ho*Wo) . cols[n]^T and db_t[f] += sum_p dout[n, f, p]
    over the images n of thread t (the lecture's dL/dF = X * G, i.e. g^T M_X^im).

    dw_per_thread (num_threads, F*C*kh*kw) and db_per_thread (num_threads, F) must be zero on
    entry; the caller sums them over threads (fixed order, so the result is deterministic).
    scratch is (num_threads, C*kh*kw*Ho*Wo).
    """
    cdef Geometry g = make_geometry(x.shape[1], x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw)
    cdef Py_ssize_t N = x.shape[0], F = dout.shape[1]
    cdef Py_ssize_t K = g.C * g.kh * g.kw, P = g.Ho * g.Wo
    cdef Py_ssize_t n, f, p
    cdef int tid
    cdef double row_sum
    cdef floating *cols
    cdef const floating *cols_n
    cdef const floating *dout_n
    cdef bint pointwise = is_pointwise(&g)
    if N == 0:
        return
    with nogil, parallel(num_threads=num_threads):
        tid = threadid()
        cols = &scratch[tid, 0]
        for n in prange(N, schedule="static"):
            if pointwise:
                cols_n = &x[n, 0, 0, 0]
            else:
                im2col_image(&x[n, 0, 0, 0], cols, P, &g)
                cols_n = cols
            dout_n = &dout[n, 0, 0, 0]
            gemm_rowmajor(c"N", c"T", <int> F, <int> K, <int> P, <floating> 1.0,
                          dout_n, <int> P, cols_n, <int> P, <floating> 1.0,
                          &dw_per_thread[tid, 0], <int> K)
            for f in range(F):
                row_sum = 0
                for p in range(P):
                    row_sum = row_sum + dout_n[f * P + p]
                db_per_thread[tid, f] += row_sum


def conv2d_backward_input(const floating[:, :, :, ::1] dout, const floating[:, :, :, ::1] w,
                          floating[:, :, :, ::1] dx, floating[:, ::1] scratch,
                          Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                          int num_threads):
    """dx[n] = col2im(W^T (C*kh*kw, F) . dout[n] (F, Ho*Wo))  (the lecture's g^T M_F^filter,
    i.e. G_zero-pad * F_rot180). Each image is written by one thread only: race-free.

    scratch is (num_threads, C*kh*kw*Ho*Wo): one column-gradient matrix per thread.
    """
    cdef Geometry g = make_geometry(dx.shape[1], dx.shape[2], dx.shape[3],
                                    w.shape[2], w.shape[3], sh, sw, ph, pw)
    cdef Py_ssize_t N = dx.shape[0], F = w.shape[0]
    cdef Py_ssize_t K = g.C * g.kh * g.kw, P = g.Ho * g.Wo
    cdef Py_ssize_t n
    cdef floating *dcols
    cdef bint pointwise = is_pointwise(&g)
    if N == 0:
        return
    with nogil, parallel(num_threads=num_threads):
        dcols = &scratch[threadid(), 0]
        for n in prange(N, schedule="static"):
            if pointwise:
                gemm_rowmajor(c"T", c"N", <int> K, <int> P, <int> F, <floating> 1.0,
                              &w[0, 0, 0, 0], <int> K, &dout[n, 0, 0, 0], <int> P,
                              <floating> 0.0, &dx[n, 0, 0, 0], <int> P)
            else:
                gemm_rowmajor(c"T", c"N", <int> K, <int> P, <int> F, <floating> 1.0,
                              &w[0, 0, 0, 0], <int> K, &dout[n, 0, 0, 0], <int> P,
                              <floating> 0.0, dcols, <int> P)
                col2im_image(dcols, P, &dx[n, 0, 0, 0], &g)


# ----------------------------------------------------------------------------- max pooling

def maxpool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                      Py_ssize_t[:, :, :, ::1] argmax,
                      Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw):
    """out[n, c, oh, ow] = max over the window x[n, c, oh*sh : oh*sh+kh, ow*sw : ow*sw+kw];
    argmax holds the winner's flat index h*W + w inside its (H, W) plane (first one on ties,
    a NaN wins and propagates). OpenMP over the N*C planes."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Ho = out.shape[2], Wo = out.shape[3]
    cdef Py_ssize_t plane, oh, ow, i, j, best_index, index
    cdef floating best, value
    cdef const floating *x_plane
    cdef floating *out_plane
    cdef Py_ssize_t *argmax_plane
    if N * C == 0:
        return
    with nogil:
        for plane in prange(N * C, schedule="static", num_threads=_num_threads):
            x_plane = &x[plane // C, plane % C, 0, 0]
            out_plane = &out[plane // C, plane % C, 0, 0]
            argmax_plane = &argmax[plane // C, plane % C, 0, 0]
            for oh in range(Ho):
                for ow in range(Wo):
                    best_index = (oh * sh) * W + ow * sw
                    best = x_plane[best_index]
                    for i in range(kh):
                        for j in range(kw):
                            index = (oh * sh + i) * W + ow * sw + j
                            value = x_plane[index]
                            if value > best or (value != value and best == best):
                                best = value
                                best_index = index
                    out_plane[oh * Wo + ow] = best
                    argmax_plane[oh * Wo + ow] = best_index


def maxpool2d_backward(const floating[:, :, :, ::1] dout, const Py_ssize_t[:, :, :, ::1] argmax,
                       floating[:, :, :, ::1] dx):
    """dx = 0, then dx[n, c].flat[argmax[n, c, oh, ow]] += dout[n, c, oh, ow].

    Returns the number of argmax entries outside [0, H*W) (skipped, never written).
    Each (n, c) plane belongs to one thread, so overlapping windows accumulate race-free.
    """
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], HW = dx.shape[2] * dx.shape[3]
    cdef Py_ssize_t P = dout.shape[2] * dout.shape[3]
    cdef Py_ssize_t plane, p, index, bad = 0
    cdef const floating *dout_plane
    cdef const Py_ssize_t *argmax_plane
    cdef floating *dx_plane
    if N * C == 0:
        return 0
    with nogil:
        for plane in prange(N * C, schedule="static", num_threads=_num_threads):
            dout_plane = &dout[plane // C, plane % C, 0, 0]
            argmax_plane = &argmax[plane // C, plane % C, 0, 0]
            dx_plane = &dx[plane // C, plane % C, 0, 0]
            memset(dx_plane, 0, HW * sizeof(floating))
            for p in range(P):
                index = argmax_plane[p]
                if index < 0 or index >= HW:
                    bad += 1
                else:
                    dx_plane[index] += dout_plane[p]
    return bad
