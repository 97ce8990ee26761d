"""Batch normalization: BatchNorm2D (per channel, after a conv) and BatchNorm1D (per feature,
after a dense layer), as torch.nn.BatchNorm2d / BatchNorm1d define them.

Train mode normalizes with the batch's statistics (biased variance) and updates the running
ones as PyTorch does: running = (1 - momentum) * running + momentum * batch, the running
variance from the unbiased batch variance. Eval mode normalizes with the running statistics.
gamma ("weight") and beta ("bias") are learned; they are not under L2 (`regularized` False).
Both passes run in the compiled ext/_norm kernels (threaded over images for large activations,
over channels for those the caches hold: `_by_images`), the same bits for any thread count and
every build. A BatchNorm followed by an
inplace ReLU computes that ReLU itself (fuse_norm_relu), as a conv does: no separate pass over
the activations. A BatchNorm2D after a conv takes its statistics from the conv's kernels, which
compute them on their output while it is in cache (fuse_conv_norm): in training it then reads
its input once, to normalize it; one with a fused ReLU before a conv whose input gradient runs
by Winograd gets the first pass of its backward (the mask and the two sums) from that kernel
(grad_sums_request). The backward overwrites the gradient it is given with dx, as a conv's does.
"""

from __future__ import annotations

import numpy as np

from convtrain.errors import ArchitectureError
from convtrain.nn import backend, kernels
from convtrain.nn.layers import Conv2D, Layer, ReLU

_norm = None


def _kernels():
    """The compiled module, the build the conv kernels run (loaded after them: they set
    OpenMP's environment)."""
    global _norm
    if _norm is None:
        _norm = backend.compiled_module("_norm")
    return _norm


# Which layout of ext/_norm.pyx's kernels: whole images at a time (streaming through memory)
# for rows of at least IMAGE_LAYOUT_MIN_ROW values in an activation of at least
# IMAGE_LAYOUT_MIN_BYTES, else channel by channel. Measured (batch 100, float32, 1 and 2
# threads): at 6.5 MB and more (64x16x16 and larger) images won the backward by 1.4-2x and
# tied or won the forward; at 3.3-3.7 MB (128x8x8, 64x12x12), which the caches hold, channels
# won both by 1.2-1.6x.
IMAGE_LAYOUT_MIN_ROW = 64
IMAGE_LAYOUT_MIN_BYTES = 4 * 2**20


def _by_images(x3: np.ndarray) -> bool:
    return x3.shape[2] >= IMAGE_LAYOUT_MIN_ROW and x3.nbytes >= IMAGE_LAYOUT_MIN_BYTES


def _threads() -> int:
    # The conv kernels' setting: one knob (convtrain.set_num_threads) for every kernel,
    # and 1 in a process forked after the kernels ran multithreaded.
    return backend.get_num_threads()


