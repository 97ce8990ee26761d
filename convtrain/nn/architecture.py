"""A network's architecture: the plain description (a JSON-able dict) and the layers it makes.

    {"input_shape": [C, H, W], "num_classes": K, "dtype": "float32",
     "blocks": [{"filters", "kernel_size", "stride", "padding", "pool"}, ...], "hidden": [...],
     and, only when not at their defaults: "batch_norm", "dropout", "global_pool", "pool_type"}

`describe_architecture` makes the description from the build options (one value for every
block, or one per block), `build_layers` makes the layers from it. The description is what a
model file and a checkpoint store, so a saved network is rebuilt by `build_layers` alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from convtrain.errors import ArchitectureError
from convtrain.nn.choices import GLOBAL_POOLS, POOL_TYPES
from convtrain.nn.dropout import Dropout
from convtrain.nn.layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, as_pair, fuse_conv_relu
from convtrain.nn.norm import BatchNorm1D, BatchNorm2D, fuse_norm_relu
from convtrain.nn.pooling import AvgPool2D, GlobalAvgPool


def describe_architecture(*, input_shape: Sequence[int], num_classes: int, filters: Sequence[int],
                          kernel_sizes=3, strides=1, padding=0, pool=0, hidden: Sequence[int] = (),
                          dtype: str = "float32", batch_norm: bool = False, dropout=0.0,
                          global_pool: str = "none", pool_type: str = "max") -> dict[str, Any]:
    """The architecture Network.build makes (see its docstring for the options)."""
    filters = [int(f) for f in ([filters] if isinstance(filters, (int, np.integer)) else filters)]
    if not filters:
        raise ArchitectureError("filters: expected at least one conv block")
    n = len(filters)
    kernel_sizes = _per_block("kernel_sizes", kernel_sizes, n)
    strides = _per_block("strides", strides, n)
    padding = _per_block("padding", padding, n)
    pool = _per_block("pool", pool, n)
    if len(input_shape) != 3:
        raise ArchitectureError(f"input_shape: got {tuple(input_shape)}, expected (channels, height, width)")
    blocks = [
        {"filters": f, "kernel_size": list(as_pair(k, f"conv{i + 1} kernel_size")),
         "stride": list(as_pair(s, f"conv{i + 1} stride")), "padding": _json_value(p), "pool": int(q)}
        for i, (f, k, s, p, q) in enumerate(zip(filters, kernel_sizes, strides, padding, pool))
    ]
    architecture = {
        "input_shape": [int(v) for v in input_shape],
        "num_classes": int(num_classes),
        "blocks": blocks,
        "hidden": [int(h) for h in hidden],
        "dtype": str(np.dtype(dtype)),
    }
    architecture.update(_layer_options(batch_norm, dropout, len(architecture["hidden"]), global_pool, pool_type))
    return architecture


def config_build_options(config) -> dict[str, Any]:
    """Network.build's options from a FitConfig (per-block lists broadcast to every block)."""
    return dict(filters=config.filters, kernel_sizes=config.per_block("kernel_sizes"),
                strides=config.per_block("strides"), padding=config.per_block("padding"),
                pool=config.per_block("pool"), hidden=config.hidden, dtype=config.dtype, seed=config.seed,
                batch_norm=getattr(config, "batch_norm", False), dropout=getattr(config, "dropout", 0.0),
                global_pool=getattr(config, "global_pool", "none"), pool_type=getattr(config, "pool_type", "max"))


