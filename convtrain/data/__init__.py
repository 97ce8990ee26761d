"""Data sets for convtrain: readers for each format, the split, standardization, balancing.

    splits = load_dataset("mnist", "data/mnist", val_fraction=0.1, seed=0)
    network.normalization = Standardizer.fit(splits.x_train).to_dict()
    x = network.normalize(splits.x_train)

Every reader checks its files and raises convtrain.errors.DataError with one line naming the
file and the problem; bad arguments (unknown name, impossible val_fraction) raise ConfigError.
"""

from .augment import augment_batch
from .balance import class_balanced_indices
from .base import DataSplits
from .images import load_image_file
from .names import encode_names, normalize_name
from .registry import DATASETS, load_dataset
from .standardize import Standardizer

__all__ = [
    "DATASETS",
    "DataSplits",
    "Standardizer",
    "augment_batch",
    "class_balanced_indices",
    "encode_names",
    "load_dataset",
    "load_image_file",
    "normalize_name",
]
