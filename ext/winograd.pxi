# Winograd F(2x2, 3x3): 3x3 stride-1 convolutions with 16 multiplies per 2x2 output tile and
# channel pair where the direct form (im2col) takes 36. Included from _conv.pyx, so every ISA
# build has it; the GEMMs go through the same single-threaded BLAS as im2col's.
#
# For one 4x4 input tile d (overlapping by 2 in both directions) and one 3x3 filter g, the 2x2
# output tile of the correlation (the lecture's *) is
#
#     Y = A^T [ (G g G^T) (.) (B^T d B) ] A            (.) elementwise, 16 products
#
#     B^T = [1  0 -1  0]     G = [ 1    0    0 ]     A^T = [1  1  1  0]
#           [0  1  1  0]         [1/2  1/2  1/2]           [0  1 -1 -1]
#           [0 -1  1  0]         [1/2 -1/2  1/2]
#           [0  1  0 -1]         [ 0    0    1 ]
#
# Summed over channels, the 16 elementwise products become 16 GEMMs, one per point p = (a, b)
# of the 4x4 transformed tile: M[p] (F, T) = U[p] (F, C) . V[p] (C, T), with U = G g G^T the
# transformed filters (once per call) and V = B^T d B the transformed input tiles (T tiles).
# The transforms use only 0, +-1 and +-1/2 (the filter transform's halves are exact in binary),
# which is why float32 stays close to im2col's error. Outputs past an odd Ho or Wo are
# computed on zero-padded tiles and not stored.
#
# The input gradient dL/dX is the full convolution of dout with the 180-degree-rotated filters,
# channels swapped: again a 3x3 stride-1 correlation, of dout (F channels) with padding 2 - p,
# whose filters are U'[p] (C, F) = transform of rot180(w[f, c]). winograd_image serves both:
# it reads its input with any signed padding (zero outside) and writes a given output size.
#
# Per image, tiles are taken a block of tile rows at a time (the block size depends on the
# shapes only: kernels.WINOGRAD_BLOCK_BYTES, the whole image on the reference nets), so the
# scratch per thread stays bounded on large images. Small images are taken `images` at a time
# (whole images, one block each): their tiles sit side by side in V and M, image g from column
# g * (tiles of one image) on, so the 16 GEMMs get columns enough to run at speed (an 8x8
# output has 20); the forward and the input gradient only (see winograd_backward_filter). Each
# group of images belongs to one thread and its sums run in a fixed order (groups depend on the
# shapes and N only): the same bits for any thread count.


cdef void winograd_filters(const floating *w, Py_ssize_t F, Py_ssize_t C, floating *U,
                           bint rotated) noexcept nogil:
    """U[p, f, c] = (G w[f, c] G^T)[p] (U is (16, F, C)); with `rotated`, U[p, c, f] =
    (G rot180(w[f, c]) G^T)[p] (U is (16, C, F)), the input gradient's filters.
    Computed in double, then rounded once to the dtype."""
    cdef Py_ssize_t f, c, i, j, a
    cdef double g[3][3]
    cdef double gg[4][3]     # G g
    cdef double u[4][4]      # G g G^T
    cdef const floating *src
    for f in range(F):
        for c in range(C):
            src = w + (f * C + c) * 9
            for i in range(3):
                for j in range(3):
                    if rotated:
                        g[i][j] = src[(2 - i) * 3 + 2 - j]
                    else:
                        g[i][j] = src[i * 3 + j]
            for j in range(3):
                gg[0][j] = g[0][j]
                gg[1][j] = 0.5 * (g[0][j] + g[1][j] + g[2][j])
                gg[2][j] = 0.5 * (g[0][j] - g[1][j] + g[2][j])
                gg[3][j] = g[2][j]
            for a in range(4):
                u[a][0] = gg[a][0]
                u[a][1] = 0.5 * (gg[a][0] + gg[a][1] + gg[a][2])
                u[a][2] = 0.5 * (gg[a][0] - gg[a][1] + gg[a][2])
                u[a][3] = gg[a][2]
            for a in range(4):
                for j in range(4):
                    if rotated:
                        U[((a * 4 + j) * C + c) * F + f] = <floating> u[a][j]
                    else:
                        U[((a * 4 + j) * F + f) * C + c] = <floating> u[a][j]


