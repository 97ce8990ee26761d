"""`convtrain evaluate`'s numbers: loss, accuracy, the confusion matrix and the per-class table,
checked against their definitions written out in full."""

import math

import numpy as np
import pytest

from convtrain.config import FitConfig
from convtrain.data import Standardizer, load_dataset
from convtrain.nn.network import Network
from convtrain.pipeline.evaluate import evaluate_model


@pytest.fixture(scope="module")
def model_and_split(tmp_path_factory):
    """An untrained network (so every class is predicted now and then, some never) saved as
    `convtrain fit` saves one, and the validation split evaluate will read."""
    splits = load_dataset("digits", val_fraction=0.1, seed=0)
    network = Network.from_config(FitConfig(filters=[4], seed=3), splits.input_shape, splits.num_classes)
    network.normalization = {k: v.tolist() for k, v in Standardizer.fit(splits.x_train).to_dict().items()}
    network.class_names = list(splits.class_names)
    network.meta = {"data": "digits", "data_path": None, "val_fraction": 0.1, "seed": 0, "limit": None}
    path = network.save(tmp_path_factory.mktemp("model") / "model.npz")
    return path, network, splits.x_val, splits.y_val


def test_evaluate_reports_the_defined_numbers(model_and_split):
    path, network, x, y = model_and_split
    report = evaluate_model(path, split="val")
    assert (report.split, report.count) == ("val", len(y))

    scores = network.forward(network.normalize(x)).astype(np.float64)
    log_probabilities = scores - scores.max(axis=1, keepdims=True)
    log_probabilities -= np.log(np.exp(log_probabilities).sum(axis=1, keepdims=True))
    assert report.loss == pytest.approx(-log_probabilities[np.arange(len(y)), y].mean(), rel=1e-5)
    predicted = scores.argmax(axis=1)
    assert report.accuracy == pytest.approx(np.mean(predicted == y))

    k = network.num_classes
    confusion = [[sum(1 for t, p in zip(y, predicted) if t == i and p == j) for j in range(k)] for i in range(k)]
    assert report.confusion == confusion
    recalls = [confusion[i][i] / sum(confusion[i]) for i in range(k) if sum(confusion[i])]
    assert report.balanced_accuracy == pytest.approx(sum(recalls) / len(recalls))
    assert any(sum(row[j] for row in confusion) == 0 for j in range(k)), "a class never predicted: 0, not NaN"
    for i, row in enumerate(report.per_class):
        true_positives = confusion[i][i]
        count, predicted_as = sum(confusion[i]), sum(r[i] for r in confusion)
        precision = true_positives / predicted_as if predicted_as else 0.0
        recall = true_positives / count if count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert row["class"] == str(network.class_names[i]) and row["count"] == count
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision, recall, f1))
        assert all(math.isfinite(row[m]) for m in ("precision", "recall", "f1"))


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_one_is_refused_not_sliced(model_and_split, limit):
    from convtrain.errors import ConfigError

    with pytest.raises(ConfigError, match=f"limit: got {limit}, expected a positive number"):
        evaluate_model(model_and_split[0], split="val", limit=limit)
    assert evaluate_model(model_and_split[0], split="val", limit=7).count == 7
