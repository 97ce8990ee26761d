"""A Network as an ONNX graph (built with onnx.helper): raw images in, class probabilities out.

    images (N, C, H, W) raw pixels, float32 or uint8  -> [Cast] -> Sub mean -> Div std (the
    network's own normalization) -> the layers in order -> Softmax -> probabilities (N, K)

so the model takes what `convtrain predict` takes. One node (or none) per layer:

    Conv2D          Conv (strides, pads, kernel_shape; every algorithm computes the same layer)
    BatchNorm2D/1D  folded into the conv / dense before it (fold_batch_norm, the default), or
                    BatchNormalization with the running statistics
    ReLU            Relu          MaxPool2D / AvgPool2D   MaxPool / AveragePool (no padding)
    GlobalAvgPool   GlobalAveragePool + Flatten           Flatten   Flatten (NCHW order, axis 1)
    Dense           Gemm (transB: weights are (out, in))  Dropout   nothing (identity at inference)
    Residual        its inner layers and its shortcut's (none for the identity: the block's
                    input), each as above (batch norm folded alike), then Add and Relu

Weights are float32 whatever the network's dtype. The class names, the normalization and, for a
names model, the alphabet and name length (to one-hot encode the input) are metadata_props.
onnx is imported inside the functions: the engine itself never needs it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from convtrain.errors import ArchitectureError
from convtrain.nn.dropout import Dropout
from convtrain.nn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from convtrain.nn.norm import BatchNorm1D, BatchNorm2D
from convtrain.nn.pooling import AvgPool2D, GlobalAvgPool
from convtrain.nn.residual import Residual

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
INPUT_TYPES = ("float32", "uint8")


def to_onnx(network, *, input_type: str = "float32", fold_batch_norm: bool = True):
    """The network as an onnx.ModelProto (checked by onnx.checker)."""
    import onnx
    from onnx import TensorProto, helper

    if input_type not in INPUT_TYPES:
        raise ArchitectureError(f"input type: got {input_type!r}, expected {' or '.join(INPUT_TYPES)}")
    graph = _GraphBuilder()
    x = INPUT_NAME
    if input_type != "float32":
        x = graph.node("Cast", [x], to=TensorProto.FLOAT)
    if network.normalization:
        shape = (1, -1, 1, 1)
        x = graph.node("Sub", [x, graph.constant("norm_mean", np.reshape(network.normalization["mean"], shape))])
        x = graph.node("Div", [x, graph.constant("norm_std", np.reshape(network.normalization["std"], shape))])
    x = _layers(graph, list(network.layers), x, fold_batch_norm)
    graph.node("Softmax", [x], output=OUTPUT_NAME, axis=1)

    elem_type = TensorProto.FLOAT if input_type == "float32" else TensorProto.UINT8
    inputs = [helper.make_tensor_value_info(INPUT_NAME, elem_type, ["N", *network.input_shape])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", network.num_classes])]
    model = helper.make_model(
        helper.make_graph(graph.nodes, "convtrain", inputs, outputs, initializer=graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="convtrain")
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime releases of the last years
    helper.set_model_props(model, _metadata(network))
    onnx.checker.check_model(model)
    return model


def _layers(graph: "_GraphBuilder", layers: list, x: str, fold_batch_norm: bool) -> str:
    """The nodes of a layer list (a residual block's branches too) after the tensor `x`; the
    name of its output."""
    i = 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        fold = fold_batch_norm and isinstance(following, (BatchNorm1D, BatchNorm2D))
        if isinstance(layer, (Conv2D, Dense)):
            weight = _float(layer.params["weight"])
            # a layer without a bias (bias = false, before a batch norm) exports a zero one
            bias = _float(layer.params["bias"]) if "bias" in layer.params else np.zeros(weight.shape[0], np.float32)
            if fold:
                weight, bias = _folded(weight, bias, following)
                i += 1  # the batch norm is in the weights now
            w = graph.constant(f"{layer.name}.weight", weight)
            b = graph.constant(f"{layer.name}.bias", bias)
            if isinstance(layer, Conv2D):
                (ph, pw) = layer.padding
                x = graph.node("Conv", [x, w, b], name=layer.name, kernel_shape=list(layer.kernel_size),
                               strides=list(layer.stride), pads=[ph, pw, ph, pw])
            else:
                x = graph.node("Gemm", [x, w, b], name=layer.name, transB=1)
        elif isinstance(layer, (BatchNorm1D, BatchNorm2D)):
            x = graph.node("BatchNormalization", [
                x, graph.constant(f"{layer.name}.weight", _float(layer.params["weight"])),
                graph.constant(f"{layer.name}.bias", _float(layer.params["bias"])),
                graph.constant(f"{layer.name}.running_mean", _float(layer.buffers["running_mean"])),
                graph.constant(f"{layer.name}.running_var", _float(layer.buffers["running_var"]))],
                name=layer.name, epsilon=float(layer.eps))
        elif isinstance(layer, ReLU):
            x = graph.node("Relu", [x], name=layer.name)
        elif isinstance(layer, (MaxPool2D, AvgPool2D)):
            x = graph.node("MaxPool" if isinstance(layer, MaxPool2D) else "AveragePool", [x], name=layer.name,
                           kernel_shape=list(layer.size), strides=list(layer.stride))
        elif isinstance(layer, GlobalAvgPool):
            x = graph.node("Flatten", [graph.node("GlobalAveragePool", [x], name=layer.name)], axis=1)
        elif isinstance(layer, Flatten):
            x = graph.node("Flatten", [x], name=layer.name, axis=1)
        elif isinstance(layer, Dropout):
            pass  # identity at inference
        elif isinstance(layer, Residual):
            inner = _layers(graph, layer.inner, x, fold_batch_norm)
            shortcut = _layers(graph, layer.shortcut, x, fold_batch_norm)  # x itself for the identity
            x = graph.node("Relu", [graph.node("Add", [inner, shortcut], name=layer.name)], name=layer.name)
        else:
            raise ArchitectureError(f"{layer.name}: no ONNX export for a {type(layer).__name__} layer")
        i += 1
    return x


def export_onnx(network, path: str | Path, **options) -> Path:
    """Write the network's ONNX model to `path`, atomically (temp file + rename)."""
    data = to_onnx(network, **options).SerializeToString()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    return path


def _float(values) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32)