cdef struct WinogradShape:
    Py_ssize_t Cin, H, W          # the input image (Cin, H, W)
    Py_ssize_t Cout, Ho, Wo       # the output image (Cout, Ho, Wo)
    Py_ssize_t ph, pw             # input row of output row 0, negated (may be < 0: cropping)
    Py_ssize_t th, tw             # tiles: ceil(Ho / 2) x ceil(Wo / 2)
    Py_ssize_t rw                 # 2*tw + 2: the input columns a tile row reads
    Py_ssize_t block_rows         # tile rows per block
    Py_ssize_t images             # images per group (1 unless block_rows == th)
    Py_ssize_t ld                 # images * block_rows * (tw + 1): the columns of V and M


cdef WinogradShape make_winograd_shape(Py_ssize_t Cin, Py_ssize_t H, Py_ssize_t W, Py_ssize_t Cout,
                                       Py_ssize_t Ho, Py_ssize_t Wo, Py_ssize_t ph, Py_ssize_t pw,
                                       Py_ssize_t block_rows, Py_ssize_t images) noexcept nogil:
    cdef WinogradShape s
    s.Cin = Cin; s.H = H; s.W = W
    s.Cout = Cout; s.Ho = Ho; s.Wo = Wo
    s.ph = ph; s.pw = pw
    s.th = (Ho + 1) // 2
    s.tw = (Wo + 1) // 2
    s.rw = 2 * s.tw + 2
    s.block_rows = block_rows if block_rows < s.th else s.th
    s.images = images if images > 1 and s.block_rows == s.th else 1
    s.ld = s.images * s.block_rows * (s.tw + 1)
    return s


cdef extern from "winograd_transforms.h":
    void ct_winograd_columns_float(const float *r0, const float *r1, const float *r2,
                                   const float *r3, Py_ssize_t n, float *b0, float *b1, float *b2,
                                   float *b3) noexcept nogil
    void ct_winograd_columns_double(const double *r0, const double *r1, const double *r2,
                                    const double *r3, Py_ssize_t n, double *b0, double *b1,
                                    double *b2, double *b3) noexcept nogil
    void ct_winograd_row_float(const float *b, Py_ssize_t n, float *v, Py_ssize_t plane) noexcept nogil
    void ct_winograd_row_double(const double *b, Py_ssize_t n, double *v,
                                Py_ssize_t plane) noexcept nogil
    void ct_winograd_gradient_tiles_float(const float *e0, const float *e1, Py_ssize_t n,
                                          float *d, Py_ssize_t plane) noexcept nogil
    void ct_winograd_gradient_tiles_double(const double *e0, const double *e1, Py_ssize_t n,
                                           double *d, Py_ssize_t plane) noexcept nogil
    void ct_winograd_output_float(const float *m, Py_ssize_t plane, Py_ssize_t n, float bias,
                                  int relu, float *y) noexcept nogil
    void ct_winograd_output_double(const double *m, Py_ssize_t plane, Py_ssize_t n, double bias,
                                   int relu, double *y) noexcept nogil

# Tile (ty, tx) of a block is column (ty - ty0)*(tw + 1) + tx of V and M: every tile row has one
# extra tile, tx = tw, computed and never stored. With it, tile u of the block starts at column
# 2u of the block's B^T-transformed input rows laid end to end (rows of 2*tw + 2), so B's half
# of the input transform runs over the whole block in one vectorized loop; the extra tile costs
# 1/tw more GEMM work (CIFAR conv2: 1/13) and made the input transform ~3x faster than scalar
# per-tile code.

