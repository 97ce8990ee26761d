"""The two shapes a data set takes: RawData as its files hold it, DataSplits ready to train on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from convtrain.errors import DataError

# Given RawData.x and the indices of its training rows, returns the function that turns rows
# of x into float32 (N, C, H, W) network input, plus the meta needed to encode new inputs the
# same way (the names data set learns its alphabet from the training rows).
EncoderFit = Callable[[np.ndarray, np.ndarray], "tuple[Callable[[np.ndarray], np.ndarray], dict]"]


def as_float32(x: np.ndarray) -> np.ndarray:
    """Network input from stored pixels: a float32 copy, no float64 intermediate."""
    return x.astype(np.float32, copy=False)


def fit_float32(_x: np.ndarray, _train_idx: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    return as_float32, {}


@dataclass
class RawData:
    """What a format reader found, before the validation split and the float32 conversion.

    Image formats keep x as stored (usually uint8) so that splitting copies bytes, not floats.
    """

    x: np.ndarray  # (N, C, H, W) stored dtype; for names a str array (N,)
    y: np.ndarray  # (N,) int64
    class_names: list[str]
    source: str
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    fit_encoder: EncoderFit = fit_float32
    # Whether a fit standardizes the input with the training set's channel statistics. Images
    # are (pixel values on an arbitrary scale); one-hot encodings are not (see names.py).
    standardize: bool = True
    # A validation set the format fixes (an image folder's val/): then no rows of x are drawn for it.
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


@dataclass
class DataSplits:
    """Train / validation / test arrays of one data set, float32 NCHW, not yet standardized."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    class_names: list[str]
    source: str
    meta: dict = field(default_factory=dict)
    standardize: bool = True  # RawData.standardize of the data set

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def data_error(path: str | Path, problem: str) -> DataError:
    """The one-line form every data problem takes: '<file>: <problem>'."""
    return DataError(f"{path}: {problem}")


def existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise data_error(path, f"no such directory (expected {what})")
    if not path.is_dir():
        raise data_error(path, f"not a directory (expected {what})")
    return path


def check_labels(path: str | Path, labels: np.ndarray, num_classes: int) -> None:
    """Labels must index class_names: whole numbers in [0, num_classes)."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise data_error(path, f"label {bad} out of range, expected 0..{num_classes - 1}")
