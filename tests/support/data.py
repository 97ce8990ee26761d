"""Data helpers the tests share: training-set standardization without building a network."""

import numpy as np

from convtrain.errors import DataError
from convtrain.nn.standardization import standardize


def standardized(standardizer, x):
    """x standardized with a fitted convtrain.data.Standardizer, by the network's formula;
    float64 stays float64, anything else becomes float32 (the training dtype)."""
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    if x.ndim not in (3, 4) or x.shape[-3] != standardizer.mean.size:
        raise DataError(f"input of shape {x.shape} does not have the {standardizer.mean.size} channel(s) "
                         "the standardizer was fitted on")
    return standardize(x, standardizer.mean, standardizer.std, dtype)
