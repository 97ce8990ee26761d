"""How much memory a network will take, worked out from its shapes before any array exists.

A config asks for `filters = [1000000000]` or `padding = [100000]` as easily as for 16 filters;
building such a network would try to allocate terabytes (a MemoryError at best, the machine
swapping to a halt at worst). `estimate_layers` walks the layer list with plain integer arithmetic
(no numpy arrays, no overflow) and `check_fits` refuses, in one line, a network whose estimate
exceeds the memory available, before Network.build allocates its weights. A residual block
counts its layers, its shortcut and its sum; batch norm and dropout their outputs and masks.

The estimate is deliberately simple and a little generous; it is meant to catch requests that
are off by orders of magnitude, not to predict the resident size to the megabyte:
  parameters:  weights + gradients + momentum + the best-epoch copy kept for early stopping (4x)
  activations: per batch, every layer's output and the gradient of it (2x), the input batch,
               max-pooling's argmax indices (8 bytes each), each thread's im2col scratch and the
               filter gradient's per-chunk accumulators (the largest conv layer's, sized for
               Winograd's 16 values per 3x3 tap set); or, if larger, the forward pass alone over
               an evaluation batch (500 images: evaluation runs 100 at a time, so this is generous).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from convtrain.errors import ArchitectureError

_PARAMETER_COPIES = 4  # weights, gradients, momentum, best weights
_ACTIVATION_COPIES = 2  # forward output, backward gradient
_INDEX_BYTES = 8  # max-pooling's argmax (intp)
EVAL_BATCH = 500  # images per forward pass allowed for evaluation (network.EVAL_BATCH_SIZE is 100)
# The share of available memory a fit may plan to use; the rest is for the data, the Python
# process itself and everything else running on the machine.
MEMORY_SHARE = 0.5
MEMORY_LIMIT_ENV = "CONVTRAIN_MEMORY_LIMIT"  # bytes; overrides what the system reports


@dataclass(frozen=True)
class Footprint:
    parameters: int  # how many numbers the weights and biases hold
    parameter_bytes: int  # with gradients, momentum and the best-weights copy
    activation_bytes: int  # for one batch, forward and backward
    batch_size: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.activation_bytes

    def describe(self) -> str:
        return (f"{format_bytes(self.total_bytes)} ({self.parameters:,} parameters: "
                f"{format_bytes(self.parameter_bytes)} with gradients and optimizer state; "
                f"activations for a batch of {self.batch_size}: {format_bytes(self.activation_bytes)})")


def estimate(*, input_shape, num_classes: int, filters, kernel_sizes, strides, padding, pool,
             hidden, dtype: str = "float32", batch_size: int = 1, threads: int = 1,
             global_pool: str = "none") -> Footprint:
    """The footprint of the template network Network.build would make from these (per-block
    lists, one entry per conv block): estimate_layers on the list they expand to."""
    from convtrain.nn.layer_specs import expand_template

    layers = expand_template(filters=[int(f) for f in filters], kernel_sizes=list(kernel_sizes),
                             strides=list(strides), padding=list(padding), pool=[int(q) for q in pool],
                             hidden=[int(h) for h in hidden], global_pool=global_pool)
    return estimate_layers(layers, input_shape=input_shape, num_classes=num_classes, dtype=dtype,
                           batch_size=batch_size, threads=threads)


class _Tally:
    """The counts the walk adds up (numbers of values, not bytes)."""

    def __init__(self):
        self.params = self.activations = self.index_values = self.scratch = self.accumulators = 0


def estimate_layers(layers, *, input_shape, num_classes: int, dtype: str = "float32", batch_size: int = 1,
                    threads: int = 1) -> Footprint:
    """The footprint of the network a layer list (canonical, convtrain.nn.layer_specs) makes,
    its classifier included. Shapes that do not fit stop the walk: building reports those."""
    itemsize = 8 if str(dtype) == "float64" else 4
    tally = _Tally()
    shape = tuple(int(v) for v in input_shape)
    tally.activations = _size(shape)  # the input batch
    shape = _walk(layers, shape, tally)
    if shape is not None and len(shape) == 1:
        tally.params += shape[0] * int(num_classes) + int(num_classes)
        tally.activations += int(num_classes)
    batch = max(int(batch_size), 1)
    rows = max(_ACTIVATION_COPIES * batch, EVAL_BATCH)  # training (forward + backward) or evaluation
    return Footprint(
        parameters=tally.params,
        parameter_bytes=_PARAMETER_COPIES * tally.params * itemsize,
        activation_bytes=(rows * tally.activations * itemsize
                          + max(batch, EVAL_BATCH) * tally.index_values * _INDEX_BYTES
                          + (max(int(threads), 1) * tally.scratch + tally.accumulators) * itemsize),
        batch_size=batch,
    )


def _walk(layers, shape, tally: _Tally):
    """Add up `layers` from an input of `shape` (per sample); the output shape, or None where a
    shape stops fitting."""
    # the filter gradient sums a batch into at most this many partial results, F x (C*kh*kw + 1)
    # each (imported here: the kernels module loads the compiled build, which this module must not)
    from convtrain.nn.kernels import FILTER_GRAD_CHUNKS

    for spec in layers:
        kind = spec["type"]
        if kind in ("conv", "max_pool", "avg_pool", "global_avg_pool") and len(shape) != 3:
            return None
        if kind == "conv":
            channels, height, width = shape
            f = int(spec["filters"])
            (kh, kw), (sh, sw) = _pair(spec.get("kernel", 3)), _pair(spec.get("stride", 1))
            ph, pw = _padding(spec.get("padding", 0), kh, kw)
            out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
            if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0 or out_h < 1 or out_w < 1:
                return None
            tally.params += f * channels * kh * kw + (f if spec.get("bias", True) else 0)
            tally.activations += f * out_h * out_w
            tally.scratch = max(tally.scratch, (channels * kh * kw + 1) * out_h * out_w)
            taps = 16 if (kh, kw) == (3, 3) and (sh, sw) == (1, 1) else kh * kw  # Winograd's 4x4 per 3x3
            tally.accumulators = max(tally.accumulators, FILTER_GRAD_CHUNKS * f * (channels * taps + 1))
            shape = (f, out_h, out_w)
        elif kind in ("max_pool", "avg_pool"):
            (kh, kw) = _pair(spec.get("size", 2))
            sh, sw = _pair(spec.get("stride") or spec.get("size", 2))
            channels, height, width = shape
            height, width = (height - kh) // sh + 1, (width - kw) // sw + 1
            if height < 1 or width < 1:
                return None
            shape = (channels, height, width)
            tally.activations += _size(shape)
            if kind == "max_pool":
                tally.index_values += _size(shape)
        elif kind == "batch_norm":
            tally.params += 2 * shape[0]
            tally.activations += _size(shape)
        elif kind == "dropout":
            tally.activations += _size(shape)  # the mask
        elif kind == "global_avg_pool":
            shape = (shape[0],)
            tally.activations += shape[0]
        elif kind == "flatten":
            shape = (_size(shape),)
        elif kind == "dense":
            if len(shape) != 1:
                return None
            units = int(spec["units"])
            tally.params += shape[0] * units + units
            tally.activations += units
            shape = (units,)
        elif kind == "residual":
            out = _walk(spec["layers"], shape, tally)
            if out is None:
                return None
            shortcut = spec.get("shortcut", "auto")
            if shortcut == "auto":
                from convtrain.nn.layer_specs import walk_specs

                has_norm = any(s["type"] == "batch_norm" for _, s in walk_specs(spec["layers"]))
                shortcut = "identity" if out == shape else ("conv_bn" if has_norm else "conv")
            if shortcut != "identity" and len(out) == 3 and len(shape) == 3:
                # a 1x1 conv and its bias, or without bias and a batch norm
                tally.params += shape[0] * out[0] + out[0] * (2 if shortcut == "conv_bn" else 1)
                tally.activations += 2 * _size(out)
            tally.activations += _size(out)  # the sum, and its copy in the backward
            shape = out
    return shape


def _size(shape) -> int:
    total = 1
    for v in shape:
        total *= int(v)
    return total


def estimate_for_config(config, input_shape, num_classes: int) -> Footprint:
    """estimate_layers() for a FitConfig's network (its layer list) on data of this shape and class count."""
    return estimate_layers(config.network_layers(), input_shape=input_shape, num_classes=num_classes,
                           dtype=config.dtype, batch_size=config.batch_size,
                           threads=config.threads or os.cpu_count() or 1)


