"""Digits for the trainer's tests, standardized like a fit standardizes them."""

import pytest

from convtrain.data import Standardizer, load_dataset
from tests.support.data import standardized


@pytest.fixture(scope="module")
def digits():
    splits = load_dataset("digits", val_fraction=0.1, seed=0)
    standardizer = Standardizer.fit(splits.x_train)
    return (standardized(standardizer, splits.x_train), splits.y_train,
            standardized(standardizer, splits.x_val), splits.y_val)


@pytest.fixture(scope="module")
def small(digits):
    """300 training and 100 validation digits: 5 batches of 64 per epoch."""
    x_train, y_train, x_val, y_val = digits
    return x_train[:300], y_train[:300], x_val[:100], y_val[:100]