def _folded(weight: np.ndarray, bias: np.ndarray, norm) -> tuple[np.ndarray, np.ndarray]:
    """W' = W * s (per output), b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps): the layer
    followed by batch norm at inference, as one layer. Computed in float64, stored as float32."""
    gamma, beta = (np.asarray(norm.params[k], dtype=np.float64) for k in ("weight", "bias"))
    mean, var = (np.asarray(norm.buffers[k], dtype=np.float64) for k in ("running_mean", "running_var"))
    scale = gamma / np.sqrt(var + norm.eps)
    folded_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return _float(folded_weight), _float((bias.astype(np.float64) - mean) * scale + beta)


def _metadata(network) -> dict[str, str]:
    props = {"convtrain.class_names": json.dumps(network.class_names or [str(k) for k in range(network.num_classes)]),
             "convtrain.normalization": json.dumps(network.normalization),
             "convtrain.input": "raw images (N, C, H, W), pixel values as convtrain predict takes them"}
    meta = network.meta or {}
    if "alphabet" in meta:
        props["convtrain.alphabet"] = meta["alphabet"]
        props["convtrain.max_len"] = str(meta.get("max_len"))
        props["convtrain.input"] = "names one-hot encoded with convtrain.alphabet, convtrain.max_len letters"
    return props


class _GraphBuilder:
    """Nodes and initializers, each output named once."""

    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0

    def constant(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(_float(value), name))
        return name

    def node(self, op: str, inputs: list[str], *, output: str | None = None, name: str | None = None,
             **attributes) -> str:
        from onnx import helper

        self._count += 1
        output = output or f"{name or op.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{name or op}_{self._count}", **attributes))
        return output
