"""Balanced accuracy by hand; the confusion matrix and per-class table (scikit-learn's, behind
convtrain's label checks): checked against a literal count, by hand on empty classes, and
batching-independent evaluation."""


import numpy as np
import pytest

from convtrain.training.metrics import balanced_accuracy, confusion_matrix, per_class_metrics


def _literal_confusion(y_true, y_pred, k):
    counts = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        counts[t, p] += 1
    return counts


def test_confusion_matrix_counts_rows_true_columns_predicted():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    counts = confusion_matrix(y_true, y_pred, 9)  # two classes absent from both
    assert counts.shape == (9, 9) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, _literal_confusion(y_true, y_pred, 9))
    np.testing.assert_array_equal(confusion_matrix([0, 0, 1], [1, 1, 1], 2), [[0, 2], [0, 1]])


def test_confusion_matrix_refuses_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix([0, 1], [0, -1], 3)
    with pytest.raises(ValueError, match="2 labels but y_pred 1"):
        confusion_matrix([0, 1], [0], 3)


def test_per_class_metrics_by_hand_with_empty_classes():
    # class 0: 2 examples, 1 right, predicted 2x; class 1: 1 example, never predicted;
    # class 2: no examples, predicted once
    rows = per_class_metrics([0, 0, 1], [0, 2, 0], ["a", "b", "c"])
    assert rows[0] == {"class": "a", "count": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert rows[1] == {"class": "b", "count": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rows[2] == {"class": "c", "count": 0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_evaluation_does_not_depend_on_how_the_set_is_batched():
    from convtrain.nn.network import EVAL_BATCH_SIZE, Network
    from convtrain.training.metrics import evaluate_network

    network = Network.build(input_shape=(3, 9, 9), num_classes=4, filters=[5], kernel_sizes=[3],
                            dtype="float64", seed=0)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((EVAL_BATCH_SIZE + 23, 3, 9, 9)), rng.integers(0, 4, EVAL_BATCH_SIZE + 23)
    whole, whole_predictions = evaluate_network(network, x, y, l2=1e-3, batch_size=len(y), return_predictions=True)
    for batch_size in (7, EVAL_BATCH_SIZE):  # a ragged last batch either way
        values, predictions = evaluate_network(network, x, y, l2=1e-3, batch_size=batch_size, return_predictions=True)
        np.testing.assert_array_equal(predictions, whole_predictions)
        assert values.keys() == whole.keys()
        for key in values:
            assert values[key] == pytest.approx(whole[key], rel=1e-12), key


def test_balanced_accuracy_by_hand():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 0])
    # recalls: class 0 3/4, class 1 1/2, class 2 0/1; class 3 has no examples and is skipped
    assert balanced_accuracy(y_true, y_pred, 4) == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert balanced_accuracy(y_true, y_true, 4) == 1.0
    assert np.isnan(balanced_accuracy(np.array([], int), np.array([], int), 3))


def test_confusion_matrix_does_not_import_scikit_learn():
    import subprocess
    import sys

    code = ("import sys; from convtrain.training.metrics import confusion_matrix; "
            "confusion_matrix([0, 1, 2], [0, 2, 2], 3); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
