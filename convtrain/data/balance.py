"""Class imbalance: epochs that show every class equally often (the accuracy that weighs every
class alike is a metric: convtrain.training.metrics.balanced_accuracy)."""

from __future__ import annotations

import numpy as np


def class_balanced_indices(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch of row indices with every class equally often, shuffled.

    As in DD2424's surname ConvNet: each epoch draws, without replacement, as many rows from
    every class as the smallest class has, so an epoch is num_present_classes * smallest rows
    and the large classes show a different subset each epoch.
    """
    y = np.asarray(y).reshape(-1)
    classes, counts = np.unique(y, return_counts=True)
    if classes.size == 0:
        return np.empty(0, dtype=np.int64)
    per_class = int(counts.min())
    rows_by_class = np.argsort(y, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    picked = [rng.choice(rows_by_class[start:start + count], size=per_class, replace=False)
              for start, count in zip(starts, counts)]
    return rng.permutation(np.concatenate(picked)).astype(np.int64)
