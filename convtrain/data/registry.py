"""load_dataset: one name -> the format reader, then the split, then float32 arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from convtrain.errors import ConfigError

from .base import DataSplits, RawData
from .cifar import load_cifar10
from .digits import load_digits_data
from .idx import load_mnist
from .names import load_names
from .npz import load_npz
from .split import split_indices

_READERS: dict[str, Callable[[str | Path | None], RawData]] = {
    "digits": lambda _path: load_digits_data(),
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "npz": load_npz,
    "names": load_names,
}
DATASETS = tuple(_READERS)
_PATH_HINT = {
    "mnist": "the directory with the four IDX files",
    "cifar10": "the cifar-10-batches-py directory or its parent",
    "npz": "the .npz file",
    "names": "the directory of <Language>.txt files, or DD2424's directory",
}


def needs_path(name: str) -> bool:
    """Whether data set `name` is read from a path (all but the built-in digits)."""
    return name in _PATH_HINT


def load_dataset(name: str, path: str | Path | None = None, *, val_fraction: float = 0.1,
                 seed: int = 0, limit: int | None = None) -> DataSplits:
    """Read a data set and split it: train / validation (stratified, seeded) / the format's test set.

    val_fraction: a fraction in (0, 1), a whole count >= 1, or 0 for no validation set.
    limit: keep at most this many training rows (a stratified, seeded subsample); a fractional
    val_fraction is then taken of the limited rows, not of the whole set.
    Arrays are float32 (N, C, H, W), pixel values as stored (e.g. 0..255), not standardized.
    """
    if name not in _READERS:
        raise ConfigError(f"data: unknown data set {name!r}, expected one of {', '.join(DATASETS)}")
    if name == "digits" and path is not None:
        raise ConfigError("data_path: the digits data set is built in and takes no path")
    if name != "digits" and path is None:
        raise ConfigError(f"data_path: data set {name!r} needs a path ({_PATH_HINT[name]})")

    raw = _READERS[name](path)
    train_idx, val_idx = split_indices(raw.y, val_fraction, seed=seed, limit=limit)
    encode, meta = raw.fit_encoder(raw.x, train_idx)
    has_val, has_test = val_idx is not None, raw.x_test is not None
    return DataSplits(
        name=name,
        x_train=encode(raw.x[train_idx]),
        y_train=raw.y[train_idx],
        x_val=encode(raw.x[val_idx]) if has_val else None,
        y_val=raw.y[val_idx] if has_val else None,
        x_test=encode(raw.x_test) if has_test else None,
        y_test=raw.y_test if has_test else None,
        class_names=list(raw.class_names),
        source=raw.source,
        meta=meta,
        standardize=raw.standardize,
    )