def estimate_for_architecture(architecture: dict) -> Footprint:
    """estimate_layers() for a saved network's architecture (a model's or checkpoint's JSON
    entry, layer list or older template form), for one image at a time. ArchitectureError,
    TypeError, KeyError or ValueError for entries of the wrong kind."""
    from convtrain.nn.architecture import layer_architecture

    arch = layer_architecture(architecture)
    return estimate_layers(arch["layers"], input_shape=arch["input_shape"], num_classes=arch["num_classes"],
                           dtype=arch["dtype"])


def check_saved_architecture(architecture: dict, stored_parameters: int, available: int | None = None) -> Footprint:
    """Refuse (ArchitectureError, one line) a saved network before it is built: one whose
    architecture needs more parameters than the file stores (a few bytes of JSON can ask for
    gigabytes of weights and batch-norm arrays), or more memory than a model may use."""
    footprint = estimate_for_architecture(architecture)
    if footprint.parameters > stored_parameters:
        raise ArchitectureError(
            f"its architecture needs {footprint.parameters:,} parameters, but the file stores "
            f"{stored_parameters:,} values: not the network its weights were saved from")
    available = available_memory() if available is None else available
    if available is not None and footprint.total_bytes > MEMORY_SHARE * available:
        raise ArchitectureError(
            f"its network needs an estimated {footprint.describe()}, more than the "
            f"{format_bytes(int(MEMORY_SHARE * available))} a model may use (half of the "
            f"{format_bytes(available)} of memory available)")
    return footprint


