"""The residual block: out = ReLU(inner(x) + shortcut(x)), as ResNet's basic block.

`inner` and `shortcut` are plain lists of layers (the shortcut empty for the identity), so
whoever walks a network (parameters, init order, export) reads a block as its inner layers
then its shortcut's; `leaf_layers` does that walk. The block owns no parameters itself.

Memory: the add and the ReLU run in place on the inner output, in one threaded pass
(kernels.add_relu_; PyTorch's `out += identity; relu_(out)` takes two); where the inner branch
ends in a batch norm (ResNet's basic block), the shortcut runs first and that batch norm adds it
and applies the ReLU in the pass that normalizes (BatchNorm2D.forward's add, the same bits), and the backward masks
the gradient once, in place. Both branches' backward passes would overwrite the gradient they
are given (batch norm's and a fused conv's do); where the inner branch ends in a batch norm
(ResNet's basic block) that one writes its input gradient into a new array and leaves the
masked gradient to the shortcut, as PyTorch's batch norm allocates its input gradient; else the
inner branch gets a copy.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from convtrain.errors import ArchitectureError
from convtrain.nn import kernels
from convtrain.nn.layers import Layer, ReLU
from convtrain.nn.norm import BatchNorm2D, _BatchNorm


def _shape_text(shape) -> str:
    return "x".join(str(v) for v in shape)


class Residual(Layer):
    def __init__(self, inner: list[Layer], shortcut: list[Layer], *, name: str = "res"):
        super().__init__(name)
        if not inner:
            raise ArchitectureError(f"{name}: a residual block needs at least one layer")
        self.inner = list(inner)
        self.shortcut = list(shortcut)
        self._out = None

    @property
    def needs_input_grad(self) -> bool:
        return self._needs_input_grad

    @needs_input_grad.setter
    def needs_input_grad(self, value: bool) -> None:
        self._needs_input_grad = bool(value)
        for branch in (getattr(self, "inner", ()), getattr(self, "shortcut", ())):
            if branch:
                branch[0].needs_input_grad = bool(value)

    def output_shape(self, input_shape):
        inner = branch_shape(self.inner, input_shape)
        short = branch_shape(self.shortcut, input_shape)
        if inner != short:
            what = "its shortcut gives" if self.shortcut else "the identity shortcut gives"
            raise ArchitectureError(
                f"{self.name}: its layers give {_shape_text(inner)} from its {_shape_text(input_shape)} input and "
                f"{what} {_shape_text(short)}: the shapes can't be added")
        return inner

    def forward(self, x, train=False):
        last = self.inner[-1]
        if isinstance(last, BatchNorm2D) and not last.fused_relu:
            # the shortcut first, then the last batch norm adds it and applies the ReLU in the
            # pass that normalizes (the same bits as add_relu_ after it)
            h = x
            for layer in self.inner[:-1]:
                h = layer.forward(h, train)
            s = x
            for layer in self.shortcut:
                s = layer.forward(s, train)
            if (isinstance(s, np.ndarray) and isinstance(h, np.ndarray) and s.shape == h.shape
                    and s.dtype == last.dtype and h.ndim == 4 and h.shape[2] * h.shape[3] > 1):
                out = last.forward(h, train, add=s)
            else:
                out = self._add_relu(last.forward(h, train), s, x)
            if train:
                self._out = out
            return out
        h = x
        for layer in self.inner:
            h = layer.forward(h, train)
        s = x
        for layer in self.shortcut:
            s = layer.forward(s, train)
        out = self._add_relu(h, s, x)
        if train:
            self._out = out
        return out

    def _add_relu(self, h, s, x):
        # h becomes the output in place; not where it is also x, a view, or kept by the layer
        # that made it (a ReLU's or a nested block's output, which their backward reads)
        if (isinstance(self.inner[-1], (ReLU, Residual)) or not h.flags.c_contiguous or not h.flags.writeable
                or np.may_share_memory(h, x)):
            h = np.array(h, order="C")
        if s.dtype == h.dtype and s.shape == h.shape:
            return kernels.add_relu_(h, s)   # h = max(h + s, 0), one pass
        np.add(h, s, out=h)
        return kernels.relu_(h)

    def backward(self, dout):
        out, self._out = self._out, None
        if dout.flags.c_contiguous and dout.flags.writeable and dout.dtype == out.dtype:
            grad = kernels.relu_backward_(dout, out)  # the ReLU's mask, once, in place
        else:
            grad = np.multiply(dout, out > 0)
        last = self.inner[-1]
        if isinstance(last, _BatchNorm) and not last.fused_relu:
            dx = last.backward(grad, keep_dout=True)   # a new array; grad kept for the shortcut
            rest = self.inner[:-1]
        else:
            dx = np.array(grad)  # the inner branch's own copy (see the module docstring)
            rest = self.inner
        for layer in reversed(rest):
            dx = layer.backward(dx)
        shortcut_dx = grad
        for layer in reversed(self.shortcut):
            shortcut_dx = layer.backward(shortcut_dx)
        if not self.needs_input_grad:
            return None
        if (dx.flags.writeable and dx.flags.c_contiguous and isinstance(shortcut_dx, np.ndarray)
                and shortcut_dx.shape == dx.shape and shortcut_dx.dtype == dx.dtype):
            return kernels.add_(dx, shortcut_dx)   # one threaded pass, np.add's bits
        return np.add(dx, shortcut_dx, out=dx if dx.flags.writeable and dx.flags.c_contiguous else None)


def branch_shape(layers: list[Layer], input_shape) -> tuple:
    shape = tuple(input_shape)
    for layer in layers:
        shape = layer.output_shape(shape)
    return shape


def leaf_layers(layers: list[Layer]) -> Iterator[Layer]:
    """Every layer that computes, in order: a residual block's inner layers, then its shortcut's."""
    for layer in layers:
        if isinstance(layer, Residual):
            yield from leaf_layers(layer.inner)
            yield from leaf_layers(layer.shortcut)
        else:
            yield layer


def leaf_layers_with_input(layers: list[Layer], input_shape) -> Iterator[tuple[Layer, tuple]]:
    """(layer, its input shape per sample) for every leaf layer, as leaf_layers orders them."""
    shape = tuple(input_shape)
    for layer in layers:
        if isinstance(layer, Residual):
            yield from leaf_layers_with_input(layer.inner, shape)
            yield from leaf_layers_with_input(layer.shortcut, shape)
        else:
            yield layer, shape
        shape = layer.output_shape(shape)