cdef inline Py_ssize_t winograd_scratch_size(const WinogradShape *s) noexcept nogil:
    """Elements of one thread's scratch: V (16, Cin, ld), M (16, Cout, ld), the B^T-transformed
    rows (4, block_rows*rw + 2), a zero-padded input plane (2*block_rows + 2, rw) and the output
    tiles (4, ld)."""
    return (16 * (s.Cin + s.Cout) * s.ld + 4 * (s.block_rows * s.rw + 2)
            + (2 * s.block_rows + 2) * s.rw + 4 * s.ld)


cdef void winograd_input_tiles(const floating *x, floating *V, floating *bt, floating *padded,
                               Py_ssize_t ty0, Py_ssize_t ty1, const WinogradShape *s) noexcept nogil:
    """V[p, c, (ty - ty0)*(tw + 1) + tx] = (B^T d B)[p] for the 4x4 tiles d of x (Cin, H, W)
    whose top-left input pixel is (2*ty - ph, 2*tx - pw), tile rows ty0 <= ty < ty1 (0 outside
    x). The input is read in place when the tiles lie inside it, else through a zero-padded copy
    of the block's rows (`padded`); bt holds the 4 B^T-transformed row sets."""
    cdef Py_ssize_t c, ty, q, r, i, lo, hi, step, rows = ty1 - ty0, rw = s.rw
    cdef Py_ssize_t n = rows * (s.tw + 1), bt_size = rows * rw + 2, plane = s.Cin * s.ld
    cdef bint in_place = (s.ph == 0 and s.pw == 0 and s.W >= rw and s.H >= 2 * s.th + 2)
    cdef const floating *src
    cdef floating *row
    # the columns k of a padded row that fall inside x: 0 <= k - pw < W
    lo = s.pw if s.pw > 0 else 0
    hi = s.W + s.pw if s.W + s.pw < rw else rw
    if hi < lo:
        hi = lo
    for i in range(4):   # the 2 values past the last row that the extra tile reads
        bt[i * bt_size + rows * rw] = 0
        bt[i * bt_size + rows * rw + 1] = 0
    for c in range(s.Cin):
        if in_place:
            src = x + c * s.H * s.W
            step = s.W
        else:
            for q in range(2 * rows + 2):
                row = padded + q * rw
                r = 2 * ty0 + q - s.ph
                if r < 0 or r >= s.H or hi == lo:
                    memset(row, 0, rw * sizeof(floating))
                    continue
                if lo > 0:
                    memset(row, 0, lo * sizeof(floating))
                memcpy(row + lo, x + (c * s.H + r) * s.W + lo - s.pw, (hi - lo) * sizeof(floating))
                if hi < rw:
                    memset(row + hi, 0, (rw - hi) * sizeof(floating))
            src = padded - 2 * ty0 * rw
            step = rw
        for ty in range(ty0, ty1):
            row = bt + (ty - ty0) * rw
            if floating is float:
                ct_winograd_columns_float(src + 2 * ty * step, src + (2 * ty + 1) * step,
                                          src + (2 * ty + 2) * step, src + (2 * ty + 3) * step, rw,
                                          row, row + bt_size, row + 2 * bt_size, row + 3 * bt_size)
            else:
                ct_winograd_columns_double(src + 2 * ty * step, src + (2 * ty + 1) * step,
                                           src + (2 * ty + 2) * step, src + (2 * ty + 3) * step, rw,
                                           row, row + bt_size, row + 2 * bt_size, row + 3 * bt_size)
        for i in range(4):
            if floating is float:
                ct_winograd_row_float(bt + i * bt_size, n, V + 4 * i * plane + c * s.ld, plane)
            else:
                ct_winograd_row_double(bt + i * bt_size, n, V + 4 * i * plane + c * s.ld, plane)


