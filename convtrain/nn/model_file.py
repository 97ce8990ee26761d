"""The model file: one pickle-free .npz holding everything needed to rebuild and use a network.

    format         "convtrain-model-1"
    architecture   JSON, the plain description (convtrain.nn.architecture)
    param/<name>   every parameter, named like PyTorch's state_dict ("conv1.weight", "fc.bias")
    buffer/<name>  batch norm's running statistics (state, not parameters)
    normalization  JSON {"mean": [...], "std": [...]} per input channel, or null
    class_names    JSON list, or null
    meta           JSON object: the data recipe (and a names model's encoding)

A checkpoint embeds the same entries, so `load_network` reads a checkpoint too. Everything
read back is checked: a damaged or edited file is one CheckpointError line naming the entry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convtrain.errors import ArchitectureError, CheckpointError
from convtrain.nn.footprint import check_saved_architecture
from convtrain.nn.npz_files import json_entry, read_json, read_npz, write_npz_atomic

MODEL_FORMAT = "convtrain-model-1"
PARAM_PREFIX = "param/"
BUFFER_PREFIX = "buffer/"


def network_arrays(network) -> dict[str, np.ndarray]:
    """Everything a saved model holds, as .npz entries (also embedded in checkpoints)."""
    arrays = {f"{PARAM_PREFIX}{name}": value for name, value in network.parameters().items()}
    arrays.update({f"{BUFFER_PREFIX}{name}": value for name, value in network.buffers().items()})
    arrays["format"] = np.array(MODEL_FORMAT)
    arrays["architecture"] = json_entry(network.architecture)
    arrays["normalization"] = json_entry(network.normalization)
    arrays["class_names"] = json_entry(network.class_names)
    arrays["meta"] = json_entry(network.meta)
    return arrays


def save_network(network, path: str | Path) -> Path:
    """Write one .npz (atomically): weights, architecture, normalization, class names, meta."""
    return write_npz_atomic(path, network_arrays(network))


def network_from_arrays(network_class, arrays: dict[str, np.ndarray], path: str | Path = "<arrays>",
                        what: str = "model"):
    """A `network_class` rebuilt from a model's (or checkpoint's) arrays; CheckpointError on any defect."""
    where = f"{what} file {str(path)!r}"
    architecture = read_json(arrays, "architecture", path, what)
    try:
        stored = sum(value.size for key, value in arrays.items() if key.startswith(PARAM_PREFIX))
        check_saved_architecture(architecture, stored)  # before any array is allocated for it
        network = network_class(architecture, seed=None)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ArchitectureError):
            raise CheckpointError(f"{where}: {exc}") from None
        raise CheckpointError(f"{where}: invalid architecture ({exc!r})") from None
    values = {k[len(PARAM_PREFIX):]: v for k, v in arrays.items() if k.startswith(PARAM_PREFIX)}
    network.set_parameters(values, source=where)
    network.set_buffers(buffer_entries(arrays), source=where)
    network.normalization, network.class_names, network.meta = checked_saved_extras(
        network, read_json(arrays, "normalization", path, what), read_json(arrays, "class_names", path, what),
        read_json(arrays, "meta", path, what), where)
    return network


def load_network(network_class, path: str | Path):
    """Rebuild a saved network (a checkpoint file works too); CheckpointError on any defect."""
    return network_from_arrays(network_class, read_npz(path, "model"), path, "model")


def buffer_entries(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The buffers saved in a model or checkpoint's arrays, by name."""
    return {k[len(BUFFER_PREFIX):]: v for k, v in arrays.items() if k.startswith(BUFFER_PREFIX)}


def checked_saved_extras(network, normalization, class_names, meta, where: str):
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
    from convtrain.data.names import names_meta_problem  # a names model: predict encodes names with it

    problem = names_meta_problem(meta)
    if problem:
        raise refuse(problem)
    return normalization, class_names, meta
