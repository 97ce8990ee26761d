"""Average pooling: AvgPool2D over windows, and GlobalAvgPool (one value per channel).

GlobalAvgPool lets a net end conv -> global pool -> dense: the dense layer sees C inputs, not
C*H*W. Both are cheap next to the convolutions around them (one pass over the activations),
so they are NumPy: sums taken window offset by window offset, always in the same order.
"""

from __future__ import annotations

import numpy as np

from convtrain.errors import ArchitectureError
from convtrain.nn.layers import Layer, as_pair


class AvgPool2D(Layer):
    """Mean over size x size windows moved by `stride` (default: the size), no padding,
    as torch.nn.AvgPool2d(size, stride)."""

    def __init__(self, size, stride=None, *, name: str = "pool"):
        super().__init__(name)
        self.size = as_pair(size, f"{name} size")
        self.stride = as_pair(stride if stride is not None else size, f"{name} stride")
        if min(self.size) < 1 or min(self.stride) < 1:
            raise ArchitectureError(f"{name}: pool size {self.size} and stride {self.stride} must be positive")
        self._x_shape = None

    def output_shape(self, input_shape):
        c, h, w = input_shape
        (kh, kw), (sh, sw) = self.size, self.stride
        out_h = (h - kh) // sh + 1
        out_w = (w - kw) // sw + 1
        if out_h <= 0 or out_w <= 0:
            raise ArchitectureError(
                f"{self.name}: {kh}x{kw} pooling (stride {sh}x{sw}) does not fit its {c}x{h}x{w} "
                f"input: the output would be {out_h}x{out_w}")
        return c, out_h, out_w

    def _windows(self, shape):
        """(rows, cols) slices of the input that each window offset (i, j) reads."""
        _, out_h, out_w = self.output_shape(tuple(shape[1:]))
        (kh, kw), (sh, sw) = self.size, self.stride
        for i in range(kh):
            for j in range(kw):
                yield slice(i, i + sh * (out_h - 1) + 1, sh), slice(j, j + sw * (out_w - 1) + 1, sw)

    def forward(self, x, train=False):
        c, out_h, out_w = self.output_shape(x.shape[1:])
        out = np.zeros((x.shape[0], c, out_h, out_w), dtype=x.dtype)
        for rows, cols in self._windows(x.shape):
            out += x[:, :, rows, cols]
        out *= x.dtype.type(1.0 / (self.size[0] * self.size[1]))
        if train:
            self._x_shape = x.shape
        return out

    def backward(self, dout):
        dx = np.zeros(self._x_shape, dtype=dout.dtype)
        share = dout * dout.dtype.type(1.0 / (self.size[0] * self.size[1]))
        for rows, cols in self._windows(self._x_shape):
            dx[:, :, rows, cols] += share
        return dx

    def describe(self) -> dict:
        return {"type": "avgpool", "name": self.name, "size": list(self.size), "stride": list(self.stride)}


class GlobalAvgPool(Layer):
    """(N, C, H, W) -> (N, C): the mean of each channel, as AdaptiveAvgPool2d(1) + Flatten."""

    def __init__(self, name: str = "gap"):
        super().__init__(name)
        self._x_shape = None

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ArchitectureError(f"{self.name}: expects (C, H, W) inputs, got {input_shape}")
        return (int(input_shape[0]),)

    def forward(self, x, train=False):
        if train:
            self._x_shape = x.shape
        n, c = x.shape[:2]
        return x.reshape(n, c, -1).mean(axis=2)

    def backward(self, dout):
        n, c, h, w = self._x_shape
        dx = np.empty(self._x_shape, dtype=dout.dtype)
        dx[...] = (dout * dout.dtype.type(1.0 / (h * w)))[:, :, None, None]
        return dx