cdef struct Epilogue:
    # what the kernels also compute on each output plane (image n, channel f: row n*Cout + f)
    # while it is in cache, for the batch norm next to the conv (NULL fields: nothing)
    double *stats          # (N, Cout, 2): row_stats of the output (forward)
    const void *bn_x       # (N, Cout, P): the batch norm's input, of the kernels' dtype; the
    const void *bn_out     # output is the gradient w.r.t. its output bn_out (after its fused
    const double *bn_mean  # ReLU): masked by bn_out > 0 in place, and bn_part[row] = (sum g,
    double *bn_part        # sum g * (bn_x - bn_mean[f])) (input gradient: row_grad_totals)


cdef inline void epilogue_plane(floating *plane, Py_ssize_t P, const Epilogue *ep, Py_ssize_t row,
                                Py_ssize_t f) noexcept nogil:
    if ep.stats != NULL:
        row_stats(plane, 1, P, ep.stats + 2 * row)
    if ep.bn_x != NULL:
        row_grad_totals(<const floating *> ep.bn_x + row * P, plane,
                        <const floating *> ep.bn_out + row * P, P, ep.bn_mean[f],
                        ep.bn_part + 2 * row)


cdef void winograd_output_tiles(const floating *M, floating *out, const floating *bias,
                                bint relu, floating *y, Py_ssize_t ty0, Py_ssize_t ty1,
                                const WinogradShape *s, const Epilogue *ep,
                                Py_ssize_t image) noexcept nogil:
    """out[f, 2*ty + a, 2*tx + b] = (A^T m A)[a, b] (+ bias[f]; max(., 0) with relu) for the
    transformed products m = M[:, f, (ty - ty0)*(tw + 1) + tx], tile rows ty0 <= ty < ty1,
    inside (Ho, Wo) only. y: (4, ld), the block's output tiles of one filter. ep, unless NULL
    (the block is the whole image): its epilogue on each plane of `image`, while it is in L1."""
    cdef Py_ssize_t f, ty, tx, a, oh, tw = s.tw, n = (ty1 - ty0) * (s.tw + 1), half = s.Wo // 2
    cdef const floating *y0
    cdef const floating *y1
    cdef floating *row
    for f in range(s.Cout):
        if floating is float:
            ct_winograd_output_float(M + f * s.ld, s.Cout * s.ld, n,
                                     bias[f] if bias != NULL else 0, relu, y)
        else:
            ct_winograd_output_double(M + f * s.ld, s.Cout * s.ld, n,
                                      bias[f] if bias != NULL else 0, relu, y)
        for ty in range(ty0, ty1):
            for a in range(2):
                oh = 2 * ty + a
                if oh >= s.Ho:
                    break
                row = out + (f * s.Ho + oh) * s.Wo
                y0 = y + 2 * a * n + (ty - ty0) * (tw + 1)      # (a, 0)
                y1 = y0 + n                                     # (a, 1)
                for tx in range(half):
                    row[2 * tx] = y0[tx]
                    row[2 * tx + 1] = y1[tx]
                if s.Wo % 2:
                    row[s.Wo - 1] = y0[tw - 1]
        if ep != NULL:
            epilogue_plane(out + f * s.Ho * s.Wo, s.Ho * s.Wo, ep, image * s.Cout + f, f)


