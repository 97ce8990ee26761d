"""The loaders on the real data sets of CONVTRAIN_TEST_DATA (see their READMEs for the numbers)."""

import numpy as np
import pytest

from convtrain.data import load_dataset
from convtrain.training.metrics import balanced_accuracy

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]
CIFAR_COUNTS = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]
CIFAR_FIRST_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3, 4, 7, 7, 2, 9, 9, 9, 3, 2, 6]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_mnist_has_the_official_counts_and_labels(test_data_dir):
    splits = load_dataset("mnist", test_data_dir / "mnist", val_fraction=0)
    assert splits.x_train.shape == (60000, 1, 28, 28) and splits.x_train.dtype == np.float32
    assert splits.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(splits.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(splits.y_test).tolist() == MNIST_TEST_COUNTS
    assert splits.y_test[:20].tolist() == MNIST_FIRST_TEST_LABELS
    assert splits.x_val is None and splits.class_names == [str(d) for d in range(10)]
    assert splits.x_test.min() == 0 and splits.x_test.max() == 255
    assert splits.x_test.mean(dtype=np.float64) == pytest.approx(33.791, abs=1e-3)


def test_mnist_validation_split_keeps_class_proportions(test_data_dir):
    splits = load_dataset("mnist", test_data_dir / "mnist", val_fraction=0.1, seed=3)
    assert len(splits.y_val) == 6000 and len(splits.y_train) == 54000
    expected = np.asarray(MNIST_TRAIN_COUNTS) * 0.1
    assert np.abs(np.bincount(splits.y_val) - expected).max() < 1


def test_cifar10_subset_has_the_official_labels(test_data_dir):
    splits = load_dataset("cifar10", test_data_dir / "cifar10", val_fraction=0)
    assert splits.x_train.shape == (4000, 3, 32, 32) and splits.x_test is None
    assert np.bincount(splits.y_train).tolist() == CIFAR_COUNTS
    assert splits.y_train[:20].tolist() == CIFAR_FIRST_LABELS
    assert splits.class_names == CIFAR_CLASSES
    assert "data_batch_1 (4000 images)" in splits.source and "no test_batch" in splits.source


def test_cifar10_accepts_the_batches_directory_itself(test_data_dir):
    splits = load_dataset("cifar10", test_data_dir / "cifar10" / "cifar-10-batches-py", val_fraction=400)
    assert len(splits.y_val) == 400 and len(splits.y_train) == 3600


def test_names_tutorial_files(test_data_dir):
    splits = load_dataset("names", test_data_dir / "names", val_fraction=0.1)
    assert len(splits.y_train) + len(splits.y_val) == 20074
    assert splits.num_classes == 18
    assert splits.class_names[0] == "Arabic" and splits.class_names[-1] == "Vietnamese"
    alphabet, max_len = splits.meta["alphabet"], splits.meta["max_len"]
    assert splits.input_shape == (1, len(alphabet), max_len)
    assert set("abcdefghijklmnopqrstuvwxyz") <= set(alphabet) and alphabet == alphabet.lower()
    # One letter per position: every column holds at most a single 1.
    assert splits.x_train.sum(axis=2).max() == 1
    counts = np.bincount(np.concatenate([splits.y_train, splits.y_val]))
    assert counts[splits.class_names.index("Russian")] == 9408
    assert counts[splits.class_names.index("Vietnamese")] == 73


def test_names_dd2424_holds_out_the_course_validation_names(test_data_dir):
    splits = load_dataset("names", test_data_dir / "names" / "dd2424", val_fraction=0)
    assert len(splits.y_test) == 216 and len(splits.y_train) == 17421 - 216
    assert np.bincount(splits.y_test).tolist() == [12] * 18
    assert splits.meta["max_len"] == 19
    # A classifier that always answers "Russian" scores 1/18 balanced on the held-out names.
    always_russian = np.full(216, splits.class_names.index("Russian"))
    assert balanced_accuracy(splits.y_test, always_russian, 18) == pytest.approx(1 / 18)
