"""What a trained network scores on a split: the metrics record and the confusion counts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Evaluation:
    split: str
    metrics: dict[str, float]  # test_loss, test_accuracy, ... (prefixed by the split)
    confusion: np.ndarray
    class_names: list[str]

def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are true classes, columns predictions."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)
