"""Layers of a ConvNet, each a forward/backward pair in the cs231n style.

A layer owns `params` and `grads` (dicts of arrays keyed "weight"/"bias"), caches in
`forward(x, train=True)` what its `backward(dout) -> dx` needs, and can tell its output
shape from its input shape (per sample, no batch axis) so a Network can check an
architecture before allocating anything. Tensors are NCHW; filters are (F, C, kh, kw);
Dense weights are (out, in) as in the lecture's s = W vec(H) + b (and as in PyTorch).
"""

from __future__ import annotations

import numpy as np

from convtrain.errors import ArchitectureError
from convtrain.nn import geometry, kernels


def as_pair(value, what: str, minimum: int = 0) -> tuple[int, int]:
    """An int or an (h, w) pair of ints >= minimum as a tuple of two ints (geometry.pair, with
    the ArchitectureError a user sees as one line naming `what`)."""
    return geometry.pair(what, value, minimum, error=ArchitectureError)


def resolve_padding(padding, kernel_size: tuple[int, int], name: str) -> tuple[int, int]:
    """'valid' = no padding; 'same' = (k-1)/2 on every side (odd kernels), so stride 1 keeps the size."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        kh, kw = kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ArchitectureError(
                f"{name}: padding 'same' needs an odd kernel size, got {kh}x{kw}")
        return (kh - 1) // 2, (kw - 1) // 2
    return as_pair(padding, f"{name} padding")


class Layer:
    """Base: no parameters, identity shape."""

    def __init__(self, name: str):
        self.name = name
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        # The first layer's input is the data: no gradient is needed for it.
        self.needs_input_grad = True

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape)

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Conv2D(Layer):
    """S = X * F + b for `filters` filters of size (in_channels, kh, kw)."""

    def __init__(self, in_channels: int, filters: int, kernel_size, stride=1, padding=0,
                 *, dtype="float32", name: str = "conv", bias: bool = True):
        super().__init__(name)
        self.in_channels = int(in_channels)
        self.filters = int(filters)
        self.kernel_size = as_pair(kernel_size, f"{name} kernel_size", minimum=1)
        self.stride = as_pair(stride, f"{name} stride", minimum=1)
        self.padding = resolve_padding(padding, self.kernel_size, name)
        self.dtype = np.dtype(dtype)
        kh, kw = self.kernel_size
        self.params = {"weight": np.zeros((self.filters, self.in_channels, kh, kw), dtype=self.dtype)}
        # bias False (a conv before batch norm, whose beta is the bias): the kernels add zeros
        # and the bias gradient they compute is dropped
        self.has_bias = bool(bias)
        self._bias = np.zeros(self.filters, dtype=self.dtype)
        if self.has_bias:
            self.params["bias"] = self._bias
        self._x = None
        # Set by fuse_conv_relu: this layer applies the ReLU that follows it (forward: in the
        # kernel's epilogue; backward: the ReLU's mask on dout, inside the backward kernel).
        self.fused_relu = False
        self._out = None
        # "im2col" or "winograd" (3x3 stride 1 only): a run setting (Network.set_conv_algo),
        # not part of the architecture; both compute the same layer. algo runs the forward and
        # the input gradient; filter_algo the filter gradient (conv_algo "auto" may take it by
        # another algorithm: kernels.choose_conv_algos)
        self.algo = "im2col"
        self.filter_algo = "im2col"
        # Set by norm.fuse_conv_norm: a BatchNorm2D follows, and in training the kernels compute
        # its per-row statistics on the output while it is in cache; row_stats = (out, stats)
        # of the last training forward, until that batch norm takes it
        self.norm_stats = False
        self.row_stats = None
        # Set by norm.fuse_conv_norm: the BatchNorm2D (with a fused ReLU) whose output is this
        # layer's input; the input gradient by Winograd then takes the first pass of its backward
        self.norm_before = None

    @property
    def fan_in(self) -> int:
        kh, kw = self.kernel_size
        return self.in_channels * kh * kw

    def output_shape(self, input_shape):
        c, h, w = input_shape
        if c != self.in_channels:
            raise ArchitectureError(f"{self.name}: expects {self.in_channels} input channels, got {c}")
        try:
            return (self.filters, *geometry.output_size((h, w), self.kernel_size, self.stride, self.padding))
        except geometry.WindowDoesNotFit as error:
            (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
            raise ArchitectureError(
                f"{self.name}: a {kh}x{kw} kernel (stride {sh}x{sw}, padding {ph}x{pw}) does not fit "
                f"its {c}x{h}x{w} input: the output would be {'x'.join(map(str, error.output))}") from None

    def forward(self, x, train=False):
        stats = (np.empty((x.shape[0], self.filters, 2)) if train and self.norm_stats
                 and getattr(x, "ndim", 0) == 4 else None)
        out = kernels.conv2d_forward(x, self.params["weight"], self._bias,
                                     stride=self.stride, padding=self.padding, relu=self.fused_relu,
                                     algo=self.algo, row_stats=stats)
        self.row_stats = (out, stats) if stats is not None else None
        if train:
            self._x = x
            self._out = out if self.fused_relu else None
        return out

    def backward(self, dout):
        # One pass over the batch for both gradients (and the fused ReLU's mask, applied to
        # dout in place: dout must be ours to overwrite, as an inplace ReLU's would be).
        dout = np.require(dout, requirements=["C", "W"])
        norm_grad = None
        if self.norm_before is not None and self.needs_input_grad and self.algo == "winograd":
            norm_grad = self.norm_before.grad_sums_request(self._x)
        dx, dw, db = kernels.conv2d_backward(self._x, dout, self.params["weight"],
                                             stride=self.stride, padding=self.padding,
                                             relu_out=self._out, input_grad=self.needs_input_grad,
                                             algo=self.algo, filter_algo=self.filter_algo,
                                             norm_grad=norm_grad)
        if norm_grad is not None:
            self.norm_before.row_sums = (dx, norm_grad[3])
        self.grads = {"weight": dw, "bias": db} if self.has_bias else {"weight": dw}
        self._x = self._out = None
        return dx


class ReLU(Layer):
    """H = max(0, S). `inplace` reuses the input/gradient buffers when the caller owns them."""

    def __init__(self, name: str = "relu", inplace: bool = False):
        super().__init__(name)
        self.inplace = inplace
        # Set by fuse_conv_relu: the conv layer before this one computes it, forward and
        # backward, and this layer passes values through.
        self.fused = False
        self._out = None

    def forward(self, x, train=False):
        if self.fused:
            return x
        if self.inplace and x.flags.c_contiguous and x.flags.writeable:
            out = kernels.relu_(x)  # one threaded pass
        else:
            out = np.maximum(x, 0, out=x if self.inplace else None)
        if train:
            self._out = out
        return out

    def backward(self, dout):
        if self.fused:
            return dout
        # Where the output is 0 the gradient is 0 (the subgradient at 0 is taken as 0).
        if self.inplace and dout.flags.c_contiguous and dout.flags.writeable \
                and dout.dtype == self._out.dtype:
            dx = kernels.relu_backward_(dout, self._out)  # where(out > 0, dout, 0), one threaded pass
        else:
            # A multiply by the boolean mask is ~15x faster than masked assignment (dx[mask] = 0).
            dx = np.multiply(dout, self._out > 0, out=dout if self.inplace else None)
        self._out = None
        return dx


def fuse_conv_relu(layers: list[Layer]) -> None:
    """Let every Conv2D followed by an inplace ReLU compute that ReLU itself (in the kernels,
    while each image is in cache: no extra passes over the activations). The ReLU stays in
    the list, so the network's layers, names and export are unchanged; it passes through."""
    for conv, relu in zip(layers, layers[1:]):
        if isinstance(conv, Conv2D) and isinstance(relu, ReLU) and relu.inplace:
            conv.fused_relu = True
            relu.fused = True