def check_fits(config, input_shape, num_classes: int, available: int | None = None) -> Footprint:
    """Refuse (ArchitectureError, one line) a configured network that would not fit in memory."""
    footprint = estimate_for_config(config, input_shape, num_classes)
    available = available_memory() if available is None else available
    if available is not None and footprint.total_bytes > MEMORY_SHARE * available:
        raise ArchitectureError(
            f"network: needs an estimated {footprint.describe()}, more than the "
            f"{format_bytes(int(MEMORY_SHARE * available))} a fit may use (half of the "
            f"{format_bytes(available)} of memory available); use fewer or smaller layers, "
            "less padding or a smaller batch")
    return footprint


def available_memory() -> int | None:
    """Bytes this process can still allocate: $CONVTRAIN_MEMORY_LIMIT if set, else the smaller of
    Linux's MemAvailable and the room left under a cgroup (container) limit, else the free
    physical pages the C library reports; None where none of these can be read."""
    override = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if override:
        try:
            return max(int(float(override)), 0)
        except (ValueError, OverflowError):
            raise ArchitectureError(f"{MEMORY_LIMIT_ENV}: got {override!r}, expected a number of bytes") from None
    candidates = [value for value in (_meminfo_available(), _cgroup_room()) if value is not None]
    if candidates:
        return min(candidates)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), if it has a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()), 0)
    except (OSError, ValueError):
        return None


def format_bytes(count: int | float) -> str:
    """1536 -> '1.5 KiB', 6.4e12 -> '5.8 TiB'."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # not reached


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[1])) if len(value) == 2 else (int(value[0]),) * 2
    return int(value), int(value)


def _padding(value, kh: int, kw: int) -> tuple[int, int]:
    if value == "valid":
        return 0, 0
    if value == "same":
        return (kh - 1) // 2, (kw - 1) // 2
    return _pair(value)
