"""Network: a stack of conv blocks and dense layers built from a plain description.

    [conv -> (batch norm) -> ReLU -> (max/avg pool)] x blocks -> flatten | global avg pool
        -> [dense -> (batch norm) -> ReLU -> (dropout)] x hidden -> dense -> scores

Cost J = mean cross-entropy + l2 * sum ||W||^2 over conv and dense weights (not biases,
not batch norm's gamma/beta). Batch norm's running statistics are buffers (state, not
parameters), saved with the model as PyTorch keeps them.
Parameters are named like PyTorch's state_dict ("conv1.weight", "fc1.bias", "fc.weight"),
and a network saves to one pickle-free .npz with everything needed to rebuild and use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convtrain.errors import ArchitectureError, CheckpointError, DataError
from convtrain.nn.dropout import Dropout
from convtrain.nn.layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, as_pair, fuse_conv_relu
from convtrain.nn.losses import softmax, softmax_cross_entropy
from convtrain.nn.norm import BatchNorm1D, BatchNorm2D, fuse_norm_relu
from convtrain.nn.footprint import check_saved_architecture
from convtrain.nn.npz_files import json_entry, read_json, read_npz, write_npz_atomic
from convtrain.nn.pooling import AvgPool2D, GlobalAvgPool

MODEL_FORMAT = "convtrain-model-1"
PARAM_PREFIX = "param/"
BUFFER_PREFIX = "buffer/"
GLOBAL_POOLS = ("none", "avg")
POOL_TYPES = ("max", "avg")
# Images per forward pass when scoring or predicting a whole data set (the trainer's per-epoch
# evaluation, `convtrain evaluate`, `predict`). On the CIFAR reference net, 500 images make an
# 86 MB activation (the 3x3x64 layer), above glibc's largest mmap threshold (32 MiB, see
# backend.py): every pass mapped it afresh and faulted it in, 0.48 s of system time per 5,400
# images at 2 threads (~15% of the evaluation's CPU time); 100 images per pass reuse the same
# memory (no faults, the same user time) and hold a fifth of it.
EVAL_BATCH_SIZE = 100


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


def checked_saved_extras(network: "Network", normalization, class_names, meta, where: str):
    """(normalization, class_names, meta) read from a saved file, checked against `network`.

    They are JSON a user can edit; a damaged one would otherwise fail deep inside predict or,
    worse, quietly give NaN (a std of 0). Raises CheckpointError with one line naming the entry.
    """
    def refuse(problem: str):
        return CheckpointError(f"{where}: {problem}")

    channels = network.input_shape[0]
    if normalization is not None:
        if not isinstance(normalization, dict) or not {"mean", "std"} <= set(normalization):
            raise refuse(f"'normalization' must be null or {{\"mean\": [...], \"std\": [...]}}, got {normalization!r:.80}")
        for key in ("mean", "std"):
            values = normalization[key]
            if not isinstance(values, list) or len(values) != channels \
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                               for v in values):
                raise refuse(f"normalization {key} must be {channels} finite number(s), one per input "
                             f"channel, got {values!r:.80}")
        if any(v <= 0 for v in normalization["std"]):
            raise refuse(f"normalization std must be positive in every channel, got {normalization['std']!r:.80}")
    if class_names is not None and (not isinstance(class_names, list) or len(class_names) != network.num_classes
                                    or not all(isinstance(name, str) for name in class_names)):
        raise refuse(f"'class_names' must be null or a list of {network.num_classes} strings, got {class_names!r:.80}")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise refuse(f"'meta' must be an object (a dict), got {meta!r:.80}")
    if "alphabet" in meta:  # a names model: predict encodes names with these
        alphabet, max_len = meta.get("alphabet"), meta.get("max_len")
        if not isinstance(alphabet, str) or (max_len is not None and (
                isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1)):
            raise refuse(f"meta 'alphabet' must be a string and 'max_len' a positive whole number, "
                         f"got {alphabet!r:.40} and {max_len!r:.20}")
    return normalization, class_names, meta


class Network:
    """A ConvNet for images (C, H, W) and `num_classes` classes; see the module docstring."""

    def __init__(self, architecture: dict[str, Any], seed: int | None = 0):
        self.architecture = architecture
        self.input_shape = tuple(int(v) for v in architecture["input_shape"])
        self.num_classes = int(architecture["num_classes"])
        self.dtype = np.dtype(architecture["dtype"])
        if self.dtype not in (np.float32, np.float64):
            raise ArchitectureError(f"dtype: got {architecture['dtype']!r}, expected float32 or float64")
        self.layers: list[Layer] = self._build_layers(architecture)
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
    def build(cls, *, input_shape: Sequence[int], num_classes: int, filters: Sequence[int],
              kernel_sizes=3, strides=1, padding=0, pool=0, hidden: Sequence[int] = (),
              dtype: str = "float32", seed: int = 0, batch_norm: bool = False, dropout=0.0,
              global_pool: str = "none", pool_type: str = "max") -> "Network":
        """Per-block options take one value for all blocks or one entry per block
        (a kernel entry is an int or [kh, kw]; padding an int, [ph, pw], 'same' or 'valid').
        batch_norm: after every conv and hidden dense layer (before its ReLU); dropout: after
        every hidden dense layer's ReLU (a probability, or one per hidden layer);
        global_pool "avg": the channel means feed the dense layers instead of the flattened
        maps; pool_type: max or average pooling in the blocks that pool."""
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
        architecture.update(_layer_options(batch_norm, dropout, len(architecture["hidden"]),
                                           global_pool, pool_type))
        return cls(architecture, seed=seed)

    @classmethod
    def from_config(cls, config, input_shape: Sequence[int], num_classes: int) -> "Network":
        return cls.build(
            input_shape=input_shape, num_classes=num_classes, filters=config.filters,
            kernel_sizes=config.per_block("kernel_sizes"), strides=config.per_block("strides"),
            padding=config.per_block("padding"), pool=config.per_block("pool"),
            hidden=config.hidden, dtype=config.dtype, seed=config.seed,
            batch_norm=getattr(config, "batch_norm", False), dropout=getattr(config, "dropout", 0.0),
            global_pool=getattr(config, "global_pool", "none"), pool_type=getattr(config, "pool_type", "max"))

    def _build_layers(self, arch: dict) -> list[Layer]:
        if arch["num_classes"] < 1:
            raise ArchitectureError(f"num_classes: got {arch['num_classes']}, expected at least 1")
        if min(self.input_shape) < 1:
            raise ArchitectureError(f"input_shape: got {self.input_shape}, expected positive sizes")
        layers: list[Layer] = []
        shape = self.input_shape

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
                       dtype=self.dtype, name=f"conv{i}"))
            if batch_norm:
                add(BatchNorm2D(shape[0], dtype=self.dtype, name=f"bn{i}"))
            add(ReLU(f"conv{i}_relu", inplace=True))
            if block["pool"]:
                add(pool_class(block["pool"], name=f"pool{i}"))
        add(GlobalAvgPool("gap") if arch.get("global_pool", "none") == "avg" else Flatten("flatten"))
        for j, (width, p) in enumerate(zip(arch["hidden"], dropout), start=1):
            if width < 1:
                raise ArchitectureError(f"fc{j}: got {width} units, expected at least 1")
            add(Dense(shape[0], width, dtype=self.dtype, name=f"fc{j}"))
            if batch_norm:
                add(BatchNorm1D(shape[0], dtype=self.dtype, name=f"fc{j}_bn"))
            add(ReLU(f"fc{j}_relu", inplace=True))
            if p:
                add(Dropout(p, name=f"fc{j}_dropout"))
        add(Dense(shape[0], self.num_classes, dtype=self.dtype, name="fc"))
        layers[0].needs_input_grad = False
        fuse_conv_relu(layers)
        fuse_norm_relu(layers)
        return layers

    def initialize(self, seed: int) -> None:
        """He initialization W ~ N(0, 2 / fan_in), biases 0. Drawn in float64 and cast, so a
        float32 and a float64 network with the same seed start from the same weights."""
        rng = np.random.default_rng([int(seed), 0])
        for layer in self.layers:
            if isinstance(layer, (BatchNorm1D, BatchNorm2D)):
                layer.reset_parameters()  # gamma 1, beta 0, fresh running statistics: no draw
            elif "weight" in layer.params:
                weight = layer.params["weight"]
                draw = rng.standard_normal(weight.shape) * np.sqrt(2.0 / layer.fan_in)
                weight[...] = draw
                layer.params["bias"][...] = 0

    # ---- parameters ---------------------------------------------------------------

    def parameters(self) -> dict[str, np.ndarray]:
        """The live parameter arrays (updated in place by the optimizer), by stable name."""
        return {f"{layer.name}.{key}": value for layer in self.layers for key, value in layer.params.items()}

    def gradients(self) -> dict[str, np.ndarray]:
        """Gradients of the last backward pass, same names as parameters()."""
        return {f"{layer.name}.{key}": value for layer in self.layers for key, value in layer.grads.items()}

    def weight_names(self) -> list[str]:
        """The parameters under L2: conv and dense weights, not biases nor batch norm's gamma."""
        return [f"{layer.name}.weight" for layer in self._regularized_layers()]

    def _regularized_layers(self) -> list[Layer]:
        return [layer for layer in self.layers
                if "weight" in layer.params and getattr(layer, "regularized", True)]

    def buffers(self) -> dict[str, np.ndarray]:
        """The live state arrays that are not parameters (batch norm's running statistics)."""
        return {f"{layer.name}.{key}": value for layer in self.layers
                for key, value in getattr(layer, "buffers", {}).items()}

    def set_buffers(self, values: dict[str, np.ndarray], *, source: str = "buffers") -> None:
        """Copy values into the live buffers; names and shapes must match."""
        _copy_named(self.buffers(), values, source, "buffer")

    @property
    def has_dropout(self) -> bool:
        return any(isinstance(layer, Dropout) for layer in self.layers)

    def set_dropout_generator(self, rng: np.random.Generator) -> None:
        """The generator every Dropout layer draws its masks from (the Trainer's, checkpointed)."""
        for layer in self.layers:
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
        params = self.parameters()
        missing = sorted(set(params) - set(values))
        unexpected = sorted(set(values) - set(params))
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: parameter names do not match the network "
                f"(missing {missing or 'none'}, unexpected {unexpected or 'none'})")
        for name, target in params.items():
            value = np.asarray(values[name])
            if value.shape != target.shape:
                raise CheckpointError(
                    f"{source}: parameter {name} has shape {value.shape}, the network needs {target.shape}")
            np.copyto(target, value, casting="same_kind")

    # ---- computation --------------------------------------------------------------

    def set_conv_algo(self, algo: str) -> dict[str, str]:
        """Let the conv layers compute with `algo` ("auto", "im2col" or "winograd"; see
        kernels.choose_conv_algo: "winograd" runs on the 3x3 stride-1 layers, the others keep
        im2col) and return {layer name: algorithm}. A run setting, not saved with the model:
        every algorithm computes the same layer, so a model trained with one runs with any."""
        from convtrain.nn import kernels

        chosen = {}
        shape = self.input_shape
        for layer in self.layers:
            if isinstance(layer, Conv2D):
                out = layer.output_shape(shape)
                layer.algo = kernels.choose_conv_algo(algo, layer.in_channels, layer.filters,
                                                      layer.kernel_size, layer.stride, out[1:])
                chosen[layer.name] = layer.algo
            shape = layer.output_shape(shape)
        return chosen

    def conv_algos(self) -> dict[str, str]:
        """{conv layer name: the algorithm it computes with}."""
        return {layer.name: layer.algo for layer in self.layers if isinstance(layer, Conv2D)}

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
        x = x.astype(self.dtype, copy=True)
        if self.normalization:
            shape = (1, -1, 1, 1)
            mean = np.asarray(self.normalization["mean"], dtype=self.dtype).reshape(shape)
            std = np.asarray(self.normalization["std"], dtype=self.dtype).reshape(shape)
            x -= mean
            x /= std
        return x

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
        """Everything a saved model holds, as .npz entries (also embedded in checkpoints)."""
        arrays = {f"{PARAM_PREFIX}{name}": value for name, value in self.parameters().items()}
        arrays.update({f"{BUFFER_PREFIX}{name}": value for name, value in self.buffers().items()})
        arrays["format"] = np.array(MODEL_FORMAT)
        arrays["architecture"] = json_entry(self.architecture)
        arrays["normalization"] = json_entry(self.normalization)
        arrays["class_names"] = json_entry(self.class_names)
        arrays["meta"] = json_entry(self.meta)
        return arrays

    def save(self, path: str | Path) -> Path:
        """Write one .npz (atomically): weights, architecture, normalization, class names, meta."""
        return write_npz_atomic(path, self.to_arrays())

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], path: str | Path = "<arrays>",
                    what: str = "model") -> "Network":
        architecture = read_json(arrays, "architecture", path, what)
        try:
            stored = sum(value.size for key, value in arrays.items() if key.startswith(PARAM_PREFIX))
            check_saved_architecture(architecture, stored)  # before any array is allocated for it
            network = cls(architecture, seed=None)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ArchitectureError):
                raise CheckpointError(f"{what} file {str(path)!r}: {exc}") from None
            raise CheckpointError(f"{what} file {str(path)!r}: invalid architecture ({exc!r})") from None
        values = {k[len(PARAM_PREFIX):]: v for k, v in arrays.items() if k.startswith(PARAM_PREFIX)}
        network.set_parameters(values, source=f"{what} file {str(path)!r}")
        network.set_buffers(buffer_entries(arrays), source=f"{what} file {str(path)!r}")
        network.normalization, network.class_names, network.meta = checked_saved_extras(
            network, read_json(arrays, "normalization", path, what), read_json(arrays, "class_names", path, what),
            read_json(arrays, "meta", path, what), f"{what} file {str(path)!r}")
        return network

    @classmethod
    def load(cls, path: str | Path) -> "Network":
        """Rebuild a saved network (a checkpoint file works too); CheckpointError on any defect."""
        return cls.from_arrays(read_npz(path, "model"), path, "model")

    # ---- PyTorch layout -----------------------------------------------------------

    def state_dict_torch(self) -> dict[str, np.ndarray]:
        """Copies of the weights in PyTorch's layout and naming: conv (F, C, kh, kw), linear
        (out, in), and flattening in NCHW order as torch.nn.Flatten does. These are the
        layouts used internally, so this is a plain copy; see convtrain.torch_compat."""
        state = {name: value.copy() for name, value in self.parameters().items()}
        state.update({name: value.copy() for name, value in self.buffers().items()})
        return state

    def load_state_dict_torch(self, state: dict) -> None:
        """Import weights (and batch norm's buffers) given in PyTorch's layout (numpy arrays or
        torch tensors)."""
        values = {}
        for name, value in state.items():
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            values[name] = value
        buffer_names = set(self.buffers())
        self.set_parameters({k: v for k, v in values.items() if k not in buffer_names}, source="state dict")
        self.set_buffers({k: v for k, v in values.items() if k in buffer_names}, source="state dict")

    def __repr__(self) -> str:
        return f"Network({json.dumps(self.architecture)})"


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


def buffer_entries(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The buffers saved in a model or checkpoint's arrays, by name."""
    return {k[len(BUFFER_PREFIX):]: v for k, v in arrays.items() if k.startswith(BUFFER_PREFIX)}


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