def build_layers(arch: dict, input_shape: tuple, num_classes: int, dtype: np.dtype) -> list[Layer]:
    """The layers of `arch`, in order, with conv+ReLU and norm+ReLU fused where they follow."""
    if arch["num_classes"] < 1:
        raise ArchitectureError(f"num_classes: got {arch['num_classes']}, expected at least 1")
    if min(input_shape) < 1:
        raise ArchitectureError(f"input_shape: got {input_shape}, expected positive sizes")
    layers: list[Layer] = []
    shape = input_shape

    def add(layer: Layer):
        nonlocal shape
        shape = layer.output_shape(shape)
        layers.append(layer)

    # Keys absent from architectures written before these layers existed: their defaults.
    batch_norm = bool(arch.get("batch_norm", False))
    dropout = arch.get("dropout") or [0.0] * len(arch["hidden"])
    pool_class = {"max": MaxPool2D, "avg": AvgPool2D}[arch.get("pool_type", "max")]
    for i, block in enumerate(arch["blocks"], start=1):
        if int(block["filters"]) < 1:
            raise ArchitectureError(f"conv{i}: got {block['filters']} filters, expected at least 1")
        add(Conv2D(shape[0], block["filters"], block["kernel_size"], block["stride"], block["padding"],
                   dtype=dtype, name=f"conv{i}"))
        if batch_norm:
            add(BatchNorm2D(shape[0], dtype=dtype, name=f"bn{i}"))
        add(ReLU(f"conv{i}_relu", inplace=True))
        if block["pool"]:
            add(pool_class(block["pool"], name=f"pool{i}"))
    add(GlobalAvgPool("gap") if arch.get("global_pool", "none") == "avg" else Flatten("flatten"))
    for j, (width, p) in enumerate(zip(arch["hidden"], dropout), start=1):
        if width < 1:
            raise ArchitectureError(f"fc{j}: got {width} units, expected at least 1")
        add(Dense(shape[0], width, dtype=dtype, name=f"fc{j}"))
        if batch_norm:
            add(BatchNorm1D(shape[0], dtype=dtype, name=f"fc{j}_bn"))
        add(ReLU(f"fc{j}_relu", inplace=True))
        if p:
            add(Dropout(p, name=f"fc{j}_dropout"))
    add(Dense(shape[0], num_classes, dtype=dtype, name="fc"))
    layers[0].needs_input_grad = False
    fuse_conv_relu(layers)
    fuse_norm_relu(layers)
    return layers


def _per_block(name: str, value, num_blocks: int) -> list:
    """A scalar (or a single [h, w] pair for kernel_sizes/strides) applies to every block."""
    if isinstance(value, (str, int, np.integer)):
        return [value] * num_blocks
    values = list(value)
    if name in ("kernel_sizes", "strides") and len(values) == 2 and num_blocks == 1 \
            and all(isinstance(v, (int, np.integer)) for v in values):
        return [values]  # one block with a [h, w] pair
    if len(values) == 1:
        return values * num_blocks
    if len(values) != num_blocks:
        raise ArchitectureError(f"{name}: got {value!r}, expected 1 or {num_blocks} entries (one per conv block)")
    return values


def _json_value(value):
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---- batch norm, dropout and pooling options ---------------------------------------------


def _layer_options(batch_norm, dropout, num_hidden: int, global_pool: str, pool_type: str) -> dict:
    """The architecture entries of the optional layers; only those not at their default, so an
    architecture without them reads (and compares) as it did before they existed."""
    if global_pool not in GLOBAL_POOLS:
        raise ArchitectureError(f"global_pool: got {global_pool!r}, expected one of {', '.join(GLOBAL_POOLS)}")
    if pool_type not in POOL_TYPES:
        raise ArchitectureError(f"pool_type: got {pool_type!r}, expected one of {', '.join(POOL_TYPES)}")
    rates = [float(p) for p in _per_hidden_layer(dropout, num_hidden)]
    for p in rates:
        if not 0 <= p < 1:
            raise ArchitectureError(f"dropout: got {dropout!r}, expected probabilities in [0, 1)")
    options: dict[str, Any] = {}
    if batch_norm:
        options["batch_norm"] = True
    if any(rates):
        options["dropout"] = rates
    if global_pool != "none":
        options["global_pool"] = global_pool
    if pool_type != "max":
        options["pool_type"] = pool_type
    return options


def _per_hidden_layer(dropout, num_hidden: int) -> list:
    if isinstance(dropout, (int, float, np.floating, np.integer)):
        return [dropout] * num_hidden
    values = list(dropout)
    if len(values) == 1:
        return values * num_hidden
    if len(values) != num_hidden and any(values):
        raise ArchitectureError(
            f"dropout: got {dropout!r}, expected 1 or {num_hidden} entries (one per hidden dense layer)")
    return values if values else [0.0] * num_hidden
