"""The lecture's worked examples, entry by entry, through convtrain.reference.

Pixel values encode their 1-based position so that entries read like the slides:
X_lm = 10*l + m (X11 = 11, X43 = 43), F_ij = 10*i + j, g_k = k. Multi-channel examples
add 100*channel.
"""

import numpy as np
import pytest

from convtrain.nn import reference as ref


def lecture_X(channels=1, size=6):
    """X (channels, 6, 6) with X_k,lm = 100*(k-1) + 10*l + m (1-based l, m, k)."""
    l, m = np.meshgrid(np.arange(1, size + 1), np.arange(1, size + 1), indexing="ij")
    return np.stack([100 * k + 10 * l + m for k in range(channels)]).astype(np.float64)


def lecture_F(channels=1):
    """F (channels, 3, 3) with F_k,ij = 100*(k-1) + 10*i + j."""
    return lecture_X(channels, size=3)


def X(l, m, k=1):
    return 100 * (k - 1) + 10 * l + m


F = X  # F_ij has the same encoding


# ----------------------------------------------------------------------------- M_X^im

def test_mx_im_single_channel_is_16_by_9_with_the_slides_rows():
    M = ref.mx_im(lecture_X()[0], (3, 3))
    assert M.shape == (16, 9)
    assert M[0].tolist() == [X(1, 1), X(1, 2), X(1, 3), X(2, 1), X(2, 2), X(2, 3),
                             X(3, 1), X(3, 2), X(3, 3)]
    assert M[1].tolist() == [X(1, 2), X(1, 3), X(1, 4), X(2, 2), X(2, 3), X(2, 4),
                             X(3, 2), X(3, 3), X(3, 4)]
    assert M[3].tolist() == [X(1, 4), X(1, 5), X(1, 6), X(2, 4), X(2, 5), X(2, 6),
                             X(3, 4), X(3, 5), X(3, 6)]
    # row 5 is S_21: the window one row down
    assert M[4].tolist() == [X(2, 1), X(2, 2), X(2, 3), X(3, 1), X(3, 2), X(3, 3),
                             X(4, 1), X(4, 2), X(4, 3)]
    assert M[15].tolist() == [X(l, m) for l in (4, 5, 6) for m in (4, 5, 6)]


def test_mx_im_every_entry_follows_the_formula():
    M = ref.mx_im(lecture_X()[0], 3)
    for l in range(1, 5):
        for m in range(1, 5):
            for i in range(1, 4):
                for j in range(1, 4):
                    assert M[(l - 1) * 4 + (m - 1), (i - 1) * 3 + (j - 1)] == X(i + l - 1, j + m - 1)


def test_mx_im_four_channels_is_16_by_36_channels_blockwise():
    Xs = lecture_X(4)
    M = ref.mx_im(Xs, 3)
    assert M.shape == (16, 36)
    for k in range(4):
        np.testing.assert_array_equal(M[:, 9 * k:9 * (k + 1)], ref.mx_im(Xs[k], 3))
    assert M[4, 9:18].tolist() == [X(2, 1, 2), X(2, 2, 2), X(2, 3, 2), X(3, 1, 2), X(3, 2, 2),
                                   X(3, 3, 2), X(4, 1, 2), X(4, 2, 2), X(4, 3, 2)]


def test_vec_S_equals_mx_im_times_vec_F_equals_correlation():
    Xs, Fs = lecture_X()[0], lecture_F()[0]
    S = ref.correlate(Xs, Fs)
    assert S.shape == (4, 4)
    # S_lm = sum_ij X_{i+l-1, j+m-1} F_ij
    assert S[1, 2] == sum(X(i + 1, j + 2) * F(i, j) for i in (1, 2, 3) for j in (1, 2, 3))
    np.testing.assert_array_equal(ref.mx_im(Xs, 3) @ Fs.reshape(-1), S.reshape(-1))


# ----------------------------------------------------------------------------- M_F^filter

