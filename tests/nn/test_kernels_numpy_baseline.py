"""benchmarks/numpy_conv.py, the NumPy baseline the benchmarks compare against, is exact too."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from convtrain.nn import reference as ref

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "numpy_conv.py"


@pytest.fixture(scope="module")
def numpy_conv():
    spec = importlib.util.spec_from_file_location("numpy_conv", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding",
    [((2, 3, 7, 8), (4, 3, 3, 2), 1, 0), ((2, 2, 9, 13), (3, 2, 4, 3), (2, 3), (1, 2)),
     ((1, 2, 6, 7), (2, 2, 1, 1), 2, 1)],
)
def test_numpy_baseline_matches_the_lecture(numpy_conv, x_shape, w_shape, stride, padding):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    out = numpy_conv.conv2d_forward(x, w, b, stride, padding)
    np.testing.assert_allclose(out, ref.conv_forward(x, w, b, stride, padding), rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    dw, db = numpy_conv.conv2d_backward_filter(x, dout, w_shape[2:], stride, padding)
    dw_ref, db_ref = ref.filter_grad(x, dout, w_shape[2:], stride, padding)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, db_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(numpy_conv.conv2d_backward_input(dout, w, x_shape, stride, padding),
                               ref.input_grad(dout, w, x_shape, stride, padding), rtol=1e-12, atol=1e-12)
