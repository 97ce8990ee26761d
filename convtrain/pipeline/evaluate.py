"""`convtrain evaluate`: a saved model's metrics on a data set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convtrain.errors import ConfigError, DataError
from convtrain.training.metrics import confusion_counts


@dataclass
class EvaluationReport:
    model: str
    data: str
    split: str
    count: int
    loss: float
    accuracy: float
    balanced_accuracy: float
    class_names: list[str]
    confusion: list[list[int]]
    per_class: list[dict]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

def evaluate_model(model_path: str | Path, *, data: str | None = None, data_path: str | None = None,
                   split: str = "auto", limit: int | None = None) -> EvaluationReport:
    """Metrics of a saved model on a data set (by default the one it was trained on)."""
    from convtrain.data import balanced_accuracy, load_dataset
    from convtrain.nn.losses import cross_entropy_sum
    from convtrain.nn.network import Network

    network = Network.load(model_path)
    meta = network.meta or {}
    if split not in ("auto", "test", "val", "train"):
        raise ConfigError(f"split: got {split!r}, expected test, val, train or auto")
    name = data or meta.get("data")
    if name is None:
        raise ConfigError("data: the model does not record its data set; pass --data")
    if data_path is None and data is None:
        data_path = meta.get("data_path")
    same_data = name == meta.get("data")
    splits = load_dataset(name, data_path,
                          val_fraction=meta.get("val_fraction", 0.1) if same_data else 0.1,
                          seed=meta.get("seed", 0) if same_data else 0,
                          limit=meta.get("limit") if same_data else None)
    if split == "auto":
        split = "test" if splits.x_test is not None and len(splits.x_test) else "val"
    x, y = {"test": (splits.x_test, splits.y_test), "val": (splits.x_val, splits.y_val),
            "train": (splits.x_train, splits.y_train)}[split]
    if x is None or not len(x):
        raise DataError(f"data set {name!r} has no {split} split")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if splits.num_classes != network.num_classes:
        raise DataError(f"data set {name!r} has {splits.num_classes} classes, the model {network.num_classes}")
    # The loss from the scores (log-sum-exp): a float32 probability of a confidently wrong
    # prediction underflows to 0, and its log would make the loss infinite.
    loss_sum, predictions = 0.0, np.empty(len(y), dtype=np.int64)
    for start in range(0, len(y), 500):
        scores = network.forward(network.normalize(x[start:start + 500]), train=False)
        loss_sum += cross_entropy_sum(scores, y[start:start + 500])
        predictions[start:start + len(scores)] = scores.argmax(axis=1)
    loss = loss_sum / len(y)
    confusion = confusion_counts(np.asarray(y), predictions, network.num_classes)
    class_names = [str(c) for c in (network.class_names or splits.class_names)]
    per_class = []
    for k, class_name in enumerate(class_names):
        tp = int(confusion[k, k])
        count, predicted = int(confusion[k].sum()), int(confusion[:, k].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / count if count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": class_name, "count": count, "precision": precision, "recall": recall, "f1": f1})
    return EvaluationReport(
        model=str(model_path), data=name, split=split, count=int(len(y)), loss=float(loss),
        accuracy=float(np.mean(predictions == y)),
        balanced_accuracy=float(balanced_accuracy(np.asarray(y), predictions, network.num_classes)),
        class_names=class_names, confusion=confusion.tolist(), per_class=per_class)
