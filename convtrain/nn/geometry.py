"""The geometry of a sliding window (convolution, pooling): one owner for the two rules that
the kernels, the layers and the lecture's reference all follow.

* ``pair``: a kernel size, stride or padding is an int or an ``(h, w)`` pair of ints;
* ``output_size``: a window of ``(kh, kw)`` moved by ``(sh, sw)`` over an ``(H, W)`` input
  zero-padded by ``(ph, pw)`` on every side has ``Ho = (H + 2*ph - kh) // sh + 1`` positions
  down (likewise ``Wo`` across), and none at all when the window is larger than the padded input.
"""

import operator

import numpy as np

__all__ = ["WindowDoesNotFit", "output_size", "pair"]


class WindowDoesNotFit(ValueError):
    """The window is larger than the padded input; `output` is the (Ho, Wo) the formula gives
    (<= 0 in at least one axis), for callers that explain the problem in their own words."""

    def __init__(self, message, output):
        super().__init__(message)
        self.output = output


def pair(name, value, minimum=0, error=None):
    """(h, w) from an int or an (h, w) pair of ints, each >= minimum.

    Problems raise TypeError (not integers; bools are refused too) or ValueError (not one or
    two values, below the minimum), with a message that names `name`; `error` (e.g. a layer's
    ArchitectureError) replaces both classes for callers whose users see only one kind.
    """
    # the common cases first, without allocations: the kernels parse their arguments every call
    if type(value) is int and value >= minimum:
        return value, value
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and value[0] >= minimum and value[1] >= minimum:
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise (error or ValueError)(f"{name} must be an int or a pair (h, w), got {value!r}")
        items = value
    else:
        items = (value, value)
    result = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            raise (error or TypeError)(f"{name} must be an int or a pair of ints, got {value!r}")
        try:
            result.append(operator.index(item))
        except TypeError:
            raise (error or TypeError)(
                f"{name} must be an int or a pair of ints, got {value!r} of type {type(value).__name__}"
            ) from None
    if min(result) < minimum:
        raise (error or ValueError)(f"{name} must be >= {minimum} (an int or a pair), got {value!r}")
    return tuple(result)


def output_size(input_hw, kernel, stride=(1, 1), padding=(0, 0), what="kernel_size"):
    """(Ho, Wo) = ((H + 2*ph - kh) // sh + 1, (W + 2*pw - kw) // sw + 1) for (h, w) pairs.

    Raises WindowDoesNotFit (a ValueError naming `what`) when the kernel is larger than the
    padded input in either axis, where the formula would give no output positions.
    """
    (H, W), (kh, kw), (sh, sw), (ph, pw) = input_hw, kernel, stride, padding
    output = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if H + 2 * ph < kh or W + 2 * pw < kw:
        raise WindowDoesNotFit(
            f"{what} {tuple(kernel)} is larger than the padded input {(H + 2 * ph, W + 2 * pw)} "
            f"(input {(H, W)}, padding {tuple(padding)}); expected {what} <= input + 2*padding",
            output,
        )
    return output
