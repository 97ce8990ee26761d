"""Layers one at a time: shapes, input gradients by centered differences, losses."""

import numpy as np
import pytest

from convtrain.errors import ArchitectureError
from convtrain.nn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from convtrain.nn.losses import cross_entropy_sum, softmax, softmax_cross_entropy
from tests.support.numerics import numerical_gradient, rel_norm_err

LAYERS = {
    "conv-stride-pad-nonsquare": lambda: Conv2D(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dtype="float64"),
    "relu": lambda: ReLU(),
    "relu-inplace": lambda: ReLU(inplace=True),
    "maxpool-overlapping": lambda: MaxPool2D(3, stride=2),
    "maxpool": lambda: MaxPool2D(2),
    "flatten": lambda: Flatten(),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_input_gradient_matches_centered_differences(name):
    layer = LAYERS[name]()
    rng = np.random.default_rng(0)
    for value in layer.params.values():
        value[...] = rng.standard_normal(value.shape)
    x = rng.standard_normal((2, 2, 7, 6))
    out = layer.forward(x.copy(), train=True)
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout.copy())
    assert dx.shape == x.shape
    numeric = numerical_gradient(lambda: float((layer.forward(x.copy()) * dout).sum()), x, h=1e-6)
    assert rel_norm_err(dx, numeric) < 1e-7


def test_dense_forward_and_gradients_are_the_lecture_formulas():
    layer = Dense(5, 3, dtype="float64")
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    layer.params["weight"][...], layer.params["bias"][...] = w, b
    x, dout = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    np.testing.assert_allclose(layer.forward(x, train=True), x @ w.T + b)
    dx = layer.backward(dout)
    np.testing.assert_allclose(layer.grads["weight"], dout.T @ x)
    np.testing.assert_allclose(layer.grads["bias"], dout.sum(axis=0))
    np.testing.assert_allclose(dx, dout @ w)


def test_first_layer_computes_no_input_gradient():
    layer = Conv2D(1, 2, 3, dtype="float64")
    layer.needs_input_grad = False
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 5))
    out = layer.forward(x, train=True)
    assert layer.backward(np.ones_like(out)) is None
    assert layer.grads["weight"].shape == (2, 1, 3, 3)


def test_flatten_uses_nchw_order():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    flat = Flatten().forward(x)
    assert flat.shape == (2, 12)
    np.testing.assert_array_equal(flat[1], x[1].ravel())


@pytest.mark.parametrize("padding, expected", [("valid", (4, 7, 7)), ("same", (4, 9, 9)), (2, (4, 11, 11)),
                                               ((1, 0), (4, 9, 7))])
def test_conv_output_shape_and_padding_words(padding, expected):
    assert Conv2D(3, 4, 3, padding=padding).output_shape((3, 9, 9)) == expected


def test_conv_output_shape_refuses_too_small_input():
    with pytest.raises(ArchitectureError, match=r"conv: a 5x5 kernel .* 3x4x4 input: the output would be 0x0"):
        Conv2D(3, 4, 5).output_shape((3, 4, 4))


def test_softmax_cross_entropy_is_stable_and_its_gradient_is_right():
    scores = np.array([[1000.0, 0.0, -1000.0], [3.0, 3.0, 3.0]])
    y = np.array([0, 2])
    loss, dscores = softmax_cross_entropy(scores.copy(), y)
    assert loss == pytest.approx(np.log(3) / 2)
    expected = softmax(scores.copy())
    expected[[0, 1], y] -= 1
    np.testing.assert_allclose(dscores, expected / 2)
    assert cross_entropy_sum(scores, y) == pytest.approx(np.log(3))
    assert np.isfinite(softmax(np.array([[1e4, -1e4]]))).all()


def test_softmax_cross_entropy_gradient_by_centered_differences():
    rng = np.random.default_rng(0)
    scores, y = rng.standard_normal((3, 4)), np.array([0, 3, 1])
    _, dscores = softmax_cross_entropy(scores, y)
    numeric = numerical_gradient(lambda: softmax_cross_entropy(scores, y)[0], scores, h=1e-6)
    assert rel_norm_err(dscores, numeric) < 1e-8
