"""Numerical checks the engine's tests share: relative errors and gradients by centered
differences (each written once, so every test measures agreement the same way)."""

import numpy as np


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|: the error relative to the largest expected
    entry (the absolute error when expected is all zeros, 0 for empty arrays)."""
    expected = np.asarray(expected)
    if not expected.size:
        return 0.0
    scale = np.abs(expected).max()
    diff = np.abs(np.asarray(actual, dtype=np.float64) - expected).max()
    return diff / scale if scale else diff


def rel_norm_err(a, b):
    """||a - b|| / (||a|| + ||b||) (cs231n's gradient check): symmetric in a and b, at most 1."""
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-12)


def centered_difference(f, array, index, h=1e-5):
    """(f(x + h) - f(x - h)) / 2h for x = array[index], which f reads: the partial derivative of
    the scalar f() with respect to that one entry. The entry is restored afterwards."""
    saved = array[index]
    array[index] = saved + h
    plus = f()
    array[index] = saved - h
    minus = f()
    array[index] = saved
    return (plus - minus) / (2 * h)


def numerical_gradient(f, array, h=1e-5):
    """df/darray by centered differences, one entry at a time (array is perturbed in place)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        grad[index] = centered_difference(f, array, index, h)
    return grad


def conv_problem(x_shape, w_shape, dtype, seed=0):
    """A convolution's random operands: x, w and b of the given shapes and dtype, and the
    generator for anything else the test draws."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    return x, w, b, rng


def assert_same_bits_at_1_and_2_threads(make_net, x, y, steps=2):
    """Train a fresh `make_net()` for `steps` SGD updates on (x, y) at 1 and at 2 kernel threads:
    every parameter must come out bit for bit the same."""
    import convtrain
    from convtrain.nn.optim import SGD

    results = []
    for count in (1, 2):
        convtrain.set_num_threads(count)
        net = make_net()
        optimizer = SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(steps):
            net.loss_and_grads(x, y)
            optimizer.step(net.gradients(), 0.05)
        results.append({name: value.copy() for name, value in net.parameters().items()})
    for name in results[0]:
        assert np.array_equal(results[0][name], results[1][name]), name
