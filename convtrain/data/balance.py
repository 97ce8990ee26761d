"""Class imbalance: equal-per-class epochs and the accuracy that weighs every class alike."""

from __future__ import annotations

import numpy as np


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean over classes of recall (correct / examples of that class).

    Classes with no examples in y_true are skipped rather than counted as 0 or 1; NaN when
    y_true is empty.
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred {y_pred.size}")
    examples = np.bincount(y_true, minlength=num_classes)
    correct = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    present = examples > 0
    if not present.any():
        return float("nan")
    return float(np.mean(correct[present] / examples[present]))


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