def test_mf_filter_single_channel_rows_as_on_the_slides():
    Fs = lecture_F()[0]
    M = ref.mf_filter(Fs, (6, 6))
    assert M.shape == (16, 36)
    f11, f12, f13, f21, f22, f23, f31, f32, f33 = Fs.reshape(-1)
    zeros3 = [0, 0, 0]
    row1 = [f11, f12, f13] + zeros3 + [f21, f22, f23] + zeros3 + [f31, f32, f33] + zeros3 + [0] * 18
    row2 = [0, f11, f12, f13, 0, 0, 0, f21, f22, f23, 0, 0, 0, f31, f32, f33, 0, 0] + [0] * 18
    row4 = [0, 0, 0, f11, f12, f13, 0, 0, 0, f21, f22, f23, 0, 0, 0, f31, f32, f33] + [0] * 18
    row5 = [0] * 6 + [f11, f12, f13] + zeros3 + [f21, f22, f23] + zeros3 + [f31, f32, f33] + zeros3 + [0] * 12
    assert M[0].tolist() == row1
    assert M[1].tolist() == row2
    assert M[3].tolist() == row4
    assert M[4].tolist() == row5


def test_mf_filter_four_channels_is_16_by_144_channels_blockwise():
    Fs = lecture_F(4)
    M = ref.mf_filter(Fs, (4, 6, 6))
    assert M.shape == (16, 144)
    for k in range(4):
        np.testing.assert_array_equal(M[:, 36 * k:36 * (k + 1)], ref.mf_filter(Fs[k], (6, 6)))
    Xs = lecture_X(4)
    np.testing.assert_array_equal(M @ Xs.reshape(-1), ref.mx_im(Xs, 3) @ Fs.reshape(-1))


# ----------------------------------------------------------------------------- dL/dX

def test_v_equals_g_zero_pad_correlated_with_f_rot180_single_channel():
    Fs = lecture_F()[0]
    g = np.arange(1, 17, dtype=np.float64)  # g_1 .. g_16
    v = g @ ref.mf_filter(Fs, (6, 6))        # v^T = g^T M_F^filter
    G = g.reshape(4, 4)
    G_zero_pad = ref.pad(G, 2)
    assert G_zero_pad.shape == (8, 8) and G_zero_pad[2, 2] == 1 and G_zero_pad[5, 5] == 16
    np.testing.assert_array_equal(ref.rot180(Fs), [[F(3, 3), F(3, 2), F(3, 1)],
                                                   [F(2, 3), F(2, 2), F(2, 1)],
                                                   [F(1, 3), F(1, 2), F(1, 1)]])
    V = ref.correlate(G_zero_pad, ref.rot180(Fs))
    np.testing.assert_array_equal(V.reshape(-1), v)
    # the slides' expansions, v_k with 1-based k
    g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11 = g[:11]
    assert v[0] == g1 * F(1, 1)
    assert v[1] == g1 * F(1, 2) + g2 * F(1, 1)
    assert v[2] == g1 * F(1, 3) + g2 * F(1, 2) + g3 * F(1, 1)
    assert v[3] == g2 * F(1, 3) + g3 * F(1, 2) + g4 * F(1, 1)
    assert v[4] == g3 * F(1, 3) + g4 * F(1, 2)
    assert v[5] == g4 * F(1, 3)
    assert v[6] == g1 * F(2, 1) + g5 * F(1, 1)
    assert v[7] == g1 * F(2, 2) + g2 * F(2, 1) + g5 * F(1, 2) + g6 * F(1, 1)
    assert v[8] == (g1 * F(2, 3) + g2 * F(2, 2) + g3 * F(2, 1)
                    + g5 * F(1, 3) + g6 * F(1, 2) + g7 * F(1, 1))
    assert v[12] == g1 * F(3, 1) + g5 * F(2, 1) + g9 * F(1, 1)
    assert v[14] == (g1 * F(3, 3) + g2 * F(3, 2) + g3 * F(3, 1)
                     + g5 * F(2, 3) + g6 * F(2, 2) + g7 * F(2, 1)
                     + g9 * F(1, 3) + g10 * F(1, 2) + g11 * F(1, 1))


