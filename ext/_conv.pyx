"""convtrain's compiled kernels: 2-D convolution (im2col + GEMM; Winograd F(2x2, 3x3) in
winograd.pxi, included below), dense layers, ReLU and max pooling.

What this file is: the few loops that dominate a ConvNet's training time, written once for
float32 and float64 (`floating`), over NCHW tensors and (F, C, kh, kw) filters, with the GIL
released, OpenMP over the batch and GEMMs through scipy's BLAS (`scipy.linalg.cython_blas`).
What it refuses to be: a Python API. Every `def` here trusts its caller (convtrain.nn.kernels)
to have checked shapes, dtypes and contiguity and to have allocated outputs and scratch.

Threading: the batch is handed out dynamically (the machine may be shared) to OpenMP threads
in groups of images; each thread owns its scratch (one group's im2col matrices) and calls a
*single-threaded* GEMM per group (BLAS is pinned to one thread around the parallel region, so a
threaded BLAS never runs inside it). Nothing a thread writes is written by another; the filter
gradient accumulates into per-chunk buffers summed afterwards.
Why not a serial loop over images calling a threaded BLAS instead: the per-image GEMMs of the
reference nets are too small for OpenBLAS to split well, while the images are independent,
keep their im2col matrix in the thread's own L2 and need no synchronization; a
single-threaded GEMM per image runs nearly as fast as the same GEMM over the whole batch
(the figures: docs/performance.md, "The measurements behind the kernels' rules").
Compiler directives (boundscheck, wraparound, cdivision, ...) are set in setup.py; the C helpers
(build settings, thread count, CPU probe, short-row copies) are in conv_support.h beside this file.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, sgemm

import os
import warnings

cdef extern from "conv_support.h":
    int CONVTRAIN_HAVE_OPENMP
    int CONVTRAIN_DEBUG_CHECKS
    const char *CONVTRAIN_CYTHON_VERSION
    const char *CONVTRAIN_ISA
    int convtrain_max_threads() noexcept nogil
    int convtrain_cpu_x86_64_level() noexcept nogil
    void copy_short_rows_float(float *dst, const float *src, Py_ssize_t rows, Py_ssize_t n,
                               Py_ssize_t step) noexcept nogil
    void copy_short_rows_double(double *dst, const double *src, Py_ssize_t rows, Py_ssize_t n,
                                Py_ssize_t step) noexcept nogil
    void add_short_rows_float(float *dst, Py_ssize_t step, const float *src, Py_ssize_t rows,
                              Py_ssize_t n) noexcept nogil
    void add_short_rows_double(double *dst, Py_ssize_t step, const double *src, Py_ssize_t rows,
                               Py_ssize_t n) noexcept nogil

cdef extern from "conv_row_stats.h":
    # batch norm's per-row statistics (ext/norm_rows.h's, compiled without fused multiply-adds)
    void ct_conv_row_stats_float(const float *x, Py_ssize_t rows, Py_ssize_t n,
                                 double *stats) noexcept nogil
    void ct_conv_row_stats_double(const double *x, Py_ssize_t rows, Py_ssize_t n,
                                  double *stats) noexcept nogil
    void ct_conv_row_grad_totals_float(const float *x, float *g, const float *out, Py_ssize_t n,
                                       double mean, double *sums) noexcept nogil
    void ct_conv_row_grad_totals_double(const double *x, double *g, const double *out,
                                        Py_ssize_t n, double mean, double *sums) noexcept nogil


cdef inline void row_stats(const floating *x, Py_ssize_t rows, Py_ssize_t n,
                           double *stats) noexcept nogil:
    """stats[r] = (sum, sum of squared deviations from the row's mean) of each of `rows` rows of
    n values: what ext/_norm.pyx's batch norm computes for each (image, channel) row, the same
    bits, taken here while a conv's output is in cache (the batch norm after the conv then
    skips its own pass over the activations)."""
    if floating is float:
        ct_conv_row_stats_float(x, rows, n, stats)
    else:
        ct_conv_row_stats_double(x, rows, n, stats)


cdef inline void row_grad_totals(const floating *x, floating *g, const floating *out, Py_ssize_t n,
                                 double mean, double *sums) noexcept nogil:
    """g = where(out > 0, g, 0) in place, then sums = (sum g, sum g * (x - mean)): the first
    pass of the backward of a batch norm with a fused ReLU over one (image, channel) row, the
    same bits as ext/_norm.pyx's by images, taken while a conv's input gradient is in cache."""
    if floating is float:
        ct_conv_row_grad_totals_float(x, g, out, n, mean, sums)
    else:
        ct_conv_row_grad_totals_double(x, g, out, n, mean, sums)


cdef extern from "gemm_kernels.h":
    # convtrain's own float32 GEMM tiles (AVX-512 / AVX2 builds; CONVTRAIN_HAVE_TILES is 0 in
    # the portable build, which keeps BLAS): see the header for their layouts and sums
    const int CONVTRAIN_HAVE_TILES
    Py_ssize_t ct_packed_a_floats(Py_ssize_t M, Py_ssize_t Kd) noexcept nogil
    void ct_pack_a(const float *a, Py_ssize_t row_step, Py_ssize_t col_step, Py_ssize_t M,
                   Py_ssize_t Kd, float *packed) noexcept nogil
    void ct_pack_a_rows(const float *a, const Py_ssize_t *rows, Py_ssize_t row_step,
                        Py_ssize_t col_step, Py_ssize_t M, Py_ssize_t Kd, float *packed) noexcept nogil
    void ct_gemm_nn(Py_ssize_t M, Py_ssize_t N, Py_ssize_t Kd, const float *apacked,
                    const float **brows, float *c, Py_ssize_t ldc, float **crows,
                    int relu) noexcept nogil
    void ct_gemm_nt_acc(Py_ssize_t M, Py_ssize_t Nk, Py_ssize_t L, const float *a, Py_ssize_t lda,
                        const float **brows, float *d, Py_ssize_t ldd) noexcept nogil
    double ct_fma_loop(long iters, float seed) noexcept nogil


# ----------------------------------------------------------------------------- build & threads

cdef int _num_threads = convtrain_max_threads()
# GNU OpenMP is not fork-safe: once a parallel region has run with more than one thread, a
# forked child that starts another one waits forever for the parent's pool threads. So the
# kernels note when they start a team, and a child forked after that runs them serially.
cdef bint _team_started = False
cdef bint _forked_after_team = False


cdef inline int team_size(int n) noexcept nogil:
    """Note (for fork safety) that a parallel region with n threads is about to run."""
    global _team_started
    if n > 1:
        _team_started = True
    return n


def _after_fork_in_child():
    global _num_threads, _forked_after_team
    if _team_started and CONVTRAIN_HAVE_OPENMP:
        _forked_after_team = True
        _num_threads = 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def compiled_with():
    """What this extension was built with: {'cython', 'openmp', 'debug_checks', 'max_threads',
    'isa'} (isa: "baseline", or the x86-64 level it was compiled for, e.g. "x86-64-v4")."""
    return {
        "cython": CONVTRAIN_CYTHON_VERSION.decode(),
        "openmp": bool(CONVTRAIN_HAVE_OPENMP),
        "debug_checks": bool(CONVTRAIN_DEBUG_CHECKS),
        "max_threads": convtrain_max_threads(),
        "isa": CONVTRAIN_ISA.decode(),
        "gemm_tiles": bool(CONVTRAIN_HAVE_TILES),
    }


def fma_flops(long iters, int num_threads):
    """Floating-point operations done by `iters` rounds of an FMA-bound loop (12 independent
    chains of this build's widest vectors) on each of num_threads threads; time the call to get
    the machine's FMA peak (benchmarks/bench_kernels.py)."""
    cdef double total = 0
    cdef int t
    with nogil:
        for t in prange(num_threads, num_threads=team_size(num_threads), schedule="static"):
            total += ct_fma_loop(iters, 0.5)
    return total


def cpu_x86_64_level():
    """The newest x86-64 microarchitecture level this CPU (and OS) runs: 4 (AVX-512),
    3 (AVX2, FMA), or 0 (older, or not x86-64)."""
    return convtrain_cpu_x86_64_level()


def set_num_threads(int n):
    """Use n OpenMP threads in the kernels (n >= 1; 1 without OpenMP, whatever n; 1 in a
    process forked after the kernels ran multithreaded, where more would deadlock)."""
    global _num_threads
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    if n > 1 and _forked_after_team:
        warnings.warn(
            f"convtrain kernels stay at 1 thread (asked for {n}): this process was forked after "
            f"the kernels ran multithreaded, and GNU OpenMP cannot start threads again after "
            f"fork. Use the 'spawn' or 'forkserver' start method for multithreaded workers.",
            RuntimeWarning, stacklevel=2,
        )
        n = 1
    _num_threads = n if CONVTRAIN_HAVE_OPENMP else 1


def get_num_threads():
    """The number of OpenMP threads the kernels use."""
    return _num_threads


# ----------------------------------------------------------------------------- BLAS threads
#
# A threaded BLAS called from inside an OpenMP region would oversubscribe the cores, so every
# kernel pins the BLAS libraries registered here (OpenBLAS with its own pthreads pool) to one
# thread around its parallel region and restores them afterwards: two C calls per library,
# no Python. convtrain.nn.backend registers them; other BLAS are pinned from Python instead.

ctypedef int (*blas_get_threads_fn)() noexcept nogil
ctypedef void (*blas_set_threads_fn)(int) noexcept nogil

cdef enum:
    MAX_PINNED_BLAS = 8
cdef blas_get_threads_fn _blas_get_threads[MAX_PINNED_BLAS]
cdef blas_set_threads_fn _blas_set_threads[MAX_PINNED_BLAS]
cdef int _pinned_blas_count = 0


def register_blas_threads(size_t get_threads_address, size_t set_threads_address):
    """Pin this BLAS to one thread during kernel calls, given the addresses of its
    int get_num_threads(void) and void set_num_threads(int) functions."""
    global _pinned_blas_count
    if _pinned_blas_count == MAX_PINNED_BLAS:
        raise RuntimeError(f"at most {MAX_PINNED_BLAS} BLAS libraries can be registered")
    if get_threads_address == 0 or set_threads_address == 0:
        raise ValueError("BLAS thread functions must have non-null addresses")
    _blas_get_threads[_pinned_blas_count] = <blas_get_threads_fn> get_threads_address
    _blas_set_threads[_pinned_blas_count] = <blas_set_threads_fn> set_threads_address
    _pinned_blas_count += 1


cdef inline void pin_blas(int *saved) noexcept nogil:
    """saved[i] = threads of BLAS i; then BLAS i gets one thread."""
    cdef int i
    for i in range(_pinned_blas_count):
        saved[i] = _blas_get_threads[i]()
        if saved[i] != 1:
            _blas_set_threads[i](1)


cdef inline void unpin_blas(const int *saved) noexcept nogil:
    cdef int i
    for i in range(_pinned_blas_count):
        if saved[i] != 1:
            _blas_set_threads[i](saved[i])


# ----------------------------------------------------------------------------- GEMM

cdef float *packed_a(const float *a, Py_ssize_t row_step, Py_ssize_t col_step, Py_ssize_t M,
                     Py_ssize_t Kd) noexcept nogil:
    """A (M x Kd) packed for ct_gemm_nn (free() it), or NULL: no tiles in this build, or no
    memory (then the caller takes the BLAS path)."""
    cdef float *packed
    if not CONVTRAIN_HAVE_TILES:
        return NULL
    packed = <float *> malloc(ct_packed_a_floats(M, Kd) * sizeof(float))
    if packed != NULL:
        ct_pack_a(a, row_step, col_step, M, Kd, packed)
    return packed


cdef float *packed_a_rows(const float *a, const Py_ssize_t *rows, Py_ssize_t row_step,
                          Py_ssize_t col_step, Py_ssize_t M, Py_ssize_t Kd) noexcept nogil:
    """packed_a with A's row m taken from a's row rows[m]."""
    cdef float *packed
    if not CONVTRAIN_HAVE_TILES:
        return NULL
    packed = <float *> malloc(ct_packed_a_floats(M, Kd) * sizeof(float))
    if packed != NULL:
        ct_pack_a_rows(a, rows, row_step, col_step, M, Kd, packed)
    return packed


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


cdef inline void copy_rows(floating *dst, const floating *src, Py_ssize_t rows, Py_ssize_t n,
                           Py_ssize_t step) noexcept nogil:
    """dst[r*n + k] = src[r*step + k] for r < rows, k < n (dst and src do not overlap)."""
    cdef Py_ssize_t r, k
    if n * <Py_ssize_t> sizeof(floating) < 64:
        if floating is float:
            copy_short_rows_float(dst, src, rows, n, step)
        else:
            copy_short_rows_double(dst, src, rows, n, step)
        return
    for r in range(rows):
        copy_long_row(dst, src, n)
        dst += n
        src += step


cdef inline void copy_long_row(floating *dst, const floating *src, Py_ssize_t n) noexcept nogil:
    # a row at a time, not one loop over the block: GCC vectorizes this form better (measured
    # on MNIST's 20-wide rows: docs/performance.md)
    cdef Py_ssize_t k
    for k in range(n):
        dst[k] = src[k]


cdef inline void add_long_row(floating *dst, const floating *src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        dst[k] += src[k]


cdef inline void add_rows(floating *dst, Py_ssize_t step, const floating *src, Py_ssize_t rows,
                          Py_ssize_t n) noexcept nogil:
    """dst[r*step + k] += src[r*n + k] for r < rows, k < n (dst and src do not overlap)."""
    cdef Py_ssize_t r, k
    if n * <Py_ssize_t> sizeof(floating) < 64:
        if floating is float:
            add_short_rows_float(dst, step, src, rows, n)
        else:
            add_short_rows_double(dst, step, src, rows, n)
        return
    for r in range(rows):
        add_long_row(dst, src, n)
        dst += step
        src += n


cdef inline void copy_strided(floating *dst, const floating *src, Py_ssize_t n,
                              Py_ssize_t src_stride) noexcept nogil:
    """dst[k] = src[k*src_stride] for k < n (a plain loop: rows are short, memcpy calls cost)."""
    cdef Py_ssize_t k
    if src_stride == 1:
        copy_rows(dst, src, 1, n, 0)
    else:
        for k in range(n):
            dst[k] = src[k * src_stride]


cdef inline void add_strided(floating *dst, Py_ssize_t dst_stride, const floating *src,
                             Py_ssize_t n) noexcept nogil:
    """dst[k*dst_stride] += src[k] for k < n."""
    cdef Py_ssize_t k
    if dst_stride == 1:
        add_rows(dst, 0, src, 1, n)
    else:
        for k in range(n):
            dst[k * dst_stride] += src[k]


cdef inline bint is_valid_stride1(const Geometry *g) noexcept nogil:
    """No padding and stride 1: every tap of every output reads inside the image."""
    return g.ph == 0 and g.pw == 0 and g.sh == 1 and g.sw == 1


cdef void im2col_image_valid(const floating *x, floating *cols, Py_ssize_t ld,
                             const Geometry *g) noexcept nogil:
    """im2col_image without padding, stride 1: no bounds to work out per tap (on 6x6 images
    the two divisions per tap of the general path cost as much as the copies)."""
    cdef Py_ssize_t c, i, j, oh, ow, Ho = g.Ho, Wo = g.Wo, W = g.W
    cdef const floating *src
    cdef floating *dst
    cdef bint short_rows = Wo * <Py_ssize_t> sizeof(floating) < 64
    for c in range(g.C):
        for i in range(g.kh):
            for j in range(g.kw):
                dst = cols + ((c * g.kh + i) * g.kw + j) * ld
                src = x + (c * g.H + i) * W + j
                if short_rows:
                    copy_rows(dst, src, Ho, Wo, W)
                    continue
                for oh in range(Ho):  # written out here: as a call, slower on MNIST's rows
                    for ow in range(Wo):
                        dst[ow] = src[ow]
                    dst += Wo
                    src += W


cdef void col2im_image_valid(const floating *cols, Py_ssize_t ld, floating *x,
                             const Geometry *g) noexcept nogil:
    """col2im_image's accumulation without padding, stride 1 (x already zeroed).

    Short rows (DIGITS): taps in the order (c, j, i), so that consecutive blocks add to the
    same x rows one row apart, at the same columns, and each row is read back exactly as it
    was just stored; in the order (c, i, j) a block rereads the rows the previous one has just
    written, one value to the side, which the CPU cannot forward from its store buffer (the
    figure for DIGITS conv2: docs/performance.md). Long rows keep (c, i, j), the order the sums
    of MNIST and CIFAR ran fastest in, and their loops written out (as for im2col)."""
    cdef Py_ssize_t c, i, j, oh, ow, Ho = g.Ho, Wo = g.Wo, W = g.W
    cdef const floating *src
    cdef floating *dst
    if Wo * <Py_ssize_t> sizeof(floating) < 64:
        for c in range(g.C):
            for j in range(g.kw):
                for i in range(g.kh):
                    add_rows(x + (c * g.H + i) * W + j, W, cols + ((c * g.kh + i) * g.kw + j) * ld,
                             Ho, Wo)
        return
    for c in range(g.C):
        for i in range(g.kh):
            for j in range(g.kw):
                src = cols + ((c * g.kh + i) * g.kw + j) * ld
                dst = x + (c * g.H + i) * W + j
                for oh in range(Ho):
                    for ow in range(Wo):
                        dst[ow] += src[ow]
                    src += Wo
                    dst += W


cdef void im2col_image(const floating *x, floating *cols, Py_ssize_t ld,
                       const Geometry *g) noexcept nogil:
    """cols[(c*kh + i)*kw + j, oh*Wo + ow] = x[c, oh*sh - ph + i, ow*sw - pw + j]  (0 outside x).

    x is one image (C, H, W); cols has C*kh*kw rows of Ho*Wo used entries, leading dimension ld.
    Row r of cols^T is row r of the lecture's M_X^im (channels blockwise, (i, j) row-major).
    """
    cdef Py_ssize_t c, i, j, oh, ow, oh_lo, oh_hi, ow_lo, ow_hi
    cdef Py_ssize_t Ho = g.Ho, Wo = g.Wo, row_step = g.sh * g.W
    cdef const floating *src
    cdef floating *dst
    if is_valid_stride1(g):
        im2col_image_valid(x, cols, ld, g)
        return
    for c in range(g.C):
        for i in range(g.kh):
            # output rows oh_lo <= oh < oh_hi read input row oh*sh + i - ph inside x
            valid_range(i - g.ph, g.sh, g.H, g.Ho, &oh_lo, &oh_hi)
            for j in range(g.kw):
                valid_range(j - g.pw, g.sw, g.W, g.Wo, &ow_lo, &ow_hi)
                dst = cols + ((c * g.kh + i) * g.kw + j) * ld
                if oh_lo == 0 and oh_hi == Ho and ow_lo == 0 and ow_hi == Wo and g.sw == 1:
                    # the common case: a valid, stride-1 tap; rows of Wo, the source steps sh*W
                    copy_rows(dst, x + (c * g.H + i - g.ph) * g.W + j - g.pw, Ho, Wo, row_step)
                    continue
                if oh_lo > 0:
                    memset(dst, 0, oh_lo * g.Wo * sizeof(floating))
                for oh in range(oh_lo, oh_hi):
                    # first valid input pixel: row oh*sh + i - ph, column ow_lo*sw + j - pw
                    src = x + (c * g.H + oh * g.sh + i - g.ph) * g.W + ow_lo * g.sw + j - g.pw
                    if ow_lo > 0:
                        memset(dst + oh * g.Wo, 0, ow_lo * sizeof(floating))
                    copy_strided(dst + oh * g.Wo + ow_lo, src, ow_hi - ow_lo, g.sw)
                    if ow_hi < g.Wo:
                        memset(dst + oh * g.Wo + ow_hi, 0, (g.Wo - ow_hi) * sizeof(floating))
                if oh_hi < g.Ho:
                    memset(dst + oh_hi * g.Wo, 0, (g.Ho - oh_hi) * g.Wo * sizeof(floating))


cdef void col2im_image(const floating *cols, Py_ssize_t ld, floating *x,
                       const Geometry *g) noexcept nogil:
    """The adjoint of im2col_image: x = 0, then x[c, oh*sh - ph + i, ow*sw - pw + j] += cols[...].

    Entries of cols that fall into the padding are dropped.
    """
    cdef Py_ssize_t c, i, j, oh, ow, oh_lo, oh_hi, ow_lo, ow_hi
    cdef Py_ssize_t Ho = g.Ho, Wo = g.Wo, row_step = g.sh * g.W
    cdef const floating *src
    cdef floating *dst
    memset(x, 0, g.C * g.H * g.W * sizeof(floating))
    if is_valid_stride1(g):
        col2im_image_valid(cols, ld, x, g)
        return
    for c in range(g.C):
        for i in range(g.kh):
            valid_range(i - g.ph, g.sh, g.H, g.Ho, &oh_lo, &oh_hi)
            for j in range(g.kw):
                valid_range(j - g.pw, g.sw, g.W, g.Wo, &ow_lo, &ow_hi)
                src = cols + ((c * g.kh + i) * g.kw + j) * ld
                if oh_lo == 0 and oh_hi == Ho and ow_lo == 0 and ow_hi == Wo and g.sw == 1:
                    add_rows(x + (c * g.H + i - g.ph) * g.W + j - g.pw, row_step, src, Ho, Wo)
                    continue
                for oh in range(oh_lo, oh_hi):
                    add_strided(x + (c * g.H + oh * g.sh + i - g.ph) * g.W + ow_lo * g.sw + j - g.pw,
                                g.sw, src + oh * g.Wo + ow_lo, ow_hi - ow_lo)


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


cdef inline void fill(floating *row, Py_ssize_t n, floating value) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        row[i] = value


cdef inline Py_ssize_t group_count(Py_ssize_t N, Py_ssize_t G, Py_ssize_t group) noexcept nogil:
    """Images in group `group` of G consecutive images (the last group may be short)."""
    return G if N - group * G >= G else N - group * G


def im2col(const floating[:, :, :, ::1] x, floating[:, :, ::1] cols,
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
           Py_ssize_t ph, Py_ssize_t pw):
    """cols[n] (C*kh*kw, Ho*Wo) = im2col of x[n] (C, H, W), OpenMP over n."""
    cdef Geometry g = make_geometry(x.shape[1], x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw)
    cdef Py_ssize_t n, N = x.shape[0], P = g.Ho * g.Wo
    if N == 0:
        return
    with nogil:
        for n in prange(N, schedule="dynamic", num_threads=team_size(_num_threads)):
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
        for n in prange(N, schedule="dynamic", num_threads=team_size(_num_threads)):
            col2im_image(&cols[n, 0, 0], P, &x[n, 0, 0, 0], &g)


# ----------------------------------------------------------------------------- ReLU

cdef enum:
    RELU_BLOCK = 16384   # elements per OpenMP work item (64 KiB of float32)


cdef inline Py_ssize_t min_size(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef inline int min_threads(Py_ssize_t work_items) noexcept nogil:
    """The kernel threads, but no more than there are work items."""
    return <int> work_items if work_items < _num_threads else _num_threads


cdef inline void relu_inplace(floating *a, Py_ssize_t n) noexcept nogil:
    """a = max(a, 0) as np.maximum(a, 0) computes it on long arrays: NaN is kept, -0.0 -> 0."""
    cdef Py_ssize_t k
    for k in range(n):
        a[k] = a[k] if (a[k] > 0 or a[k] != a[k]) else 0


cdef inline void relu_mask_inplace(floating *d, const floating *out, Py_ssize_t n) noexcept nogil:
    """d = where(out > 0, d, 0): the ReLU's backward given its output (as PyTorch's
    threshold_backward: a masked NaN or -0.0 becomes +0.0, where dout * (out > 0) would keep
    NaN and -0.0; every other value is the same). Written as a select, which GCC vectorizes;
    a multiply by a bool-to-float was many times slower here."""
    cdef Py_ssize_t k
    for k in range(n):
        d[k] = d[k] if out[k] > 0 else 0


def relu_forward(floating[::1] a):
    """a = max(a, 0) in place, OpenMP over blocks."""
    cdef Py_ssize_t n = a.shape[0], block, blocks = (n + RELU_BLOCK - 1) // RELU_BLOCK
    if n == 0:
        return
    with nogil:
        for block in prange(blocks, schedule="static", num_threads=team_size(min_threads(blocks))):
            relu_inplace(&a[block * RELU_BLOCK], min_size(RELU_BLOCK, n - block * RELU_BLOCK))


cdef inline void add_relu_inplace(floating *a, const floating *b, Py_ssize_t n) noexcept nogil:
    """a = max(a + b, 0): np.add then relu_inplace in one pass, the same bits."""
    cdef Py_ssize_t k
    cdef floating t
    for k in range(n):
        t = a[k] + b[k]
        a[k] = t if (t > 0 or t != t) else 0


def add_relu_forward(floating[::1] a, const floating[::1] b):
    """a = max(a + b, 0) in place (a residual block's sum and ReLU), OpenMP over blocks."""
    cdef Py_ssize_t n = a.shape[0], block, blocks = (n + RELU_BLOCK - 1) // RELU_BLOCK
    if n == 0:
        return
    with nogil:
        for block in prange(blocks, schedule="static", num_threads=team_size(min_threads(blocks))):
            add_relu_inplace(&a[block * RELU_BLOCK], &b[block * RELU_BLOCK],
                             min_size(RELU_BLOCK, n - block * RELU_BLOCK))


cdef inline void add_inplace(floating *a, const floating *b, Py_ssize_t n) noexcept nogil:
    """a = a + b: np.add's bits (one IEEE addition per element)."""
    cdef Py_ssize_t k
    for k in range(n):
        a[k] = a[k] + b[k]


def add_forward(floating[::1] a, const floating[::1] b):
    """a = a + b in place (a residual block's two input gradients), OpenMP over blocks."""
    cdef Py_ssize_t n = a.shape[0], block, blocks = (n + RELU_BLOCK - 1) // RELU_BLOCK
    if n == 0:
        return
    with nogil:
        for block in prange(blocks, schedule="static", num_threads=team_size(min_threads(blocks))):
            add_inplace(&a[block * RELU_BLOCK], &b[block * RELU_BLOCK],
                        min_size(RELU_BLOCK, n - block * RELU_BLOCK))


def relu_backward(floating[::1] d, const floating[::1] out):
    """d = where(out > 0, d, 0) in place, OpenMP over blocks."""
    cdef Py_ssize_t n = d.shape[0], block, blocks = (n + RELU_BLOCK - 1) // RELU_BLOCK
    if n == 0:
        return
    with nogil:
        for block in prange(blocks, schedule="static", num_threads=team_size(min_threads(blocks))):
            relu_mask_inplace(&d[block * RELU_BLOCK], &out[block * RELU_BLOCK],
                              min_size(RELU_BLOCK, n - block * RELU_BLOCK))


# ----------------------------------------------------------------------------- own GEMM tiles
#
# In the builds with tiles (CONVTRAIN_HAVE_TILES), float32 convolutions whose images are not
# grouped (G == 1) take the *direct* path: the rows of the lecture's M_X^im^T (one per tap
# (c, i, j)) are read straight from the image, never copied out. Stride 1: tap (c, i, j)'s
# row is the image plane c from row i, column j on, read as one long row of width Wp (the
# padded image's width): entry oh*Wp + ow is x[c, oh + i, ow + j]. So the GEMMs run over
# Pd = (Ho-1)*Wp + Wo columns instead of P = Ho*Wo: the columns with ow >= Wo are computed
# and dropped (forward), or multiplied by zeros (gradients; dout is copied into a zero-padded
# (F, Pd) buffer). That costs Wp/Wo - 1 more multiply-adds (CIFAR conv2: 8%, MNIST conv2:
# 20%) and saves writing and re-reading the whole im2col matrix. Padding: the image is first
# copied into a zero-bordered (C, Hp, Wp) buffer. With a non-finite x the dropped columns'
# products 0 * inf are NaN and reach dw (finite inputs are unaffected).
# Stride (sh, sw): the padded image is copied as sh*sw phase planes per channel, plane
# (c, a, b) of size (Hq, Wq) = (ceil(Hp/sh), ceil(Wp/sw)) holding xpad[c, u*sh + a, v*sw + b]
# at (u, v). Output (oh, ow)'s tap (c, i, j) reads xpad[c, oh*sh + i, ow*sw + j], which is
# plane (c, i % sh, j % sw) at (oh + i // sh, ow + j // sw): again one long row, of width Wq,
# from (i // sh, j // sw) on; Pd = (Ho-1)*Wq + Wo, Wq - Wo columns dropped per row. At
# stride 1 the one plane is the padded image itself.
# The input gradient takes the tiles only where no column is dropped, at stride 1 (see
# direct_input_gradient_pays); everything else (grouped small images, fewer than 64 taps or
# more than 15% dropped columns, float64, the portable build) keeps im2col + BLAS.

cdef struct Direct:
    Py_ssize_t Hp, Wp, Pd      # padded image (Hp, Wp); columns computed per image
    Py_ssize_t Hq, Wq          # one phase plane (the padded image itself at stride 1)
    Py_ssize_t image_floats    # C * sh * sw * Hq * Wq: the copied image
    bint padded                # the image is copied (padding or a stride), not read in place


cdef Direct make_direct(const Geometry *g) noexcept nogil:
    cdef Direct d
    d.Hp = g.H + 2 * g.ph
    d.Wp = g.W + 2 * g.pw
    d.Hq = (d.Hp + g.sh - 1) // g.sh
    d.Wq = (d.Wp + g.sw - 1) // g.sw
    d.image_floats = g.C * g.sh * g.sw * d.Hq * d.Wq
    d.Pd = (g.Ho - 1) * d.Wq + g.Wo
    d.padded = g.ph > 0 or g.pw > 0 or g.sh > 1 or g.sw > 1
    return d


# Smaller outputs keep BLAS even one image per GEMM: ResNet-8's res3.conv1 (stride 2, 8x8 out,
# 71 columns: one 48-column tile and a short one) ran its forward 4.0 -> 5.7 ms and its filter
# gradient 4.2 -> 9 ms slower on the tiles.
cdef enum:
    DIRECT_MIN_OUTPUT = 128


cdef inline bint direct_applies(const Geometry *g, Py_ssize_t G) noexcept nogil:
    """Where the tiles run (float32, builds with tiles): the direct path only, with at least 64
    taps and at most 15% of the columns computed and dropped ((Wp - Wo) / Wo). That is where
    they beat OpenBLAS: with fewer taps a tile has too little work per load, with more dropped
    columns the wasted multiply-adds cost more than im2col saves, and grouped small images are
    BLAS's best case (the GFLOP/s of each reference layer: docs/performance.md)."""
    cdef Py_ssize_t dropped = (g.W + 2 * g.pw + g.sw - 1) // g.sw - g.Wo   # Wq - Wo
    return (CONVTRAIN_HAVE_TILES and G == 1 and g.Ho > 0 and g.Wo > 0
            and g.C * g.kh * g.kw >= 64 and dropped * 20 <= g.Wo * 3
            and g.Ho * g.Wo >= DIRECT_MIN_OUTPUT)


cdef inline bint direct_input_gradient_pays(const Geometry *g, const Direct *d) noexcept nogil:
    """The input gradient's tile computes the dropped columns (Wp/Wo - 1 more) where BLAS +
    col2im computes none, and was measured slower than them even with few dropped (CIFAR and
    MNIST conv2: docs/performance.md). So it runs only where no column is dropped (kw == 1
    without padding, stride 1), and the input gradient of the reference nets stays on BLAS."""
    return d.Wp == g.Wo and g.sh == 1 and g.sw == 1


cdef const float *padded_image(const float *x, float *xpad, const Geometry *g,
                               const Direct *d) noexcept nogil:
    """x itself without padding at stride 1, else x copied into xpad inside zero borders:
    (C, Hp, Wp) at stride 1, else as its phase planes (C, sh, sw, Hq, Wq) (see above)."""
    cdef Py_ssize_t c, h, hp, b, w0, v, n
    cdef float *dst
    cdef const float *src
    if not d.padded:
        return x
    memset(xpad, 0, d.image_floats * sizeof(float))
    if g.sh == 1 and g.sw == 1:
        for c in range(g.C):
            for h in range(g.H):
                memcpy(xpad + (c * d.Hp + h + g.ph) * d.Wp + g.pw, x + (c * g.H + h) * g.W,
                       g.W * sizeof(float))
        return xpad
    for c in range(g.C):
        for h in range(g.H):
            hp = h + g.ph
            src = x + (c * g.H + h) * g.W
            for b in range(g.sw):
                # the columns w of x with (w + pw) % sw == b: from w0 on, every sw-th, to
                # column (w0 + pw) // sw of plane (c, hp % sh, b) on
                w0 = ((b - g.pw) % g.sw + g.sw) % g.sw
                if w0 >= g.W:
                    continue
                dst = (xpad + (((c * g.sh + hp % g.sh) * g.sw + b) * d.Hq + hp // g.sh) * d.Wq
                       + (w0 + g.pw) // g.sw)
                n = (g.W - w0 + g.sw - 1) // g.sw
                for v in range(n):
                    dst[v] = src[w0 + v * g.sw]
    return xpad


cdef void tap_rows(const float *image, const float **rows, const Geometry *g,
                   const Direct *d) noexcept nogil:
    """rows[(c*kh + i)*kw + j] = where tap (c, i, j)'s row of M_X^im^T starts in the image:
    plane (c, i % sh, j % sw) at row i // sh, column j // sw (stride 1: plane c at (i, j))."""
    cdef Py_ssize_t c, i, j
    for c in range(g.C):
        for i in range(g.kh):
            for j in range(g.kw):
                rows[(c * g.kh + i) * g.kw + j] = (
                    image + (((c * g.sh + i % g.sh) * g.sw + j % g.sw) * d.Hq + i // g.sh) * d.Wq
                    + j // g.sw)


# The input gradient's tile adds each of its rows (taps) into the image as it stores them. Taps
# (c, i, j) and (c, i, j+1) add to the same pixels one float apart, and a load that partly
# overlaps a store still in flight cannot be forwarded from it (the CPU waits for the store):
# so the rows are taken in the order (i, j, c), channel fastest, whose neighbours lie a whole
# plane apart (a few percent on CIFAR conv2's input gradient: docs/performance.md).

cdef Py_ssize_t *channel_fastest_taps(const Geometry *g) noexcept nogil:
    """order[(i*kw + j)*C + c] = (c*kh + i)*kw + j (free() it; NULL if out of memory)."""
    cdef Py_ssize_t c, t, taps = g.kh * g.kw
    cdef Py_ssize_t *order = <Py_ssize_t *> malloc(g.C * taps * sizeof(Py_ssize_t))
    if order != NULL:
        for t in range(taps):
            for c in range(g.C):
                order[t * g.C + c] = c * taps + t
    return order


cdef void tap_rows_out(float *image, float **rows, const Py_ssize_t *order, const Geometry *g,
                       const Direct *d) noexcept nogil:
    """rows[m] = where tap order[m]'s row starts in a writeable image (col2im: the input
    gradient adds into them)."""
    cdef Py_ssize_t m, tap, c, i, j, K = g.C * g.kh * g.kw
    for m in range(K):
        tap = order[m]
        c = tap // (g.kh * g.kw)
        i = (tap // g.kw) % g.kh
        j = tap % g.kw
        rows[m] = image + (c * d.Hp + i) * d.Wp + j


cdef void spread_gradient(const float *dout, float *dpad, Py_ssize_t F, const Geometry *g,
                          const Direct *d) noexcept nogil:
    """dpad (F, Pd): dout (F, Ho, Wo) on the direct path's columns, 0 in the dropped ones."""
    cdef Py_ssize_t f, oh
    cdef float *row
    for f in range(F):
        for oh in range(g.Ho):
            row = dpad + f * d.Pd + oh * d.Wq
            memcpy(row, dout + (f * g.Ho + oh) * g.Wo, g.Wo * sizeof(float))
            if oh < g.Ho - 1:
                memset(row + g.Wo, 0, (d.Wq - g.Wo) * sizeof(float))


cdef void unpad_image(const float *xpad, float *x, const Geometry *g, const Direct *d) noexcept nogil:
    cdef Py_ssize_t c, h
    for c in range(g.C):
        for h in range(g.H):
            memcpy(x + (c * g.H + h) * g.W, xpad + (c * d.Hp + h + g.ph) * d.Wp + g.pw,
                   g.W * sizeof(float))


cdef void direct_input_gradient(const float *dpad, const float *tiles_wt, float *dx, float *dxpad,
                                const float **drows, float **dxrows, const Py_ssize_t *order,
                                Py_ssize_t F, const Geometry *g, const Direct *d) noexcept nogil:
    """dx (C, H, W) = col2im(W^T . dpad): each tap's row of the product added into the image
    as the tile stores it (tiles_wt packed with its rows in `order`)."""
    cdef Py_ssize_t f, K = g.C * g.kh * g.kw
    cdef float *image = dxpad if d.padded else dx
    memset(image, 0, g.C * d.Hp * d.Wp * sizeof(float))
    tap_rows_out(image, dxrows, order, g, d)
    for f in range(F):
        drows[f] = dpad + f * d.Pd
    ct_gemm_nn(K, d.Pd, F, tiles_wt, drows, NULL, 0, dxrows, 0)
    if d.padded:
        unpad_image(dxpad, dx, g, d)


# ----------------------------------------------------------------------------- convolution
#
# The batch is cut into groups of G consecutive images (G = 1 unless Ho*Wo is small); the
# im2col matrices of a group sit side by side in one (K, G*P) buffer, ld = G*P, so that small
# images still make one GEMM of reasonable width. K = C*kh*kw, P = Ho*Wo.

def conv2d_forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w_ext,
                   floating[:, :, :, ::1] out, Py_ssize_t kh, Py_ssize_t kw,
                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                   Py_ssize_t G, floating[:, ::1] cols_scratch, floating[:, ::1] out_scratch,
                   int num_threads, bint relu=False, double[:, :, ::1] stats=None):
    """out[n] (F, P) = W_ext (F, K[+1]) . [cols[n]; 1] (K[+1], P) for every image n,
    then out[n] = max(out[n], 0) if relu (while the image's output is still in cache).
    stats (N, F, 2), unless None: stats[n, f] = (sum, sum of squared deviations from its own
    mean) of out[n, f], batch norm's statistics of each row (row_stats), also while in cache.

    w_ext is w.reshape(F, K), with the bias appended as column K if it has K+1 columns (then
    the im2col buffer gets a row of ones, and the GEMM adds the bias).
    cols_scratch (threads, K[+1]*G*P): one group's im2col matrices per thread;
    out_scratch (threads, F*G*P) when G > 1: the group's output before it is scattered to NCHW
    (None when G == 1: the GEMM writes into out).
    float32, stride 1, G == 1 in the builds with tiles: convtrain's own GEMM tiles on the image
    itself (the direct path above), the ReLU applied as the tile stores.
    """
    cdef Geometry g = make_geometry(x.shape[1], x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw)
    cdef Direct d = make_direct(&g)
    cdef Py_ssize_t N = x.shape[0], F = w_ext.shape[0], k_ext = w_ext.shape[1]
    cdef Py_ssize_t K = g.C * g.kh * g.kw, P = g.Ho * g.Wo, ld = G * P
    cdef Py_ssize_t groups = (N + G - 1) // G
    cdef Py_ssize_t group, n0, count, i, f, oh
    cdef floating *cols = NULL
    cdef floating *group_out = NULL
    cdef float *tiles_w = NULL     # the filters packed for convtrain's own GEMM tiles
    cdef bint direct = floating is float and direct_applies(&g, G)
    cdef Py_ssize_t thread_floats = F * d.Pd + d.image_floats + d.Pd
    cdef const float **all_rows = NULL   # per thread: where each row of B starts
    cdef float *buffers = NULL           # per thread: output, padded image, ones
    cdef const float **rows = NULL
    cdef float *stage = NULL
    cdef float *xpad = NULL
    cdef const float *image = NULL
    cdef bint done
    cdef int saved_blas_threads[MAX_PINNED_BLAS]
    cdef double *stats_ptr = &stats[0, 0, 0] if stats is not None and N > 0 else NULL
    if N == 0:
        return
    with nogil:
        if floating is float:
            # allocated here for every thread: short of memory, the whole call takes BLAS
            if direct:
                all_rows = <const float **> malloc(num_threads * k_ext * sizeof(float *))
                buffers = <float *> malloc(num_threads * thread_floats * sizeof(float))
                tiles_w = packed_a(&w_ext[0, 0], k_ext, 1, F, k_ext)
                direct = all_rows != NULL and buffers != NULL and tiles_w != NULL
        pin_blas(saved_blas_threads)
        with parallel(num_threads=team_size(num_threads)):
            cols = &cols_scratch[threadid(), 0]
            if G > 1:
                group_out = &out_scratch[threadid(), 0]
            if k_ext > K:
                fill(cols + K * ld, ld, <floating> 1)   # the bias row, never overwritten
            if floating is float:
                if direct:
                    rows = all_rows + threadid() * k_ext
                    stage = buffers + threadid() * thread_floats
                    xpad = stage + F * d.Pd
                    fill(xpad + d.image_floats, d.Pd, 1)
                    rows[k_ext - 1] = xpad + d.image_floats   # the ones (bias) row
            for group in prange(groups, schedule="dynamic"):
                n0 = group * G
                count = group_count(N, G, group)
                done = False
                if floating is float:
                    if direct:    # (G == 1)
                        image = padded_image(&x[n0, 0, 0, 0], xpad, &g, &d)
                        tap_rows(image, rows, &g, &d)
                        ct_gemm_nn(F, d.Pd, k_ext, tiles_w, rows, stage, d.Pd, NULL, relu)
                        for f in range(F):
                            for oh in range(g.Ho):
                                memcpy(&out[n0, f, oh, 0], stage + f * d.Pd + oh * d.Wq,
                                       g.Wo * sizeof(float))
                            if stats_ptr != NULL:   # the plane just copied, in L1
                                row_stats(&out[n0, f, 0, 0], 1, P, stats_ptr + (n0 * F + f) * 2)
                        done = True
                if done:
                    continue
                for i in range(count):
                    im2col_image(&x[n0 + i, 0, 0, 0], cols + i * P, ld, &g)
                if G == 1:
                    gemm_rowmajor(c"N", c"N", <int> F, <int> P, <int> k_ext, <floating> 1,
                                  &w_ext[0, 0], <int> k_ext, cols, <int> ld,
                                  <floating> 0, &out[n0, 0, 0, 0], <int> P)
                else:
                    gemm_rowmajor(c"N", c"N", <int> F, <int> (count * P), <int> k_ext, <floating> 1,
                                  &w_ext[0, 0], <int> k_ext, cols, <int> ld,
                                  <floating> 0, group_out, <int> ld)
                    # (F, count*P) -> out[n0 + i] (F, P)
                    for i in range(count):
                        for f in range(F):
                            memcpy(&out[n0 + i, 0, 0, 0] + f * P, group_out + f * ld + i * P,
                                   P * sizeof(floating))
                if relu:
                    relu_inplace(&out[n0, 0, 0, 0], count * F * P)
                if stats_ptr != NULL:
                    row_stats(&out[n0, 0, 0, 0], count * F, P, stats_ptr + n0 * F * 2)
        unpin_blas(saved_blas_threads)
        free(tiles_w)
        free(all_rows)
        free(buffers)


def conv2d_backward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] dout,
                    const floating[:, ::1] w2d, const floating[:, :, :, ::1] relu_out,
                    floating[:, ::1] dw_ext_per_chunk, floating[:, :, :, ::1] dx,
                    Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                    Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t G,
                    floating[:, ::1] cols_scratch, floating[:, ::1] dout_scratch,
                    int num_threads):
    """The whole backward pass of a conv layer in one parallel region, per group of images:

        dout[n] *= (relu_out[n] > 0)                 unless relu_out is None (the ReLU after this layer)
        dW_ext[chunk] (F, K+1) += dout_g . [cols_g; 1]^T   (the lecture's X * G; column K is db)
        dx[n] = col2im(W^T (K, F) . dout_g)          unless dx is None (as conv2d_backward_input)

    so each image's dout is masked and used twice while it is in cache. dout is modified in
    place when masked. w2d is w.reshape(F, K) (None with dx); relu_out has dout's shape.
    The im2col buffer is reused for the column gradients once the filter GEMM has read it
    (rows 0..K-1; the ones row K stays). dw_ext_per_chunk (chunks, F*(K+1)) must be zero on
    entry; the caller sums it over chunks. The chunks (contiguous runs of groups) depend only
    on N, G and the number of chunks, never on the threads, so the filter gradient is the same,
    bit for bit, for any thread count; each chunk belongs to one thread at a time (race-free),
    and dx[n] is written by one thread. With relu_out, w2d and dx None this is the filter
    gradient alone.
    cols_scratch (threads, (K+1)*G*P); dout_scratch (threads, F*G*P) when G > 1, else None.
    float32, stride 1, G == 1 in the builds with tiles: convtrain's own GEMM tiles on the image
    itself (the direct path; the input gradient too where no column is dropped, col2im fused
    into its store).
    """
    cdef Geometry g = make_geometry(x.shape[1], x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw)
    cdef Direct d = make_direct(&g)
    cdef Py_ssize_t N = x.shape[0], F = dout.shape[1]
    cdef Py_ssize_t K = g.C * g.kh * g.kw, P = g.Ho * g.Wo, ld = G * P
    cdef Py_ssize_t groups = (N + G - 1) // G, chunks = dw_ext_per_chunk.shape[0]
    cdef Py_ssize_t chunk, group, n0, count, i, f, lda
    cdef floating *cols = NULL
    cdef floating *group_dout = NULL
    cdef const floating *a = NULL
    cdef float *tiles_wt = NULL    # W^T packed for the tiles (the input gradient)
    cdef int saved_blas_threads[MAX_PINNED_BLAS]
    # the optional parts, decided once: the loops below test these flags, never the arrays
    cdef bint mask = relu_out is not None, input_grad = dx is not None
    cdef bint direct = floating is float and direct_applies(&g, G)
    cdef bint direct_dx = direct and input_grad and direct_input_gradient_pays(&g, &d)
    cdef Py_ssize_t thread_rows = 2 * K + 1 + F, thread_floats = F * d.Pd + 2 * d.image_floats + d.Pd
    cdef const float **all_rows = NULL   # per thread: rows of B (K+1), of dout (F), of dx (K)
    cdef float *buffers = NULL           # per thread (direct): dout padded, padded x, dx, ones
    cdef Py_ssize_t *order = NULL        # the input gradient's tap order (direct)
    cdef const float **rows = NULL
    cdef const float **drows = NULL
    cdef float **dxrows = NULL
    cdef float *dpad = NULL
    cdef float *xpad = NULL
    cdef float *dxpad = NULL
    cdef const float *image = NULL
    if N == 0:
        return
    with nogil:
        if floating is float:
            # everything the threads need, allocated here: if memory runs short the whole call
            # takes a slower path, never part of it (the bits would depend on the threads)
            if direct:
                all_rows = <const float **> malloc(num_threads * thread_rows * sizeof(float *))
                buffers = <float *> malloc(num_threads * thread_floats * sizeof(float))
                direct = all_rows != NULL and buffers != NULL
            if direct and direct_dx:
                order = channel_fastest_taps(&g)
                if order != NULL:
                    tiles_wt = packed_a_rows(&w2d[0, 0], order, 1, K, K, F)
                direct = tiles_wt != NULL
        pin_blas(saved_blas_threads)
        with parallel(num_threads=team_size(num_threads)):
            cols = &cols_scratch[threadid(), 0]
            if G > 1:
                group_dout = &dout_scratch[threadid(), 0]
            fill(cols + K * ld, ld, <floating> 1)   # ones row: its product with dout is db
            if floating is float:
                if direct:
                    rows = all_rows + threadid() * thread_rows
                    drows = rows + K + 1
                    dxrows = <float **> (drows + F)
                    dpad = buffers + threadid() * thread_floats
                    xpad = dpad + F * d.Pd
                    dxpad = xpad + d.image_floats
                    fill(dxpad + d.image_floats, d.Pd, 1)
                    rows[K] = dxpad + d.image_floats     # the ones (db) row
            for chunk in prange(chunks, schedule="dynamic"):
                for group in range(chunk * groups // chunks, (chunk + 1) * groups // chunks):
                    n0 = group * G
                    count = group_count(N, G, group)
                    if mask:
                        relu_mask_inplace(&dout[n0, 0, 0, 0], &relu_out[n0, 0, 0, 0], count * F * P)
                    if floating is float:
                        if direct:     # (G == 1)
                            image = padded_image(&x[n0, 0, 0, 0], xpad, &g, &d)
                            tap_rows(image, rows, &g, &d)
                            spread_gradient(&dout[n0, 0, 0, 0], dpad, F, &g, &d)
                            ct_gemm_nt_acc(F, K + 1, d.Pd, dpad, d.Pd, rows,
                                           &dw_ext_per_chunk[chunk, 0], K + 1)
                            if direct_dx:
                                direct_input_gradient(dpad, tiles_wt, &dx[n0, 0, 0, 0], dxpad,
                                                      drows, dxrows, order, F, &g, &d)
                            elif input_grad:   # BLAS, as below (G == 1)
                                gemm_rowmajor(c"T", c"N", <int> K, <int> P, <int> F, <floating> 1,
                                              &w2d[0, 0], <int> K, &dout[n0, 0, 0, 0], <int> P,
                                              <floating> 0, cols, <int> P)
                                col2im_image(cols, P, &dx[n0, 0, 0, 0], &g)
                            continue
                    for i in range(count):
                        im2col_image(&x[n0 + i, 0, 0, 0], cols + i * P, ld, &g)
                    if G == 1:
                        a = &dout[n0, 0, 0, 0]
                        lda = P
                    else:
                        # dout[n0 + i] (F, P) -> (F, count*P)
                        for i in range(count):
                            for f in range(F):
                                memcpy(group_dout + f * ld + i * P, &dout[n0 + i, 0, 0, 0] + f * P,
                                       P * sizeof(floating))
                        a = group_dout
                        lda = ld
                    gemm_rowmajor(c"N", c"T", <int> F, <int> (K + 1), <int> (count * P),
                                  <floating> 1, a, <int> lda, cols, <int> ld, <floating> 1,
                                  &dw_ext_per_chunk[chunk, 0], <int> (K + 1))
                    if input_grad:
                        gemm_rowmajor(c"T", c"N", <int> K, <int> (count * P), <int> F,
                                      <floating> 1, &w2d[0, 0], <int> K, a, <int> lda,
                                      <floating> 0, cols, <int> ld)
                        for i in range(count):
                            col2im_image(cols + i * P, ld, &dx[n0 + i, 0, 0, 0], &g)
        unpin_blas(saved_blas_threads)
        free(tiles_wt)
        free(all_rows)
        free(buffers)
        free(order)


def conv2d_backward_input(const floating[:, :, :, ::1] dout, const floating[:, :, :, ::1] w,
                          floating[:, :, :, ::1] dx, Py_ssize_t sh, Py_ssize_t sw,
                          Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t G,
                          floating[:, ::1] cols_scratch, floating[:, ::1] dout_scratch,
                          int num_threads):
    """dx[n] = col2im(W^T (K, F) . dout[n] (F, P)): the lecture's g^T M_F^filter, i.e. the full
    convolution G_zero-pad * F_rot180 summed over filters. Each image is written by one thread.

    cols_scratch (threads, K*G*P): the group's column gradients; dout_scratch (threads, F*G*P)
    when G > 1, else None. float32 in the builds with tiles: the same tiles, direct path and
    bits as conv2d_backward's input gradient.
    """
    cdef Geometry g = make_geometry(dx.shape[1], dx.shape[2], dx.shape[3],
                                    w.shape[2], w.shape[3], sh, sw, ph, pw)
    cdef Direct d = make_direct(&g)
    cdef Py_ssize_t N = dx.shape[0], F = w.shape[0]
    cdef Py_ssize_t K = g.C * g.kh * g.kw, P = g.Ho * g.Wo, ld = G * P
    cdef Py_ssize_t groups = (N + G - 1) // G
    cdef Py_ssize_t group, n0, count, i, f, ldb
    cdef floating *dcols = NULL
    cdef floating *group_dout = NULL
    cdef const floating *b = NULL
    cdef float *tiles_wt = NULL    # W^T packed for the tiles
    cdef bint direct = (floating is float and direct_applies(&g, G)
                        and direct_input_gradient_pays(&g, &d))
    cdef Py_ssize_t thread_rows = F + K, thread_floats = F * d.Pd + d.image_floats
    cdef const float **all_rows = NULL
    cdef float *buffers = NULL
    cdef Py_ssize_t *order = NULL
    cdef const float **drows = NULL
    cdef float **dxrows = NULL
    cdef float *dpad = NULL
    cdef float *dxpad = NULL
    cdef bint done
    cdef int saved_blas_threads[MAX_PINNED_BLAS]
    if N == 0:
        return
    with nogil:
        if floating is float:   # as in conv2d_backward: the same tiles, order and bits
            if direct:
                all_rows = <const float **> malloc(num_threads * thread_rows * sizeof(float *))
                buffers = <float *> malloc(num_threads * thread_floats * sizeof(float))
                order = channel_fastest_taps(&g)
                if all_rows != NULL and buffers != NULL and order != NULL:
                    tiles_wt = packed_a_rows(&w[0, 0, 0, 0], order, 1, K, K, F)
                direct = tiles_wt != NULL
        pin_blas(saved_blas_threads)
        with parallel(num_threads=team_size(num_threads)):
            dcols = &cols_scratch[threadid(), 0]
            if G > 1:
                group_dout = &dout_scratch[threadid(), 0]
            if floating is float:
                if direct:
                    drows = all_rows + threadid() * thread_rows
                    dxrows = <float **> (drows + F)
                    dpad = buffers + threadid() * thread_floats
                    dxpad = dpad + F * d.Pd
            for group in prange(groups, schedule="dynamic"):
                n0 = group * G
                count = group_count(N, G, group)
                done = False
                if floating is float:
                    if direct:   # (G == 1)
                        spread_gradient(&dout[n0, 0, 0, 0], dpad, F, &g, &d)
                        direct_input_gradient(dpad, tiles_wt, &dx[n0, 0, 0, 0], dxpad, drows,
                                              dxrows, order, F, &g, &d)
                        done = True
                if done:
                    continue
                if G == 1:
                    b = &dout[n0, 0, 0, 0]
                    ldb = P
                else:
                    for i in range(count):
                        for f in range(F):
                            memcpy(group_dout + f * ld + i * P, &dout[n0 + i, 0, 0, 0] + f * P,
                                   P * sizeof(floating))
                    b = group_dout
                    ldb = ld
                gemm_rowmajor(c"T", c"N", <int> K, <int> (count * P), <int> F, <floating> 1,
                              &w[0, 0, 0, 0], <int> K, b, <int> ldb, <floating> 0, dcols, <int> ld)
                for i in range(count):
                    col2im_image(dcols + i * P, ld, &dx[n0 + i, 0, 0, 0], &g)
        unpin_blas(saved_blas_threads)
        free(tiles_wt)
        free(all_rows)
        free(buffers)
        free(order)


# ----------------------------------------------------------------------------- Winograd

include "winograd.pxi"


# ----------------------------------------------------------------------------- dense layer
#
# Dense GEMMs go through here, not through NumPy's threaded BLAS: a BLAS thread pool woken
# inside a training step keeps spinning after its GEMM, against the kernels' OpenMP threads
# (it cost MNIST at 2 threads about 40% of its images/s: docs/performance.md). Work is cut into fixed blocks (of rows or columns, independent of the
# thread count), each one single-threaded GEMM, so the bits do not depend on the threads.

def dense_forward(const floating[:, ::1] x, const floating[:, ::1] w, const floating[::1] b,
                  floating[:, ::1] out, Py_ssize_t block, int num_threads):
    """out (N, O) = x (N, I) . w^T (I, O) + b, in blocks of `block` rows of x."""
    cdef Py_ssize_t N = x.shape[0], I = x.shape[1], O = w.shape[0]
    cdef Py_ssize_t blocks = (N + block - 1) // block, blk, r0, rows, r, o
    cdef int saved_blas_threads[MAX_PINNED_BLAS]
    if N == 0:
        return
    with nogil:
        pin_blas(saved_blas_threads)
        for blk in prange(blocks, schedule="dynamic", num_threads=team_size(num_threads)):
            r0 = blk * block
            rows = min_size(block, N - r0)
            gemm_rowmajor(c"N", c"T", <int> rows, <int> O, <int> I, <floating> 1,
                          &x[r0, 0], <int> I, &w[0, 0], <int> I, <floating> 0, &out[r0, 0], <int> O)
            for r in range(r0, r0 + rows):
                for o in range(O):
                    out[r, o] += b[o]
        unpin_blas(saved_blas_threads)


def dense_backward(const floating[:, ::1] dout, const floating[:, ::1] x,
                   const floating[:, ::1] w, floating[:, ::1] dw, floating[:, ::1] dx,
                   Py_ssize_t block, int num_threads):
    """dw (O, I) = dout^T (O, N) . x (N, I) and, unless dx is None, dx (N, I) = dout (N, O) . w (O, I),
    in blocks of `block` columns of I (each block's dw and dx belong to one thread)."""
    cdef Py_ssize_t N = x.shape[0], I = x.shape[1], O = w.shape[0]
    cdef Py_ssize_t blocks = (I + block - 1) // block, blk, c0, cols
    cdef int saved_blas_threads[MAX_PINNED_BLAS]
    cdef bint input_grad = dx is not None
    if I == 0:
        return
    with nogil:
        pin_blas(saved_blas_threads)
        for blk in prange(blocks, schedule="dynamic", num_threads=team_size(num_threads)):
            c0 = blk * block
            cols = min_size(block, I - c0)
            gemm_rowmajor(c"T", c"N", <int> O, <int> cols, <int> N, <floating> 1,
                          &dout[0, 0], <int> O, &x[0, c0], <int> I, <floating> 0, &dw[0, c0], <int> I)
            if input_grad:
                gemm_rowmajor(c"N", c"N", <int> N, <int> cols, <int> O, <floating> 1,
                              &dout[0, 0], <int> O, &w[0, c0], <int> I, <floating> 0,
                              &dx[0, c0], <int> I)
        unpin_blas(saved_blas_threads)


# ----------------------------------------------------------------------------- max pooling

def maxpool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                      Py_ssize_t[:, :, :, ::1] argmax,
                      Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw):
    """out[n, c, oh, ow] = max over the window x[n, c, oh*sh : oh*sh+kh, ow*sw : ow*sw+kw];
    argmax holds the winner's flat index h*W + w inside its (H, W) plane (the first one on
    ties; a NaN wins and propagates). OpenMP over the N*C planes."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t Ho = out.shape[2], Wo = out.shape[3]
    cdef Py_ssize_t plane, oh, ow, i, j, best_index, index
    cdef floating best, value
    cdef bint greater, has_nan
    cdef Py_ssize_t mask
    cdef const floating *x_plane
    cdef floating *out_plane
    cdef Py_ssize_t *argmax_plane
    if N * C == 0:
        return
    with nogil:
        for plane in prange(N * C, schedule="guided", num_threads=team_size(_num_threads)):
            x_plane = &x[plane // C, plane % C, 0, 0]
            out_plane = &out[plane // C, plane % C, 0, 0]
            argmax_plane = &argmax[plane // C, plane % C, 0, 0]
            for oh in range(Ho):
                for ow in range(Wo):
                    best_index = (oh * sh) * W + ow * sw
                    best = x_plane[best_index]
                    has_nan = False
                    for i in range(kh):
                        for j in range(kw):
                            index = (oh * sh + i) * W + ow * sw + j
                            value = x_plane[index]
                            # selects, not branches: on real data "is it larger?" is a coin
                            # flip, and mispredicted branches cost more than the whole window
                            greater = value > best
                            mask = -<Py_ssize_t> greater
                            best_index = (index & mask) | (best_index & ~mask)
                            best = value if greater else best
                            has_nan = has_nan | (value != value)
                    if has_nan:  # rare: the window's first NaN wins
                        for i in range(kh * kw - 1, -1, -1):
                            index = (oh * sh + i // kw) * W + ow * sw + i % kw
                            if x_plane[index] != x_plane[index]:
                                best = x_plane[index]
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
        for plane in prange(N * C, schedule="guided", num_threads=team_size(_num_threads)):
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
