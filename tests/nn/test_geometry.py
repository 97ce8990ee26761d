"""convtrain.nn.geometry: the one pair parser and output-size formula, and how the layers
report their errors through them."""

import numpy as np
import pytest

from convtrain.errors import ArchitectureError
from convtrain.nn import geometry
from convtrain.nn.layers import Conv2D, MaxPool2D


@pytest.mark.parametrize("value, expected", [(3, (3, 3)), ((2, 5), (2, 5)), ([0, 1], (0, 1)),
                                             (np.int64(4), (4, 4)), ((np.int32(1), 2), (1, 2))])
def test_pair_reads_an_int_or_an_h_w_pair(value, expected):
    parsed = geometry.pair("stride", value)
    assert parsed == expected and all(type(v) is int for v in parsed)


@pytest.mark.parametrize("value, error, words", [
    ((1, 2, 3), ValueError, r"stride must be an int or a pair \(h, w\), got \(1, 2, 3\)"),
    (0, ValueError, r"stride must be >= 1 \(an int or a pair\), got 0"),
    ((2, -1), ValueError, r"stride must be >= 1 .*\(2, -1\)"),
    (True, TypeError, "stride must be an int or a pair of ints, got True"),
    (1.0, TypeError, "stride must be an int or a pair of ints, got 1.0 of type float"),
    ("2", TypeError, "of type str"),
])
def test_pair_refuses_what_is_not_a_size_naming_the_argument(value, error, words):
    with pytest.raises(error, match=words):
        geometry.pair("stride", value, 1)
    with pytest.raises(ArchitectureError, match=words):  # one error class for a user-facing caller
        geometry.pair("stride", value, 1, error=ArchitectureError)


@pytest.mark.parametrize("size, kernel, stride, padding", [
    ((7, 8), (3, 2), (1, 1), (0, 0)), ((9, 7), (2, 4), (2, 3), (1, 2)), ((5, 5), (5, 5), (1, 1), (0, 0)),
    ((1, 13), (3, 1), (1, 4), (1, 0)),
])
def test_output_size_counts_the_window_positions(size, kernel, stride, padding):
    expected = tuple(len(range(0, n + 2 * p - k + 1, s)) for n, k, s, p in zip(size, kernel, stride, padding))
    assert geometry.output_size(size, kernel, stride, padding) == expected


def test_a_window_larger_than_the_padded_input_is_refused_with_the_would_be_size():
    with pytest.raises(geometry.WindowDoesNotFit, match=r"size \(4, 2\) is larger than the padded input \(3, 3\)") \
            as info:
        geometry.output_size((3, 3), (4, 2), (1, 1), what="size")
    assert isinstance(info.value, ValueError) and info.value.output == (0, 2)


@pytest.mark.parametrize("make, words", [
    (lambda: Conv2D(1, 2, 3, padding=-1, name="conv2"), r"conv2 padding must be >= 0"),
    (lambda: Conv2D(1, 2, 3, padding="full", name="conv2"), r"conv2 padding must be an int or a pair"),
    (lambda: Conv2D(1, 2, (3, 0), name="conv2"), r"conv2 kernel_size must be >= 1"),
    (lambda: Conv2D(1, 2, 3, stride=1.5, name="conv2"), r"conv2 stride must be an int"),
    (lambda: MaxPool2D(0, name="pool1"), r"pool1 size must be >= 1"),
    (lambda: MaxPool2D(2, stride=(1, 2, 3), name="pool1"), r"pool1 stride must be an int or a pair"),
    (lambda: MaxPool2D(3, name="pool1").output_shape((4, 2, 5)),
     r"pool1: 3x3 pooling \(stride 3x3\) does not fit its 4x2x5 input: the output would be 0x1"),
])
def test_layers_report_bad_geometry_as_one_architecture_error(make, words):
    with pytest.raises(ArchitectureError, match=words):
        make()
