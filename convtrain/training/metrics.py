"""What a network scores on a split: the one evaluation loop, and the per-class numbers.

`evaluate_network` is the only loop that scores a data set: the trainer's per-epoch evaluation
(Trainer.evaluate), the final test evaluation of a fit and `convtrain evaluate` all go through
it. The confusion matrix and the per-class table are counted with numpy: scikit-learn would
give the same numbers, but importing it (with scipy.stats and scipy.sparse) takes about a
second, which every fit would pay for a 10 x 10 table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convtrain.nn.losses import cross_entropy_sum
from convtrain.nn.network import EVAL_BATCH_SIZE


@dataclass
class Evaluation:
    split: str
    metrics: dict[str, float]  # test_loss, test_accuracy, ... (prefixed by the split)
    confusion: np.ndarray
    class_names: list[str]


def evaluate_network(network, x, y, *, l2: float = 0.0, batch_size: int = EVAL_BATCH_SIZE, normalize: bool = False,
                     return_predictions: bool = False):
    """loss, cost, accuracy and balanced accuracy of `network` on (x, y) in eval mode, a batch
    at a time; with return_predictions, also the predicted labels (N,).

    x is network input, or raw images normalized batch by batch when `normalize` (so a large
    test set is never held normalized in full). The loss comes from the scores (log-sum-exp):
    a float32 probability of a confidently wrong prediction underflows to 0, and its log would
    make the loss infinite.
    """
    from convtrain.data import balanced_accuracy

    y = np.asarray(y)
    loss_sum = 0.0
    predictions = np.empty(len(y), dtype=np.int64)
    for start in range(0, len(y), batch_size):
        stop = start + batch_size
        batch = network.normalize(x[start:stop]) if normalize else x[start:stop]
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite: divergence, reported by fit
            scores = network.forward(batch, train=False)
            loss_sum += cross_entropy_sum(scores, y[start:stop])
        predictions[start:stop] = scores.argmax(axis=1)
    loss = loss_sum / len(y)
    values = {
        "loss": loss,
        "cost": loss + l2 * network.l2_penalty(),
        "accuracy": float(np.mean(predictions == y)),
        "balanced_accuracy": balanced_accuracy(y, predictions, network.num_classes),
    }
    return (values, predictions) if return_predictions else values


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true classes, columns predictions.
    Labels must be in [0, num_classes)."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred {y_pred.size}")
    for labels in (y_true, y_pred):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    cells = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return cells.reshape(num_classes, num_classes)


def per_class_metrics(y_true, y_pred, class_names: list[str]) -> list[dict]:
    """One row per class: count (examples of it), precision, recall and F1; 0 where a ratio
    has nothing to divide by (a class never predicted, or absent from y_true)."""
    counts = confusion_matrix(y_true, y_pred, len(class_names))
    correct = np.diag(counts).astype(np.float64)
    examples, predicted = counts.sum(axis=1), counts.sum(axis=0)
    precision = _ratio(correct, predicted)
    recall = _ratio(correct, examples)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return [{"class": name, "count": int(n), "precision": float(p), "recall": float(r), "f1": float(f)}
            for name, p, r, f, n in zip(class_names, precision, recall, f1, examples)]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    out = np.zeros(len(numerator))
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out
