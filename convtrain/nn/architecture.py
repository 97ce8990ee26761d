"""A network's architecture: the plain description (a JSON-able dict) and the layers it makes.

    {"input_shape": [C, H, W], "num_classes": K, "dtype": "float32", "layers": [...specs...]}

"layers" is the canonical layer list (convtrain.nn.layer_specs); the network adds the
classifier, dense(K) named "fc", after it. `describe_architecture` makes the description from
the template options (one value for every block, or one per block) by expanding them into
that list, so a template network and the same list written out are the same description.
`build_layers` makes the layers. The description is what a model file and a checkpoint
store, so a saved network is rebuilt by `build_layers` alone; `layer_architecture` reads the
template description files written before the layer list (with "blocks" and "hidden").
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from convtrain.errors import ArchitectureError, ConfigError
from convtrain.nn.choices import GLOBAL_POOLS, POOL_TYPES
from convtrain.nn.dropout import Dropout
from convtrain.nn.layer_specs import CLASSIFIER, expand_template, layer_names, normalize_layers
from convtrain.nn.layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, as_pair, fuse_conv_relu
from convtrain.nn.norm import BatchNorm1D, BatchNorm2D, fuse_conv_norm, fuse_norm_relu
from convtrain.nn.pooling import AvgPool2D, GlobalAvgPool
from convtrain.nn.residual import Residual, branch_shape, leaf_layers, leaf_layers_with_input


def describe_architecture(*, input_shape: Sequence[int], num_classes: int, filters: Sequence[int] = (),
                          kernel_sizes=3, strides=1, padding=0, pool=0, hidden: Sequence[int] = (),
                          dtype: str = "float32", batch_norm: bool = False, dropout=0.0,
                          global_pool: str = "none", pool_type: str = "max",
                          layers: Sequence | None = None) -> dict[str, Any]:
    """The architecture Network.build makes: from `layers` (a layer list) when given, else from
    the template options (see Network.build's docstring)."""
    if len(input_shape) != 3:
        raise ArchitectureError(f"input_shape: got {tuple(input_shape)}, expected (channels, height, width)")
    if layers:
        specs = normalize_layers(layers)
    else:
        specs = template_layers(filters=filters, kernel_sizes=kernel_sizes, strides=strides, padding=padding,
                                 pool=pool, hidden=hidden, batch_norm=batch_norm, dropout=dropout,
                                 global_pool=global_pool, pool_type=pool_type)
    return {"input_shape": [int(v) for v in input_shape], "num_classes": int(num_classes),
            "dtype": str(np.dtype(dtype)), "layers": specs}


def template_layers(*, filters, kernel_sizes, strides, padding, pool, hidden, batch_norm, dropout,
                    global_pool, pool_type) -> list[dict]:
    """The layer list of the template options, checked as Network.build checks them (one value
    for every block or one per block; dropout one rate, or one per hidden layer)."""
    filters = [int(f) for f in ([filters] if isinstance(filters, (int, np.integer)) else filters)]
    if not filters:
        raise ArchitectureError("filters: expected at least one conv block")
    n = len(filters)
    for i, f in enumerate(filters, start=1):
        if f < 1:
            raise ArchitectureError(f"conv{i}: got {f} filters, expected at least 1")
    for j, width in enumerate(hidden, start=1):
        if int(width) < 1:
            raise ArchitectureError(f"fc{j}: got {width} units, expected at least 1")
    kernels = [list(as_pair(k, f"conv{i + 1} kernel_size", 1)) for i, k in
               enumerate(_per_block("kernel_sizes", kernel_sizes, n))]
    stride_pairs = [list(as_pair(s, f"conv{i + 1} stride", 1)) for i, s in
                    enumerate(_per_block("strides", strides, n))]
    options = _layer_options(batch_norm, dropout, len(hidden), global_pool, pool_type)
    return expand_template(filters=filters, kernel_sizes=kernels, strides=stride_pairs,
                           padding=[_json_value(p) for p in _per_block("padding", padding, n)],
                           pool=[int(q) for q in _per_block("pool", pool, n)], hidden=[int(h) for h in hidden],
                           batch_norm=bool(batch_norm), dropout=options.get("dropout", []),
                           global_pool=global_pool, pool_type=pool_type)


class Architecture(dict):
    """A description in the layer-list form that compares equal to any description of the same
    network: a checkpoint written before the layer list (a template description) is still the
    network a config builds now, and resumes."""

    __hash__ = None

    def __eq__(self, other):
        if not isinstance(other, dict):
            return NotImplemented
        try:
            return dict.__eq__(self, layer_architecture(other))
        except (ConfigError, KeyError, TypeError, ValueError):
            return False

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal


def network_architecture(architecture, *, input_shape=None, num_classes=None, dtype="float32") -> Architecture:
    """A Network's description from a description (any form) or a layer list, which needs the
    input shape and class count beside it."""
    if not isinstance(architecture, dict):
        if input_shape is None or num_classes is None:
            raise ArchitectureError("a layer list needs input_shape and num_classes")
        architecture = describe_architecture(input_shape=input_shape, num_classes=num_classes, dtype=dtype,
                                             layers=architecture)
    return layer_architecture(architecture)


def assign_conv_algos(layers: list[Layer], input_shape: tuple, algo: str) -> dict[str, str]:
    """Set each conv layer's algorithms for `algo` (kernels.choose_conv_algos decides per layer
    and pass, from its shapes) and return {layer name: conv_algo_name(layer)}."""
    from convtrain.nn import kernels

    for layer, shape in leaf_layers_with_input(layers, input_shape):
        if isinstance(layer, Conv2D):
            out = layer.output_shape(shape)
            forward, layer.filter_algo, layer.algo = kernels.choose_conv_algos(
                algo, layer.in_channels, layer.filters, layer.kernel_size, layer.stride, out[1:])
            assert forward == layer.algo   # one algorithm for the forward and the input gradient
    return {layer.name: conv_algo_name(layer)
            for layer, _ in leaf_layers_with_input(layers, input_shape) if isinstance(layer, Conv2D)}


def conv_algo_name(conv: Conv2D) -> str:
    """The algorithm a conv layer computes with: "im2col" or "winograd" when one runs all its
    passes, "winograd, im2col filter gradient" when conv_algo "auto" took that pass apart."""
    if conv.filter_algo == conv.algo:
        return conv.algo
    return f"{conv.algo}, {conv.filter_algo} filter gradient"


def layer_architecture(arch: dict) -> Architecture:
    """`arch` in the layer-list form; a template description (from files written before the
    layer list: "blocks", "hidden", ...) becomes the list it always meant."""
    if not isinstance(arch, dict):
        raise ArchitectureError(f"architecture: expected an object, got {arch!r:.80}")
    if "layers" in arch:
        return Architecture(input_shape=list(arch["input_shape"]), num_classes=int(arch["num_classes"]),
                            dtype=str(arch["dtype"]), layers=normalize_layers(arch["layers"]))
    blocks = arch["blocks"]
    return layer_architecture(describe_architecture(
        input_shape=arch["input_shape"], num_classes=arch["num_classes"], dtype=arch["dtype"],
        filters=[b["filters"] for b in blocks], kernel_sizes=[b["kernel_size"] for b in blocks],
        strides=[b["stride"] for b in blocks], padding=[b["padding"] for b in blocks],
        pool=[b["pool"] for b in blocks], hidden=arch["hidden"], batch_norm=arch.get("batch_norm", False),
        dropout=arch.get("dropout") or 0.0, global_pool=arch.get("global_pool", "none"),
        pool_type=arch.get("pool_type", "max")))


def config_build_options(config) -> dict[str, Any]:
    """Network.build's options from a FitConfig: its layer list (the template options expanded)."""
    return dict(layers=config.network_layers(), dtype=config.dtype, seed=config.seed)


def build_layers(arch: dict, input_shape: tuple, num_classes: int, dtype: np.dtype) -> list[Layer]:
    """The layers of `arch` (layer-list form), in order, then the classifier; conv+ReLU and
    norm+ReLU fused where they follow each other in one list."""
    if arch["num_classes"] < 1:
        raise ArchitectureError(f"num_classes: got {arch['num_classes']}, expected at least 1")
    if min(input_shape) < 1:
        raise ArchitectureError(f"input_shape: got {input_shape}, expected positive sizes")
    layers, shape = _build_list(arch["layers"], tuple(input_shape), dtype, "")
    if len(shape) != 1:
        raise ArchitectureError(f"{layers[-1].name}: the layer list ends with a {'x'.join(map(str, shape))} "
                                "output; end it with flatten or global_avg_pool (the classifier is dense)")
    layers.append(Dense(shape[0], num_classes, dtype=dtype, name=CLASSIFIER))
    layers[0].needs_input_grad = False
    return layers


def _build_list(specs: list[dict], shape: tuple, dtype, prefix: str) -> tuple[list[Layer], tuple]:
    layers: list[Layer] = []
    for index, (name, spec) in enumerate(zip(layer_names(specs, prefix), specs)):
        layer = _make_layer(spec, name, shape, dtype, first=index == 0)
        shape = layer.output_shape(shape)
        layers.append(layer)
    fuse_conv_relu(layers)
    fuse_norm_relu(layers)
    fuse_conv_norm(layers)
    return layers, shape


def _make_layer(spec: dict, name: str, shape: tuple, dtype, first: bool) -> Layer:
    kind = spec["type"]
    if kind in ("conv", "max_pool", "avg_pool", "global_avg_pool", "batch_norm") and len(shape) != 3 \
            and not (kind == "batch_norm" and len(shape) == 1):
        raise ArchitectureError(f"{name}: a {kind} layer needs a CxHxW input, got {'x'.join(map(str, shape))}")
    if kind == "conv":
        return Conv2D(shape[0], spec["filters"], spec.get("kernel", 3), spec.get("stride", 1), spec.get("padding", 0),
                      dtype=dtype, name=name, bias=spec.get("bias", True))
    if kind == "batch_norm":
        return (BatchNorm2D if len(shape) == 3 else BatchNorm1D)(shape[0], dtype=dtype, name=name)
    if kind == "relu":
        # in place, except on a list's input: the data, or a block's input its shortcut reads
        return ReLU(name, inplace=not first)
    if kind in ("max_pool", "avg_pool"):
        pool_class = MaxPool2D if kind == "max_pool" else AvgPool2D
        return pool_class(spec.get("size", 2), spec.get("stride"), name=name)
    if kind == "global_avg_pool":
        return GlobalAvgPool(name)
    if kind == "flatten":
        return Flatten(name)
    if kind == "dense":
        if len(shape) != 1:
            raise ArchitectureError(f"{name}: a dense layer needs one value per feature, got a "
                                    f"{'x'.join(map(str, shape))} input; put flatten or global_avg_pool before it")
        return Dense(shape[0], spec["units"], dtype=dtype, name=name)
    if kind == "dropout":
        return Dropout(spec["p"], name=name)
    if kind == "residual":
        return _make_residual(spec, name, shape, dtype)
    raise ArchitectureError(f"{name}: unknown layer type {kind!r}")


def _make_residual(spec: dict, name: str, shape: tuple, dtype) -> Residual:
    inner, out = _build_list(spec["layers"], shape, dtype, name + ".")
    kind = spec.get("shortcut", "auto")
    if kind == "auto":
        has_norm = any(isinstance(layer, (BatchNorm1D, BatchNorm2D)) for layer in leaf_layers(inner))
        kind = "identity" if out == shape else ("conv_bn" if has_norm else "conv")
    shortcut: list[Layer] = []
    if kind != "identity":
        if len(shape) != 3 or len(out) != 3:
            raise ArchitectureError(f"{name}: a conv shortcut needs CxHxW input and output, got "
                                    f"{'x'.join(map(str, shape))} and {'x'.join(map(str, out))}")
        # the stride that brings the input's height and width to the output's (ceil division)
        stride = [-(-shape[1] // out[1]), -(-shape[2] // out[2])]
        shortcut.append(Conv2D(shape[0], out[0], 1, stride, 0, dtype=dtype, name=f"{name}.shortcut.conv",
                               bias=kind == "conv"))
        if kind == "conv_bn":
            shortcut.append(BatchNorm2D(out[0], dtype=dtype, name=f"{name}.shortcut.bn"))
            fuse_conv_norm(shortcut)
        branch_shape(shortcut, shape)
    block = Residual(inner, shortcut, name=name)
    block.shortcut_kind = kind
    return block


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
