"""load_dataset: one name -> the format reader, then the split, then float32 arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from convtrain.errors import ConfigError

from .base import DataSplits, RawData
from .cifar import load_cifar10
from .digits import load_digits_data
from .folder import FolderOptions, load_folder
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
    "folder": load_folder,
}
DATASETS = tuple(_READERS)
_PATH_HINT = {
    "mnist": "the directory with the four IDX files",
    "cifar10": "the cifar-10-batches-py directory or its parent",
    "npz": "the .npz file",
    "names": "the directory of <Language>.txt files, or DD2424's directory",
    "folder": "a folder with one subfolder of images per class",
}


def needs_path(name: str) -> bool:
    """Whether data set `name` is read from a path (all but the built-in digits)."""
    return name in _PATH_HINT


def load_dataset(name: str, path: str | Path | None = None, *, val_fraction: float = 0.1,
                 seed: int = 0, limit: int | None = None, folder: FolderOptions | None = None) -> DataSplits:
    """Read a data set and split it: train / validation (stratified, seeded) / the format's test set.

    val_fraction: a fraction in (0, 1), a whole count >= 1, or 0 for no validation set.
    limit: keep at most this many training rows (a stratified, seeded subsample); a fractional
    val_fraction is then taken of the limited rows, not of the whole set.
    folder: how an image folder is decoded (size, channels, bad files); only for "folder".
    Arrays are float32 (N, C, H, W), pixel values as stored (e.g. 0..255), not standardized.
    """
    if name not in _READERS:
        raise ConfigError(f"data: unknown data set {name!r}, expected one of {', '.join(DATASETS)}")
    if name == "digits" and path is not None:
        raise ConfigError("data_path: the digits data set is built in and takes no path")
    if name != "digits" and path is None:
        raise ConfigError(f"data_path: data set {name!r} needs a path ({_PATH_HINT[name]})")

    if folder is not None and name != "folder" and folder != FolderOptions():
        raise ConfigError(f"image_size, channels and skip_bad_images are settings of --data folder, not {name!r}")
    raw = load_folder(path, folder) if name == "folder" else _READERS[name](path)
    if raw.x_val is not None:  # the format's own validation set: --val-fraction draws none
        train_idx, _ = split_indices(raw.y, 0, seed=seed, limit=limit)
        x_val, y_val = raw.x_val, raw.y_val
    else:
        train_idx, val_idx = split_indices(raw.y, val_fraction, seed=seed, limit=limit)
        x_val, y_val = (raw.x[val_idx], raw.y[val_idx]) if val_idx is not None else (None, None)
    encode, meta = raw.fit_encoder(raw.x, train_idx)
    has_val, has_test = x_val is not None, raw.x_test is not None
    return DataSplits(
        name=name,
        x_train=encode(raw.x[train_idx]),
        y_train=raw.y[train_idx],
        x_val=encode(x_val) if has_val else None,
        y_val=y_val,
        x_test=encode(raw.x_test) if has_test else None,
        y_test=raw.y_test if has_test else None,
        class_names=list(raw.class_names),
        source=raw.source,
        meta=meta,
        standardize=raw.standardize,
    )