class _BatchNorm(Layer):
    """Shared by both: x viewed as (N, C, P); statistics per c over N * P values."""

    regularized = False  # gamma and beta are not under L2 / weight decay
    ndim = 0

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype="float32", name: str = "bn"):
        super().__init__(name)
        self.num_features = int(num_features)
        if self.num_features < 1:
            raise ArchitectureError(f"{name}: got {num_features} features, expected at least 1")
        if not 0 <= momentum <= 1 or not eps > 0:
            raise ArchitectureError(f"{name}: momentum {momentum} must be in [0, 1] and eps {eps} > 0")
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.dtype = np.dtype(dtype)
        self.params = {"weight": np.ones(self.num_features, dtype=self.dtype),
                       "bias": np.zeros(self.num_features, dtype=self.dtype)}
        # Running statistics: state, not parameters (no gradient); named as PyTorch's buffers.
        self.buffers = {"running_mean": np.zeros(self.num_features, dtype=self.dtype),
                        "running_var": np.ones(self.num_features, dtype=self.dtype),
                        "num_batches_tracked": np.zeros((), dtype=np.int64)}
        self.fused_relu = False  # set by fuse_norm_relu
        self.stats_from = None  # set by fuse_conv_norm: the Conv2D before, which computes our row statistics
        # (gradient, (N, C, 2) row sums) from the conv after us (fuse_conv_norm), until backward
        self.row_sums = None
        self._cache = None

    def reset_parameters(self) -> None:
        self.params["weight"][...] = 1
        self.params["bias"][...] = 0
        self.buffers["running_mean"][...] = 0
        self.buffers["running_var"][...] = 1
        self.buffers["num_batches_tracked"][...] = 0

    def _view(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != self.ndim or x.shape[1] != self.num_features:
            raise ArchitectureError(
                f"{self.name}: expects a {self.ndim}-d input with {self.num_features} channels, got {x.shape}")
        if x.dtype != self.dtype:
            raise ArchitectureError(f"{self.name}: expects {self.dtype} input, got {x.dtype}")
        return np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)

    def forward(self, x, train=False, add=None):
        """add (with rows of more than one value, not with a fused ReLU): max(bn(x) + add, 0), a
        residual block's sum and ReLU, in the pass that normalizes (add_relu_'s bits)."""
        x3 = self._view(x)
        out = np.empty_like(x3)
        gamma, beta = self.params["weight"], self.params["bias"]
        add3 = None
        if add is not None:
            if self.fused_relu or x3.shape[2] < 2 or not isinstance(add, np.ndarray) \
                    or add.shape != x.shape or add.dtype != self.dtype:
                raise ValueError(f"{self.name}: add must be an array of the input's shape {x.shape} and "
                                 f"dtype {self.dtype} (rows of more than one value, no fused ReLU)")
            add3 = np.ascontiguousarray(add).reshape(x3.shape)
        if not train:
            inv_std = 1.0 / np.sqrt(self.buffers["running_var"].astype(np.float64) + self.eps)
            scale = gamma.astype(np.float64) * inv_std
            shift = beta - self.buffers["running_mean"].astype(np.float64) * scale
            _kernels().bn_affine_forward(x3, scale.astype(self.dtype), shift.astype(self.dtype), out,
                                         self.fused_relu, _by_images(x3), _threads())
            if add3 is not None:
                kernels.add_relu_(out, add3)
            return out.reshape(x.shape)
        c = self.num_features
        mean, var, inv_std = np.empty(c), np.empty(c), np.empty(c)
        _kernels().bn_train_forward(x3, gamma, beta, out, mean, var, inv_std, self.eps,
                                    self.fused_relu, _by_images(x3), _threads(), self._conv_row_stats(x),
                                    add3)
        self._update_running(mean, var, x3.shape[0] * x3.shape[2])
        self._cache = (x3, out if self.fused_relu else None, mean, inv_std, x.shape)
        return out.reshape(x.shape)

    def _conv_row_stats(self, x):
        """The (N, C, 2) row statistics the conv before computed on x, its output (None if x is
        anything else); taken once."""
        conv = self.stats_from
        if conv is None or conv.row_stats is None:
            return None
        (out, stats), conv.row_stats = conv.row_stats, None
        return stats if out is x else None

    def grad_sums_request(self, x):
        """For the conv whose input x is our output (after our fused ReLU): (our input, our
        output, the batch mean, an (N, C, 2) array for the row sums) for its input-gradient
        kernel to take the first pass of our backward (kernels.conv2d_backward_input's
        norm_grad); None where x is not our last training output."""
        if self._cache is None or self.ndim != 4:
            return None
        x3, out, mean, inv_std, shape = self._cache
        if out is None or x3.shape[2] < 2 or getattr(x, "base", None) is not out or x.shape != shape:
            return None
        return x3, out, mean, np.empty((x3.shape[0], x3.shape[1], 2))

    def _update_running(self, mean: np.ndarray, var: np.ndarray, count: int) -> None:
        m = self.momentum
        # The unbiased variance, as PyTorch keeps it (one value per channel: no correction).
        unbiased = var * (count / (count - 1)) if count > 1 else var
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean[...] = (1 - m) * running_mean + m * mean
        running_var[...] = (1 - m) * running_var + m * unbiased
        self.buffers["num_batches_tracked"] += 1

    def backward(self, dout, keep_dout=False):
        """dx. dout becomes dx in place: ours to overwrite, as a conv's backward takes it (a copy
        only when it is not writable, contiguous and of our dtype). keep_dout: dx is a new
        array and dout keeps its values (a residual block's gradient, which its shortcut reads
        too); not with a fused ReLU, whose mask changes dout."""
        x3, out, mean, inv_std, shape = self._cache
        self._cache = None
        row_sums, self.row_sums = self.row_sums, None
        if row_sums is not None and row_sums[0] is dout and not keep_dout:
            # the conv after us masked dout and took its sums (grad_sums_request): the second pass
            g = dout.reshape(x3.shape)
            dgamma = np.empty(self.num_features, dtype=self.dtype)
            dbeta = np.empty(self.num_features, dtype=self.dtype)
            _kernels().bn_backward_(x3, g, out, True, mean, inv_std, self.params["weight"], dgamma,
                                    dbeta, _by_images(x3), _threads(), None, row_sums[1])
            self.grads = {"weight": dgamma, "bias": dbeta}
            return g.reshape(shape)
        if keep_dout and out is not None:
            raise ValueError(f"{self.name}: keep_dout with a fused ReLU (its mask is applied to dout)")
        dx = None
        if keep_dout:
            g = np.ascontiguousarray(dout, dtype=self.dtype).reshape(x3.shape)
            if x3.shape[2] > 1:
                dx = np.empty_like(x3)
            else:   # rows of one value: the kernel works in place, on a copy
                g = g.copy()
        else:
            g = np.require(dout, dtype=self.dtype, requirements=["C", "W"]).reshape(x3.shape)
        dgamma = np.empty(self.num_features, dtype=self.dtype)
        dbeta = np.empty(self.num_features, dtype=self.dtype)
        _kernels().bn_backward_(x3, g, out if out is not None else x3, out is not None,
                                mean, inv_std, self.params["weight"], dgamma, dbeta, _by_images(x3),
                                _threads(), dx)
        self.grads = {"weight": dgamma, "bias": dbeta}
        return (g if dx is None else dx).reshape(shape)

    def describe(self) -> dict:
        return {"type": type(self).__name__.lower(), "name": self.name, "features": self.num_features,
                "eps": self.eps, "momentum": self.momentum}


