"""The JSON entries of a training checkpoint, checked for shape before anything uses them.

A checkpoint edited by hand or by a tool (`trainer` as `{}` or a list, `history` as a string,
a callback's state as a number) must be refused with one line naming the file and the entry,
not fail later with a KeyError or AttributeError deep in the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convtrain.errors import CheckpointError

# trainer entry: key -> (accepted types, what it must be)
_TRAINER_FIELDS = {
    "epoch": (int, "a count >= 0"),
    "step": (int, "a count >= 0"),
    "batch_size": (int, "a positive batch size"),
    "mid_epoch": (bool, "true or false"),
    "stop_training": (bool, "true or false"),
    "batches_done": (int, "a count >= 0"),
}


def check_checkpoint_entries(entries: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError unless the parsed JSON `entries` ("trainer", "history", "callbacks",
    whichever are given) have the shapes Trainer.save_checkpoint writes."""
    where = f"checkpoint file {str(path)!r}"
    if "trainer" in entries:
        _check_trainer(entries["trainer"], where)
    if "history" in entries:
        _check_history(entries["history"], where)
    if "callbacks" in entries:
        _check_callbacks(entries["callbacks"], where)


def check_checkpoint_arrays(arrays: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError unless the plain arrays a trainer restores have the kinds it writes:
    `epoch_order` (sample indices) a 1-D array of whole numbers >= 0."""
    order = arrays.get("epoch_order")
    if order is None:
        return
    where = f"checkpoint file {str(path)!r}"
    if getattr(order, "ndim", None) != 1 or order.dtype.kind not in "iu":
        raise CheckpointError(f"{where}: entry 'epoch_order' is {order.dtype} of shape {order.shape}, "
                              "expected a 1-D array of sample indices")
    if order.size and int(order.min()) < 0:
        raise CheckpointError(f"{where}: entry 'epoch_order' holds the sample index {int(order.min())}, "
                              "expected indices >= 0")


def _check_trainer(state: Any, where: str) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: entry 'trainer' is {_kind(state)}, expected an object with "
                              f"{', '.join(_TRAINER_FIELDS)}")
    for key, (kind, expected) in _TRAINER_FIELDS.items():
        value = state.get(key)
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if ok and kind is int:
            ok = value > 0 if key == "batch_size" else value >= 0
        if not ok:
            raise CheckpointError(f"{where}: trainer {key!r} is {value!r}, expected {expected}")


def _check_history(history: Any, where: str) -> None:
    if not isinstance(history, dict) or not isinstance(history.get("epochs", []), list):
        raise CheckpointError(f"{where}: entry 'history' is {_kind(history)}, expected an object with a list "
                              "of epochs")
    if not isinstance(history.get("monitor", ""), str):
        raise CheckpointError(f"{where}: history 'monitor' is {history['monitor']!r}, expected a metric name")
    for n, epoch in enumerate(history.get("epochs", []), start=1):
        numbers = isinstance(epoch, dict) and all(
            value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            for value in epoch.values())
        if not numbers:
            raise CheckpointError(f"{where}: history epoch {n} is {_kind(epoch)}, expected an object of "
                                  "metric values")


def _check_callbacks(states: Any, where: str) -> None:
    if not isinstance(states, dict):
        raise CheckpointError(f"{where}: entry 'callbacks' is {_kind(states)}, expected an object of "
                              "callback states")
    for key, state in states.items():
        if not isinstance(state, dict):
            raise CheckpointError(f"{where}: callback state {key!r} is {_kind(state)}, expected an object")
    mlflow = states.get("mlflow", {})
    for key in ("run_id", "experiment_id", "tracking_uri"):
        if mlflow.get(key) is not None and not isinstance(mlflow[key], str):
            raise CheckpointError(f"{where}: callback state 'mlflow' has {key} {mlflow[key]!r}, expected a string")
    points = states.get("batch_losses", {}).get("points", [])
    if not isinstance(points, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in points):
        raise CheckpointError(f"{where}: callback state 'batch_losses' has points that are not [step, loss] pairs")


def _kind(value: Any) -> str:
    """'a list', 'an empty object', ... for the messages."""
    if isinstance(value, dict):
        return "an empty object" if not value else "an object without the expected fields"
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)