cdef void winograd_image(const floating *x, const floating *U, const floating *bias, bint relu,
                         floating *out, Py_ssize_t count, floating *scratch,
                         const WinogradShape *s, const Epilogue *ep, Py_ssize_t n0) noexcept nogil:
    """out (Cout, Ho, Wo) = the 3x3 stride-1 correlation of x (Cin, H, W) with the filters
    whose transforms are U (16, Cout, Cin), input row/column 0 of the output at -ph/-pw; for
    `count` consecutive images (at most s.images) at once, images n0, n0 + 1, ... of the batch.
    ep, unless NULL: the epilogue on each output plane, while the images are in cache."""
    cdef Py_ssize_t block, ty0, ty1, p, nb, i
    cdef Py_ssize_t in_size = s.Cin * s.H * s.W, out_size = s.Cout * s.Ho * s.Wo
    cdef floating *V = scratch
    cdef floating *M = V + 16 * s.Cin * s.ld
    cdef floating *bt = M + 16 * s.Cout * s.ld
    cdef floating *padded = bt + 4 * (s.block_rows * s.rw + 2)
    cdef floating *y = padded + (2 * s.block_rows + 2) * s.rw
    cdef bint whole = s.block_rows >= s.th   # one block: each plane is whole when written
    for block in range((s.th + s.block_rows - 1) // s.block_rows):
        ty0 = block * s.block_rows
        ty1 = ty0 + s.block_rows if ty0 + s.block_rows < s.th else s.th
        nb = (ty1 - ty0) * (s.tw + 1)
        for i in range(count):
            winograd_input_tiles(x + i * in_size, V + i * nb, bt, padded, ty0, ty1, s)
        for p in range(16):
            gemm_rowmajor(c"N", c"N", <int> s.Cout, <int> (count * nb), <int> s.Cin, <floating> 1,
                          U + p * s.Cout * s.Cin, <int> s.Cin, V + p * s.Cin * s.ld, <int> s.ld,
                          <floating> 0, M + p * s.Cout * s.ld, <int> s.ld)
        for i in range(count):
            winograd_output_tiles(M + i * nb, out + i * out_size, bias, relu, y, ty0, ty1, s,
                                  ep if whole else NULL, n0 + i)
    if ep != NULL and not whole:
        for i in range(count):
            for p in range(s.Cout):
                epilogue_plane(out + i * out_size + p * s.Ho * s.Wo, s.Ho * s.Wo, ep,
                               (n0 + i) * s.Cout + p, p)


cdef void winograd_batch(const floating *x, const floating *U, const floating *bias, bint relu,
                         floating *out, Py_ssize_t N, floating *scratch,
                         const WinogradShape *s, int num_threads, const Epilogue *ep) noexcept nogil:
    """winograd_image for each group of s.images images, OpenMP over the groups (dynamic: the
    machine may be shared), each thread with its own scratch and a single-threaded BLAS."""
    cdef Py_ssize_t group, n, in_size = s.Cin * s.H * s.W, out_size = s.Cout * s.Ho * s.Wo
    cdef Py_ssize_t per_thread = winograd_scratch_size(s), groups = (N + s.images - 1) // s.images
    cdef int saved_blas_threads[MAX_PINNED_BLAS]
    pin_blas(saved_blas_threads)
    with parallel(num_threads=team_size(num_threads)):
        for group in prange(groups, schedule="dynamic"):
            n = group * s.images
            winograd_image(x + n * in_size, U, bias, relu, out + n * out_size,
                           s.images if n + s.images <= N else N - n,
                           scratch + threadid() * per_thread, s,
                           ep, n)
    unpin_blas(saved_blas_threads)


def winograd_scratch_elements(Py_ssize_t Cin, Py_ssize_t Cout, Py_ssize_t Ho, Py_ssize_t Wo,
                              Py_ssize_t block_rows, Py_ssize_t images=1):
    """Elements of one thread's scratch for winograd_forward, winograd_backward_input and
    winograd_backward_filter with these channels (in, out), output size, tile rows per block
    and images per group (the filter gradient: the forward's channels and output)."""
    cdef WinogradShape s = make_winograd_shape(Cin, 0, 0, Cout, Ho, Wo, 0, 0, block_rows, images)
    return winograd_scratch_size(&s)


def winograd_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                     const floating[::1] b, floating[:, :, :, ::1] out, Py_ssize_t ph,
                     Py_ssize_t pw, Py_ssize_t block_rows, floating[::1] transformed_filters,
                     floating[:, ::1] scratch, int num_threads, bint relu=False,
                     Py_ssize_t images=1, double[:, :, ::1] stats=None):
    """out (N, F, Ho, Wo) = x * w + b (3x3, stride 1, padding (ph, pw)) by Winograd F(2x2, 3x3);
    max(., 0) with relu. b may be None. transformed_filters: 16*F*C elements; scratch (threads,
    winograd_scratch_elements(C, F, Ho, Wo, block_rows, images)); `images` per group (whole
    images only: 1 where block_rows does not cover the image). stats (N, F, 2), unless None:
    the output rows' batch-norm statistics (see conv2d_forward)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], F = w.shape[0]
    cdef WinogradShape s = make_winograd_shape(C, x.shape[2], x.shape[3], F, out.shape[2],
                                               out.shape[3], ph, pw, block_rows, images)
    cdef const floating *bias = &b[0] if b is not None else NULL
    cdef Epilogue ep
    memset(&ep, 0, sizeof(Epilogue))
    if stats is not None and N > 0:
        ep.stats = &stats[0, 0, 0]
    if N == 0:
        return
    with nogil:
        winograd_filters(&w[0, 0, 0, 0], F, C, &transformed_filters[0], False)
        winograd_batch(&x[0, 0, 0, 0], &transformed_filters[0], bias, relu, &out[0, 0, 0, 0], N,
                       &scratch[0, 0], &s, num_threads, &ep if ep.stats != NULL else NULL)


def winograd_backward_input(const floating[:, :, :, ::1] dout, const floating[:, :, :, ::1] w,
                            floating[:, :, :, ::1] dx, Py_ssize_t ph, Py_ssize_t pw,
                            Py_ssize_t block_rows, floating[::1] transformed_filters,
                            floating[:, ::1] scratch, int num_threads, Py_ssize_t images=1,
                            const floating[:, :, ::1] bn_x=None,
                            const floating[:, :, ::1] bn_out=None,
                            const double[::1] bn_mean=None, double[:, :, ::1] bn_part=None):
    """dx (N, C, H, W) = the full convolution of dout (N, F, Ho, Wo) with the rotated filters of
    w (F, C, 3, 3) (the gradient of a 3x3 stride-1 layer with padding (ph, pw)): the correlation
    of dout, padded by 2 - ph, 2 - pw, with rot180(w) channels swapped, by Winograd F(2x2, 3x3).
    scratch (threads, winograd_scratch_elements(F, C, H, W, block_rows, images)).
    bn_x, bn_out (N, C, H*W), bn_mean (C,), bn_part (N, C, 2), unless None: dx is the gradient
    of a batch norm's output after its fused ReLU (bn_x its input, bn_out its output): each
    plane of dx is masked by bn_out > 0 in place and its sums taken for the batch norm's
    backward while in cache (Epilogue)."""
    cdef Py_ssize_t N = dout.shape[0], F = w.shape[0], C = w.shape[1]
    cdef WinogradShape s = make_winograd_shape(F, dout.shape[2], dout.shape[3], C, dx.shape[2],
                                               dx.shape[3], 2 - ph, 2 - pw, block_rows, images)
    cdef Epilogue ep
    if N == 0:
        return
    memset(&ep, 0, sizeof(Epilogue))
    if bn_x is not None:
        ep.bn_x = &bn_x[0, 0, 0]
        ep.bn_out = &bn_out[0, 0, 0]
        ep.bn_mean = &bn_mean[0]
        ep.bn_part = &bn_part[0, 0, 0]
    with nogil:
        winograd_filters(&w[0, 0, 0, 0], F, C, &transformed_filters[0], True)
        winograd_batch(&dout[0, 0, 0, 0], &transformed_filters[0], NULL, False, &dx[0, 0, 0, 0],
                       N, &scratch[0, 0], &s, num_threads, &ep if ep.bn_x != NULL else NULL)


# ----------------------------------------------------------------------------- filter gradient
#
# dL/dU[p] (F, C) = sum over images and tiles of dM[p] (F, tiles) . V[p]^T (tiles, C), with
# dM = A dY A^T the transformed 2x2 output-gradient tiles (0 past Ho, Wo and in the extra tile
# column), V the forward's input tiles; then dL/dw[f, c] = G^T dL/dU[:, f, c] G. The images are
# cut into chunks (a function of N only), each summed by one thread into its own dL/dU, and the
# chunks added in order afterwards: the same bits for any thread count.

cdef void winograd_gradient_tiles(const floating *dout, floating *D, floating *db, floating *e,
                                  Py_ssize_t ty0, Py_ssize_t ty1,
                                  const WinogradShape *s) noexcept nogil:
    """D[p, f, (ty - ty0)*(tw + 1) + tx] = (A g A^T)[p] for the 2x2 tiles g of dout (Cout, Ho,
    Wo) at (2*ty, 2*tx), tile rows ty0 <= ty < ty1; db[f] += the sum of those tiles (point
    (1, 1) of A g A^T is the tile's sum). e: (2, rows * 2*(tw + 1)) for the tile rows' output
    rows, zero-padded to 2*(tw + 1) columns."""
    cdef Py_ssize_t f, ty, a, oh, u, rows = ty1 - ty0, width = 2 * (s.tw + 1)
    cdef Py_ssize_t n = rows * (s.tw + 1), half = rows * width
    cdef floating *row
    cdef const floating *sums
    cdef floating total
    for f in range(s.Cout):
        for ty in range(ty0, ty1):
            for a in range(2):
                oh = 2 * ty + a
                row = e + a * half + (ty - ty0) * width
                if oh >= s.Ho:
                    memset(row, 0, width * sizeof(floating))
                    continue
                memcpy(row, dout + (f * s.Ho + oh) * s.Wo, s.Wo * sizeof(floating))
                memset(row + s.Wo, 0, (width - s.Wo) * sizeof(floating))
        if floating is float:
            ct_winograd_gradient_tiles_float(e, e + half, n, D + f * s.ld, s.Cout * s.ld)
        else:
            ct_winograd_gradient_tiles_double(e, e + half, n, D + f * s.ld, s.Cout * s.ld)
        sums = D + 5 * s.Cout * s.ld + f * s.ld
        total = 0
        for u in range(n):
            total += sums[u]
        db[f] += total


cdef void winograd_filter_gradient_image(const floating *x, const floating *dout, floating *dU,
                                         floating *scratch, const WinogradShape *s) noexcept nogil:
    """dU (16, Cout, Cin) += sum over the tiles of one image of dM[p] . V[p]^T, and
    dU[16*Cout*Cin + f] += the sum of dout[f] (the bias gradient)."""
    cdef Py_ssize_t block, ty0, ty1, p, nb
    cdef floating *V = scratch
    cdef floating *D = V + 16 * s.Cin * s.ld
    cdef floating *bt = D + 16 * s.Cout * s.ld
    cdef floating *padded = bt + 4 * (s.block_rows * s.rw + 2)
    cdef floating *e = padded + (2 * s.block_rows + 2) * s.rw
    for block in range((s.th + s.block_rows - 1) // s.block_rows):
        ty0 = block * s.block_rows
        ty1 = ty0 + s.block_rows if ty0 + s.block_rows < s.th else s.th
        nb = (ty1 - ty0) * (s.tw + 1)
        winograd_input_tiles(x, V, bt, padded, ty0, ty1, s)
        winograd_gradient_tiles(dout, D, dU + 16 * s.Cout * s.Cin, e, ty0, ty1, s)
        for p in range(16):
            gemm_rowmajor(c"N", c"T", <int> s.Cout, <int> s.Cin, <int> nb, <floating> 1,
                          D + p * s.Cout * s.ld, <int> s.ld, V + p * s.Cin * s.ld, <int> s.ld,
                          <floating> 1, dU + p * s.Cout * s.Cin, <int> s.Cin)


cdef void winograd_filters_back(const floating *dU, Py_ssize_t F, Py_ssize_t C,
                                floating *dw) noexcept nogil:
    """dw[f, c] (3x3) = G^T dU[:, f, c] G, computed in double (dU (16, F, C))."""
    cdef Py_ssize_t f, c, a, j
    cdef double u[4][4]
    cdef double t[3][4]     # G^T u
    for f in range(F):
        for c in range(C):
            for a in range(4):
                for j in range(4):
                    u[a][j] = dU[((a * 4 + j) * F + f) * C + c]
            for j in range(4):
                t[0][j] = u[0][j] + 0.5 * (u[1][j] + u[2][j])
                t[1][j] = 0.5 * (u[1][j] - u[2][j])
                t[2][j] = 0.5 * (u[1][j] + u[2][j]) + u[3][j]
            for a in range(3):
                dw[(f * C + c) * 9 + a * 3] = <floating> (t[a][0] + 0.5 * (t[a][1] + t[a][2]))
                dw[(f * C + c) * 9 + a * 3 + 1] = <floating> (0.5 * (t[a][1] - t[a][2]))
                dw[(f * C + c) * 9 + a * 3 + 2] = <floating> (0.5 * (t[a][1] + t[a][2]) + t[a][3])


def winograd_backward_filter(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] dout,
                             floating[:, :, :, ::1] dw, floating[::1] db, Py_ssize_t ph,
                             Py_ssize_t pw, Py_ssize_t block_rows, floating[:, ::1] dU_per_chunk,
                             floating[:, ::1] scratch, int num_threads):
    """dw (F, C, 3, 3) = sum_n x[n] * dout[n] (the lecture's X * G) and db (F,) = the sums of
    dout over images and pixels, for a 3x3 stride-1 layer with padding (ph, pw), by Winograd
    F(2x2, 3x3). dU_per_chunk (chunks, 16*F*C + F) must be zero on entry; scratch (threads,
    winograd_scratch_elements(C, F, Ho, Wo, block_rows)), one image at a time: in groups, as
    the forward takes them, OpenBLAS's (F x C) += (F x k) . (C x k)^T ran up to 2.4x slower at
    some k (ResNet-8's res3.conv2 in groups of 4: 4.9 -> 12 ms)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], F = dout.shape[1]
    cdef Py_ssize_t chunks = dU_per_chunk.shape[0], chunk, n, k, size = 16 * F * C + F
    cdef WinogradShape s = make_winograd_shape(C, x.shape[2], x.shape[3], F, dout.shape[2],
                                               dout.shape[3], ph, pw, block_rows, 1)
    cdef Py_ssize_t per_thread = winograd_scratch_size(&s)
    cdef Py_ssize_t in_size = C * s.H * s.W, out_size = F * s.Ho * s.Wo
    cdef int saved_blas_threads[MAX_PINNED_BLAS]
    if N == 0:
        return
    with nogil:
        pin_blas(saved_blas_threads)
        with parallel(num_threads=team_size(num_threads)):
            for chunk in prange(chunks, schedule="dynamic"):
                for n in range(chunk * N // chunks, (chunk + 1) * N // chunks):
                    winograd_filter_gradient_image(&x[0, 0, 0, 0] + n * in_size,
                                                   &dout[0, 0, 0, 0] + n * out_size,
                                                   &dU_per_chunk[chunk, 0],
                                                   &scratch[0, 0] + threadid() * per_thread, &s)
        unpin_blas(saved_blas_threads)
        for chunk in range(1, chunks):   # in order: the same bits for any thread count
            for k in range(size):
                dU_per_chunk[0, k] += dU_per_chunk[chunk, k]
        winograd_filters_back(&dU_per_chunk[0, 0], F, C, &dw[0, 0, 0, 0])
        memcpy(&db[0], &dU_per_chunk[0, 16 * F * C], F * sizeof(floating))