class BatchNorm2D(_BatchNorm):
    """Per channel of (N, C, H, W): statistics over N * H * W values."""

    ndim = 4

    def output_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[0] != self.num_features:
            raise ArchitectureError(f"{self.name}: expects ({self.num_features}, H, W) inputs, got {input_shape}")
        return tuple(input_shape)


class BatchNorm1D(_BatchNorm):
    """Per feature of (N, F): statistics over the N values of the batch."""

    ndim = 2

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.num_features,):
            raise ArchitectureError(f"{self.name}: expects {self.num_features} inputs, got {input_shape}")
        return tuple(input_shape)


def fuse_norm_relu(layers: list[Layer]) -> None:
    """Let every batch norm followed by an inplace ReLU apply it in its own kernels (the ReLU
    stays in the list and passes values through, as after a conv: see fuse_conv_relu)."""
    for norm, relu in zip(layers, layers[1:]):
        if isinstance(norm, _BatchNorm) and isinstance(relu, ReLU) and relu.inplace:
            norm.fused_relu = True
            relu.fused = True


def fuse_conv_norm(layers: list[Layer]) -> None:
    """Let every Conv2D followed by a BatchNorm2D compute that batch norm's statistics: in
    training the conv kernels take each output row's (sum, sum of squared deviations from its
    mean) while the output is in cache (kernels.conv2d_forward's row_stats), and the batch norm
    combines them instead of reading the activations once more; the same bits as its own pass
    by images (ext/conv_row_stats.h)."""
    for conv, norm in zip(layers, layers[1:]):
        if isinstance(conv, Conv2D) and isinstance(norm, BatchNorm2D) and not conv.fused_relu:
            conv.norm_stats = True
            norm.stats_from = conv
    # and a BatchNorm2D with a fused ReLU before a Conv2D gets the first pass of its backward
    # (the ReLU's mask, sum dy and sum dy * (x - mean)) from that conv's input gradient, where
    # Winograd computes it, while each plane is in cache: the bits of its own pass by images
    for norm, relu, conv in zip(layers, layers[1:], layers[2:]):
        if (isinstance(norm, BatchNorm2D) and norm.fused_relu and isinstance(relu, ReLU) and relu.fused
                and isinstance(conv, Conv2D)):
            conv.norm_before = norm
