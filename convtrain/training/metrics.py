"""What a network scores on a split: the one evaluation loop, and the per-class numbers.

`evaluate_network` is the only loop that scores a data set: the trainer's per-epoch evaluation
(Trainer.evaluate), the final test evaluation of a fit and `convtrain evaluate` all go through
it. The confusion matrix is one np.bincount and balanced accuracy a count per class, so a fit
never imports scikit-learn. The per-class table (precision, recall, F1) of `convtrain evaluate`
comes from scikit-learn, one owner for those formulas across the ML stack, imported only there
(its import, with scipy.stats and scipy.sparse, takes about a second).
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


def evaluate_network(network, x, y, *, l2: float = 0.0, batch_size: int = EVAL_BATCH_SIZE, normalize: bool = False,
                     return_predictions: bool = False):
    """loss, cost, accuracy and balanced accuracy of `network` on (x, y) in eval mode, a batch
    at a time; with return_predictions, also the predicted labels (N,).

    x is network input, or raw images normalized batch by batch when `normalize` (so a large
    test set is never held normalized in full). The loss comes from the scores (log-sum-exp):
    a float32 probability of a confidently wrong prediction underflows to 0, and its log would
    make the loss infinite.
    """
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


class RunningMetrics:
    """The training metrics of an epoch from its own forward passes: the running mean Keras and
    Lightning report, at no extra cost.

    Each batch adds its loss and cost times its size, and its examples and correct predictions
    per class, so `values()` gives the same keys as evaluate_network: loss, cost, accuracy,
    balanced accuracy. Unlike a re-score after the epoch, each batch is scored by the weights
    before its own update, in training mode (dropout active, batch norm on the batch's own
    statistics): the running mean is higher than the end-of-epoch loss while a net learns fast,
    and differs from it more with dropout. The loss is plain cross-entropy even with label
    smoothing, so it stays comparable with val_loss.

    Its state (a few sums) is part of a mid-epoch checkpoint, so a resumed epoch reports the
    same values bit for bit.
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.images = 0
        self.loss_sum = 0.0
        self.cost_sum = 0.0
        self.examples = np.zeros(self.num_classes, dtype=np.int64)
        self.correct = np.zeros(self.num_classes, dtype=np.int64)

    def add(self, scores: np.ndarray, y: np.ndarray, loss: float | None, penalty: float) -> None:
        """One batch: its scores (N, K), labels, mean cross-entropy (None: computed here, when
        the training loss was label-smoothed) and its cost's L2 term."""
        n = len(y)
        loss_sum = float(loss) * n if loss is not None else cross_entropy_sum(scores, y)
        self.images += n
        self.loss_sum += loss_sum
        self.cost_sum += loss_sum + float(penalty) * n
        self.examples += np.bincount(y, minlength=self.num_classes)
        self.correct += np.bincount(y[scores.argmax(axis=1) == y], minlength=self.num_classes)

    def values(self) -> dict[str, float]:
        present = self.examples > 0
        return {"loss": self.loss_sum / self.images, "cost": self.cost_sum / self.images,
                "accuracy": float(self.correct.sum()) / self.images,
                "balanced_accuracy": float(np.mean(self.correct[present] / self.examples[present]))}

    def state_dict(self) -> dict:
        return {"images": self.images, "loss_sum": self.loss_sum, "cost_sum": self.cost_sum,
                "examples": self.examples.tolist(), "correct": self.correct.tolist()}

    @classmethod
    def from_state(cls, state: dict, num_classes: int, where: str) -> "RunningMetrics":
        """Back from state_dict(); a hand-edited or mismatched state is refused in one line."""
        from convtrain.errors import CheckpointError

        running = cls(num_classes)
        try:
            running.images = int(state["images"])
            running.loss_sum, running.cost_sum = float(state["loss_sum"]), float(state["cost_sum"])
            running.examples = np.asarray(state["examples"], dtype=np.int64).reshape(num_classes)
            running.correct = np.asarray(state["correct"], dtype=np.int64).reshape(num_classes)
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{where}: unusable running training metrics ({exc}); expected images, "
                                  f"loss_sum, cost_sum and {num_classes} counts per class") from None
        if running.images < 0 or (running.correct > running.examples).any() or running.correct.min(initial=0) < 0:
            raise CheckpointError(f"{where}: running training metrics count {running.images} images and "
                                  f"more correct than seen, or negative counts")
        return running


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true classes, columns predictions.
    Labels must be in [0, num_classes): one outside would land in another class's cell."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred {y_pred.size}")
    for labels in (y_true, y_pred):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    # cell (t, p) is bin t * num_classes + p
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def per_class_metrics(y_true, y_pred, class_names: list[str]) -> list[dict]:
    """One row per class: count (examples of it), precision, recall and F1; 0 where a ratio
    has nothing to divide by (a class never predicted, or absent from y_true)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, count = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(class_names)), zero_division=0.0)
    return [{"class": name, "count": int(n), "precision": float(p), "recall": float(r), "f1": float(f)}
            for name, p, r, f, n in zip(class_names, precision, recall, f1, count)]
