"""Network: a list of layers (convtrain.nn.layer_specs) and the classifier after it.

    layers (conv, batch norm, ReLU, pools, dropout, dense, residual blocks) -> dense -> scores

Network.build's template, [conv -> (batch norm) -> ReLU -> (max/avg pool)] x blocks ->
flatten | global avg pool -> [dense -> (batch norm) -> ReLU -> (dropout)] x hidden, is a
shorthand that expands to such a list.

Cost J = mean cross-entropy + l2 * sum ||W||^2 over conv and dense weights (not biases,
not batch norm's gamma/beta). Batch norm's running statistics are buffers (state, not
parameters), saved with the model as PyTorch keeps them.
Parameters are named like PyTorch's state_dict ("conv1.weight", "res1.bn2.bias", "fc.weight";
the naming rule is layer_specs.layer_names), and a residual block's are its inner layers' then
its shortcut's: that is the order of every walk (parameters, He initialization, export).
The class computes; the description and the layers it makes are convtrain.nn.architecture's,
and the one pickle-free .npz a network saves to is convtrain.nn.model_file's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convtrain.errors import ArchitectureError, CheckpointError, DataError
from convtrain.nn import model_file, torch_compat
from convtrain.nn.architecture import (
    assign_conv_algos, build_layers, conv_algo_name, config_build_options, describe_architecture, network_architecture)
from convtrain.nn.dropout import Dropout
from convtrain.nn.layers import Conv2D, Layer
from convtrain.nn.losses import softmax, softmax_cross_entropy
from convtrain.nn.norm import BatchNorm1D, BatchNorm2D
from convtrain.nn.residual import leaf_layers
from convtrain.nn.standardization import standardize

# Images per forward pass when scoring or predicting a whole data set (the trainer's per-epoch
# evaluation, `convtrain evaluate`, `predict`). On the CIFAR reference net, 500 images make an
# 86 MB activation (the 3x3x64 layer), above glibc's largest mmap threshold (32 MiB, see
# backend.py): every pass mapped it afresh and faulted it in, 0.48 s of system time per 5,400
# images at 2 threads (~15% of the evaluation's CPU time); 100 images per pass reuse the same
# memory (no faults, the same user time) and hold a fifth of it.
EVAL_BATCH_SIZE = 100


class Network:
    """A ConvNet for images (C, H, W) and `num_classes` classes; see the module docstring.

    `architecture` is a description (convtrain.nn.architecture) or a layer list, e.g.
    Network([Conv2D(16, 3, padding="same"), ReLU(), Residual([...]), GlobalAvgPool()],
    input_shape=(3, 32, 32), num_classes=10) with the classes of convtrain.nn.layer_specs."""

    def __init__(self, architecture: dict[str, Any] | Sequence, seed: int | None = 0, *,
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 dtype: str = "float32"):
        self.architecture = architecture = network_architecture(architecture, input_shape=input_shape,
                                                                num_classes=num_classes, dtype=dtype)
        self.input_shape = tuple(int(v) for v in architecture["input_shape"])
        self.num_classes = int(architecture["num_classes"])
        self.dtype = np.dtype(architecture["dtype"])
        if self.dtype not in (np.float32, np.float64):
            raise ArchitectureError(f"dtype: got {architecture['dtype']!r}, expected float32 or float64")
        self.layers: list[Layer] = build_layers(architecture, self.input_shape, self.num_classes, self.dtype)
        self.class_names: list[str] | None = None
        self.normalization = None
        self.meta: dict = {}
        if seed is not None:
            self.initialize(seed)

    @property
    def normalization(self) -> dict | None:
        """{"mean": [...], "std": [...]} per input channel, applied by normalize(); None = identity."""
        return self._normalization

    @normalization.setter
    def normalization(self, value) -> None:
        if value is None:
            self._normalization = None
            return
        if "mean" not in value or "std" not in value:
            raise DataError(f"normalization: expected a dict with 'mean' and 'std', got keys {sorted(value)}")
        # Stored as plain lists so it is JSON (e.g. Standardizer.to_dict() gives arrays).
        self._normalization = {k: np.asarray(v).tolist() if isinstance(v, (np.ndarray, list, tuple)) else v
                               for k, v in value.items()}

    # ---- construction -------------------------------------------------------------

    @classmethod
    def build(cls, *, input_shape: Sequence[int], num_classes: int, filters: Sequence[int] = (),
              kernel_sizes=3, strides=1, padding=0, pool=0, hidden: Sequence[int] = (),
              dtype: str = "float32", seed: int = 0, batch_norm: bool = False, dropout=0.0,
              global_pool: str = "none", pool_type: str = "max", layers: Sequence | None = None) -> "Network":
        """Per-block options take one value for all blocks or one entry per block
        (a kernel entry is an int or [kh, kw]; padding an int, [ph, pw], 'same' or 'valid').
        batch_norm: after every conv and hidden dense layer (before its ReLU); dropout: after
        every hidden dense layer's ReLU (a probability, or one per hidden layer);
        global_pool "avg": the channel means feed the dense layers instead of the flattened
        maps; pool_type: max or average pooling in the blocks that pool. `layers`, a layer list,
        replaces all of these."""
        architecture = describe_architecture(
            input_shape=input_shape, num_classes=num_classes, filters=filters, kernel_sizes=kernel_sizes,
            strides=strides, padding=padding, pool=pool, hidden=hidden, dtype=dtype, batch_norm=batch_norm,
            dropout=dropout, global_pool=global_pool, pool_type=pool_type, layers=layers)
        return cls(architecture, seed=seed)

    @classmethod
    def from_config(cls, config, input_shape: Sequence[int], num_classes: int) -> "Network":
        return cls.build(input_shape=input_shape, num_classes=num_classes, **config_build_options(config))

    def initialize(self, seed: int) -> None:
        """He initialization W ~ N(0, 2 / fan_in), biases 0. Drawn in float64 and cast, so a
        float32 and a float64 network with the same seed start from the same weights."""
        rng = np.random.default_rng([int(seed), 0])
        for layer in self.leaf_layers():
            if isinstance(layer, (BatchNorm1D, BatchNorm2D)):
                layer.reset_parameters()  # gamma 1, beta 0, fresh running statistics: no draw
            elif "weight" in layer.params:
                weight = layer.params["weight"]
                draw = rng.standard_normal(weight.shape) * np.sqrt(2.0 / layer.fan_in)
                weight[...] = draw
                if "bias" in layer.params:
                    layer.params["bias"][...] = 0

    def leaf_layers(self) -> list[Layer]:
        """Every layer that computes, in order (a residual block's inner layers, then its shortcut's)."""
        return list(leaf_layers(self.layers))

    # ---- parameters ---------------------------------------------------------------

    def parameters(self) -> dict[str, np.ndarray]:
        """The live parameter arrays (updated in place by the optimizer), by stable name."""
        return {f"{layer.name}.{key}": value for layer in self.leaf_layers() for key, value in layer.params.items()}

    def gradients(self) -> dict[str, np.ndarray]:
        """Gradients of the last backward pass, same names as parameters()."""
        return {f"{layer.name}.{key}": value for layer in self.leaf_layers() for key, value in layer.grads.items()}

    def weight_names(self) -> list[str]:
        """The parameters under L2: conv and dense weights, not biases nor batch norm's gamma."""
        return [f"{layer.name}.weight" for layer in self._regularized_layers()]

    def _regularized_layers(self) -> list[Layer]:
        return [layer for layer in self.leaf_layers()
                if "weight" in layer.params and getattr(layer, "regularized", True)]

    def buffers(self) -> dict[str, np.ndarray]:
        """The live state arrays that are not parameters (batch norm's running statistics)."""
        return {f"{layer.name}.{key}": value for layer in self.leaf_layers()
                for key, value in getattr(layer, "buffers", {}).items()}

    def set_buffers(self, values: dict[str, np.ndarray], *, source: str = "buffers") -> None:
        """Copy values into the live buffers; names and shapes must match."""
        _copy_named(self.buffers(), values, source, "buffer")

    @property
    def has_dropout(self) -> bool:
        return any(isinstance(layer, Dropout) for layer in self.leaf_layers())

    def set_dropout_generator(self, rng: np.random.Generator) -> None:
        """The generator every Dropout layer draws its masks from (the Trainer's, checkpointed)."""
        for layer in self.leaf_layers():
            if isinstance(layer, Dropout):
                layer.rng = rng

    def l2_penalty(self) -> float:
        """sum ||W||^2 over conv and dense weights."""
        total = 0.0
        for layer in self._regularized_layers():
            weight = layer.params.get("weight")
            if weight is not None:
                flat = weight.reshape(-1)
                # einsum, not np.dot: a BLAS dot this long wakes NumPy's BLAS threads, which
                # then spin against the kernels' OpenMP threads in the next step
                total += float(np.einsum("i,i->", flat, flat))
        return total

    def set_parameters(self, values: dict[str, np.ndarray], *, source: str = "parameters") -> None:
        """Copy values into the live arrays (so optimizer references stay valid); names and shapes must match."""
        _copy_named(self.parameters(), values, source, "parameter")

    # ---- computation --------------------------------------------------------------

    def set_conv_algo(self, algo: str) -> dict[str, str]:
        """Let the conv layers compute with `algo` ("auto", "im2col" or "winograd"; see
        kernels.choose_conv_algos: "winograd" runs on the 3x3 stride-1 layers, the others keep
        im2col; "auto" may take a Winograd layer's filter gradient by im2col) and return
        {layer name: algorithm} (architecture.conv_algo_name). A run setting, not saved with the
        model: every algorithm computes the same layer, so a model trained with one runs with any."""
        return assign_conv_algos(self.layers, self.input_shape, algo)

    def conv_algos(self) -> dict[str, str]:
        """{conv layer name: the algorithm it computes with} (architecture.conv_algo_name)."""
        return {layer.name: conv_algo_name(layer) for layer in self.leaf_layers()
                if isinstance(layer, Conv2D)}

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        """Scores (N, num_classes) for a normalized batch x (N, C, H, W) of this network's dtype."""
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dscores: np.ndarray) -> None:
        """Fill every layer's grads from dL/dscores (after a forward with train=True)."""
        dout = dscores
        for layer in reversed(self.layers):
            dout = layer.backward(dout)

    def add_l2_gradients(self, l2: float) -> None:
        """grads[W] += 2 * l2 * W for every conv and dense weight."""
        if l2 == 0:
            return
        for layer in self._regularized_layers():
            weight = layer.params.get("weight")
            if weight is not None:
                layer.grads["weight"] += (2.0 * l2) * weight

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, l2: float = 0.0,
                       label_smoothing: float = 0.0) -> tuple[float, float]:
        """(loss, cost) on a batch and gradients of the cost in gradients()."""
        scores = self.forward(x, train=True)
        loss, dscores = softmax_cross_entropy(scores, y, label_smoothing)
        self.backward(dscores)
        self.add_l2_gradients(l2)
        return loss, loss + l2 * self.l2_penalty()

    def loss(self, x: np.ndarray, y: np.ndarray, l2: float = 0.0) -> tuple[float, float]:
        """(loss, cost) on a batch, without gradients."""
        loss, _ = softmax_cross_entropy(self.forward(x, train=False), y)
        return loss, loss + l2 * self.l2_penalty()

    # ---- raw input ----------------------------------------------------------------

    def normalize(self, x_raw: np.ndarray) -> np.ndarray:
        """Raw images (N, C, H, W) -> network input: per-channel (x - mean) / std, in the network dtype."""
        x = np.asarray(x_raw)
        if x.ndim == 3 and len(self.input_shape) == 3:
            x = x[None]
        if x.shape[1:] != self.input_shape:
            raise DataError(
                f"input images have shape {tuple(x.shape[1:])}, the network expects {self.input_shape} (C, H, W)")
        if not self.normalization:
            return x.astype(self.dtype, copy=True)
        return standardize(x, self.normalization["mean"], self.normalization["std"], self.dtype)

    def predict_proba(self, x_raw: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        """Class probabilities (N, num_classes) for raw images; normalizes inside, in batches."""
        x_raw = np.asarray(x_raw)
        if x_raw.ndim == 3:
            x_raw = x_raw[None]
        out = np.empty((x_raw.shape[0], self.num_classes), dtype=self.dtype)
        for start in range(0, x_raw.shape[0], batch_size):
            batch = self.normalize(x_raw[start:start + batch_size])
            out[start:start + batch.shape[0]] = softmax(self.forward(batch, train=False))
        return out

    def predict(self, x_raw: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        """Predicted labels (N,) int64 for raw images."""
        return self.predict_proba(x_raw, batch_size).argmax(axis=1).astype(np.int64)

    # ---- files --------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything a saved model holds, as .npz entries (see convtrain.nn.model_file)."""
        return model_file.network_arrays(self)

    def save(self, path: str | Path) -> Path:
        """Write one .npz (atomically): weights, architecture, normalization, class names, meta."""
        return model_file.save_network(self, path)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], path: str | Path = "<arrays>",
                    what: str = "model") -> "Network":
        return model_file.network_from_arrays(cls, arrays, path, what)

    @classmethod
    def load(cls, path: str | Path) -> "Network":
        """Rebuild a saved network (a checkpoint file works too); CheckpointError on any defect."""
        return model_file.load_network(cls, path)

    # ---- PyTorch layout -----------------------------------------------------------

    def state_dict_torch(self) -> dict[str, np.ndarray]:
        """Copies of the weights (and buffers) in PyTorch's layout and naming; see torch_compat."""
        return torch_compat.torch_state_dict(self)

    def load_state_dict_torch(self, state: dict) -> None:
        """Import weights (and batch norm's buffers) given in PyTorch's layout (numpy arrays or
        torch tensors)."""
        torch_compat.load_torch_state_dict(self, state)

    def __repr__(self) -> str:
        return f"Network({json.dumps(self.architecture)})"


def _copy_named(targets: dict[str, np.ndarray], values: dict[str, np.ndarray], source: str, what: str) -> None:
    missing = sorted(set(targets) - set(values))
    unexpected = sorted(set(values) - set(targets))
    if missing or unexpected:
        raise CheckpointError(f"{source}: {what} names do not match the network "
                              f"(missing {missing or 'none'}, unexpected {unexpected or 'none'})")
    for name, target in targets.items():
        value = np.asarray(values[name])
        if value.shape != target.shape:
            raise CheckpointError(f"{source}: {what} {name} has shape {value.shape}, the network needs {target.shape}")
        np.copyto(target, value, casting="same_kind")