def test_v_equals_g_zero_pad_correlated_with_f_rot180_four_channels():
    Fs = lecture_F(4)
    g = np.arange(1, 17, dtype=np.float64)
    v = g @ ref.mf_filter(Fs, (4, 6, 6))
    assert v.shape == (144,)
    G_zero_pad = ref.pad(g.reshape(4, 4), 2)
    V = np.stack([ref.correlate(G_zero_pad, ref.rot180(Fs[k])) for k in range(4)])
    np.testing.assert_array_equal(V.reshape(-1), v)


def test_input_grad_through_both_forms_sums_over_filters():
    # two layers' worth: three filters of three channels, G_i = dl/dS_i
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 3, 3, 3))
    dout = rng.standard_normal((1, 3, 4, 4))
    expected = sum(dout[0, i].reshape(-1) @ ref.mf_filter(w[i], (3, 6, 6)) for i in range(3))
    np.testing.assert_allclose(ref.input_grad(dout, w, (1, 3, 6, 6)).reshape(-1), expected,
                               rtol=1e-13, atol=0)
    np.testing.assert_allclose(ref.input_grad_by_full_convolution(dout, w, (1, 3, 6, 6)),
                               ref.input_grad(dout, w, (1, 3, 6, 6)), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- dL/dF

def test_dl_dF_equals_x_correlated_with_g_single_channel():
    Xs = lecture_X()[0]
    g = np.arange(1, 17, dtype=np.float64)
    v = g @ ref.mx_im(Xs, 3)                  # (v_1 ... v_9) = g^T M_X^im
    V = ref.correlate(Xs, g.reshape(4, 4))    # X * G
    assert V.shape == (3, 3)
    np.testing.assert_array_equal(V.reshape(-1), v)
    # v_2: the column of M_X^im that is the 4x4 block of X starting at X12
    assert v[1] == sum(g[(l - 1) * 4 + (m - 1)] * X(l, m + 1) for l in range(1, 5) for m in range(1, 5))


def test_dl_dF_sums_over_input_channels():
    Xs = lecture_X(3)
    G = np.arange(1, 17, dtype=np.float64).reshape(4, 4)
    dw, db = ref.filter_grad(Xs[None], G[None, None], 3)
    for k in range(3):
        np.testing.assert_array_equal(dw[0, k], ref.correlate(Xs[k], G))
    assert db.tolist() == [G.sum()]
    np.testing.assert_array_equal(ref.filter_grad_by_correlation(Xs[None], G[None, None], 3), dw)


# ----------------------------------------------------------------------------- stride and padding

@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding",
    [
        ((2, 3, 7, 8), (2, 3, 3, 2), 1, 0),
        ((1, 2, 9, 7), (3, 2, 3, 3), (2, 3), (1, 2)),
        ((2, 1, 8, 8), (1, 1, 4, 2), 3, 2),
        ((1, 2, 5, 6), (2, 2, 5, 6), 1, 0),
    ],
)
def test_every_form_agrees_with_stride_and_padding(x_shape, w_shape, stride, padding):
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    S = ref.conv_forward(x, w, b, stride, padding)
    np.testing.assert_allclose(ref.conv_forward_by_filter_matrix(x, w, b, stride, padding), S,
                               rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(S.shape)
    dw, _ = ref.filter_grad(x, dout, w_shape[2:], stride, padding)
    np.testing.assert_allclose(ref.filter_grad_by_correlation(x, dout, w_shape[2:], stride, padding),
                               dw, rtol=1e-12, atol=1e-12)
    dx = ref.input_grad(dout, w, x_shape, stride, padding)
    np.testing.assert_allclose(ref.input_grad_by_full_convolution(dout, w, x_shape, stride, padding),
                               dx, rtol=1e-12, atol=1e-12)
    # gradients as adjoints of the linear forward map: <dout, S(x, w)> = <dw, w> = <dx, x>
    S0 = ref.conv_forward(x, w, None, stride, padding)
    assert np.isclose(np.vdot(dout, S0), np.vdot(dw, w), rtol=1e-12)
    assert np.isclose(np.vdot(dout, S0), np.vdot(dx, x), rtol=1e-12)