class MaxPool2D(Layer):
    """Max over size x size windows moved by `stride` (default: the size, no overlap)."""

    def __init__(self, size, stride=None, *, name: str = "pool"):
        super().__init__(name)
        self.size = as_pair(size, f"{name} size", minimum=1)
        self.stride = as_pair(stride if stride is not None else size, f"{name} stride", minimum=1)
        self._argmax = None
        self._x_shape = None

    def output_shape(self, input_shape):
        c, h, w = input_shape
        try:
            return (c, *geometry.output_size((h, w), self.size, self.stride))
        except geometry.WindowDoesNotFit as error:
            (kh, kw), (sh, sw) = self.size, self.stride
            raise ArchitectureError(
                f"{self.name}: {kh}x{kw} pooling (stride {sh}x{sw}) does not fit its {c}x{h}x{w} "
                f"input: the output would be {'x'.join(map(str, error.output))}") from None

    def forward(self, x, train=False):
        out, argmax = kernels.maxpool2d_forward(x, self.size, self.stride)
        if train:
            self._argmax, self._x_shape = argmax, x.shape
        return out

    def backward(self, dout):
        dx = kernels.maxpool2d_backward(dout, self._argmax, self._x_shape)
        self._argmax = None
        return dx


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W) in C order, i.e. vec(H) as torch.nn.Flatten orders it."""

    def __init__(self, name: str = "flatten"):
        super().__init__(name)
        self._x_shape = None

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, train=False):
        if train:
            self._x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self._x_shape)


class Dense(Layer):
    """s = W x + b with W (out, in): forward computes x @ W.T for a batch x (N, in)."""

    def __init__(self, in_features: int, out_features: int, *, dtype="float32", name: str = "fc"):
        super().__init__(name)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.dtype = np.dtype(dtype)
        self.params = {
            "weight": np.zeros((self.out_features, self.in_features), dtype=self.dtype),
            "bias": np.zeros(self.out_features, dtype=self.dtype),
        }
        self._x = None

    @property
    def fan_in(self) -> int:
        return self.in_features

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.in_features,):
            raise ArchitectureError(f"{self.name}: expects {self.in_features} inputs, got {input_shape}")
        return (self.out_features,)

    def forward(self, x, train=False):
        if train:
            self._x = x
        return kernels.dense_forward(x, self.params["weight"], self.params["bias"])

    def backward(self, dout):
        dx, dw, db = kernels.dense_backward(dout, self._x, self.params["weight"],
                                            input_grad=self.needs_input_grad)
        self.grads = {"weight": dw, "bias": db}
        self._x = None
        return dx
