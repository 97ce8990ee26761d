"""Splitting, limiting, standardization, class-balanced batches, augmentation and image files."""

import numpy as np
import pytest

from convtrain.data import (
    DATASETS,
    Standardizer,
    augment_batch,
    class_balanced_indices,
    encode_names,
    load_dataset,
    load_image_file,
    normalize_name,
)
from convtrain.data.split import allocate, split_indices
from convtrain.errors import ConfigError, DataError
from tests.support.data import standardized

# 100 rows of class 0, 30 of class 1, 10 of class 2
LABELS = np.repeat([0, 1, 2], [100, 30, 10])


def test_datasets_names():
    assert DATASETS == ("digits", "mnist", "cifar10", "npz", "names", "folder")


def test_allocate_is_proportional_and_exact():
    counts = np.array([100, 30, 10])
    assert allocate(counts, 14, counts).tolist() == [10, 3, 1]
    assert allocate(counts, 15, counts).sum() == 15
    assert allocate(counts, 137, counts - 1).tolist() == [99, 29, 9]  # caps respected
    with pytest.raises(ValueError):
        allocate(counts, 138, counts - 1)


def test_validation_split_is_stratified_disjoint_and_seeded():
    train, val = split_indices(LABELS, 0.1, seed=7, limit=None)
    assert np.bincount(LABELS[val]).tolist() == [10, 3, 1]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(LABELS)
    again_train, again_val = split_indices(LABELS, 0.1, seed=7, limit=None)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    _, other_val = split_indices(LABELS, 0.1, seed=8, limit=None)
    assert not np.array_equal(val, other_val)


def test_validation_by_count_and_none():
    _, val = split_indices(LABELS, 28, seed=0, limit=None)
    assert np.bincount(LABELS[val]).tolist() == [20, 6, 2]
    _, val = split_indices(LABELS, 28.0, seed=0, limit=None)  # a whole float from a TOML file
    assert len(val) == 28
    train, val = split_indices(LABELS, 0, seed=0, limit=None)
    assert val is None and len(train) == len(LABELS)


def test_validation_never_empties_a_class_from_training():
    labels = np.array([0] * 10 + [1])
    train, val = split_indices(labels, 0.5, seed=0, limit=None)
    assert 1 in labels[train]


def test_limit_keeps_that_many_training_rows_stratified():
    train, val = split_indices(LABELS, 0.1, seed=0, limit=70)
    assert len(train) == 70 and np.bincount(LABELS[train]).tolist() == [50, 15, 5]
    # The fraction is of the rows used: 70 training rows -> 8 validation rows.
    assert len(val) == round(0.1 * 70 / 0.9)
    train, val = split_indices(LABELS, 14, seed=0, limit=1000)
    assert len(train) == len(LABELS) - 14


@pytest.mark.parametrize("val_fraction", [-0.1, 1.5, 140, 200, float("nan"), True, "0.1"])
def test_impossible_val_fraction_is_a_config_error(val_fraction):
    with pytest.raises(ConfigError, match="val_fraction"):
        split_indices(LABELS, val_fraction, seed=0, limit=None)


def test_bad_arguments_to_load_dataset():
    with pytest.raises(ConfigError, match="unknown data set 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="limit"):
        load_dataset("digits", limit=0)


def test_digits_is_built_in():
    splits = load_dataset("digits", val_fraction=0.2, seed=1, limit=500)
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    assert len(splits.y_train) == 500 and splits.x_test is None
    assert splits.x_train.dtype == np.float32 and splits.x_train.max() == 16
    assert splits.y_train.dtype == np.int64
    assert np.abs(np.bincount(splits.y_val) - len(splits.y_val) / 10).max() <= 1.5


def test_standardizer_uses_its_training_data_only():
    rng = np.random.default_rng(0)
    x_train = rng.normal([[[10.0]], [[-3.0]]], [[[2.0]], [[0.5]]], size=(500, 2, 4, 4)).astype(np.float32)
    x_other = x_train + 100
    standardizer = Standardizer.fit(x_train)
    np.testing.assert_allclose(standardizer.mean, x_train.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(standardizer.std, x_train.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-9)
    out = standardized(standardizer, x_train)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-5)
    # Other data is shifted by the training mean, not re-centred on its own.
    np.testing.assert_allclose(standardized(standardizer, x_other).mean(axis=(0, 2, 3)),
                               100 / standardizer.std, rtol=1e-4)
    assert standardized(standardizer, x_train.astype(np.float64)).dtype == np.float64
    assert standardized(standardizer, x_train[0]).shape == (2, 4, 4)


def test_standardizer_round_trips_through_npz(tmp_path):
    standardizer = Standardizer.fit(np.arange(48, dtype=np.uint8).reshape(2, 3, 2, 4))
    np.savez(tmp_path / "s.npz", **standardizer.to_dict())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as stored:
        restored = Standardizer.from_dict(stored)
    np.testing.assert_array_equal(restored.mean, standardizer.mean)
    np.testing.assert_array_equal(restored.std, standardizer.std)


def test_standardizer_constant_channel_and_wrong_channels():
    standardizer = Standardizer.fit(np.full((3, 1, 2, 2), 7.0))
    assert standardizer.std.tolist() == [1.0]
    with pytest.raises(DataError, match="channel"):
        standardized(standardizer, np.zeros((1, 3, 2, 2)))


def test_class_balanced_indices_give_every_class_the_smallest_count():
    rng = np.random.default_rng(0)
    epoch = class_balanced_indices(LABELS, rng)
    assert np.bincount(LABELS[epoch]).tolist() == [10, 10, 10]
    assert len(np.unique(epoch)) == len(epoch)
    assert not np.array_equal(epoch, class_balanced_indices(LABELS, rng))


def test_augment_flips_and_shifts_with_zero_fill():
    x = np.arange(2 * 1 * 4 * 5, dtype=np.float32).reshape(2, 1, 4, 5) + 1
    unchanged = augment_batch(x, np.random.default_rng(0), flip=False, max_shift=0)
    np.testing.assert_array_equal(unchanged, x)
    assert unchanged is not x
    rng = np.random.default_rng(3)
    for _ in range(20):
        out = augment_batch(x, rng, flip=True, max_shift=1)
        assert out.shape == x.shape and out.dtype == x.dtype
        for image, original in zip(out, x):
            # Every image is its original, maybe mirrored, moved by at most one pixel.
            candidates = [original, original[:, :, ::-1]]
            assert any(_is_shift(image[0], c[0], 1) for c in candidates)


def _is_shift(image, original, max_shift):
    height, width = original.shape
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            padded = np.pad(original, max_shift)
            window = padded[max_shift - dy:max_shift - dy + height, max_shift - dx:max_shift - dx + width]
            if np.array_equal(window, image):
                return True
    return False


def test_encode_names_matches_a_hand_encoding():
    encoded = encode_names(["Abé", "zz?"], alphabet="abez", max_len=4)
    assert encoded.shape == (2, 1, 4, 4) and encoded.dtype == np.float32
    expected_first = np.zeros((4, 4))
    expected_first[[0, 1, 2], [0, 1, 2]] = 1
    np.testing.assert_array_equal(encoded[0, 0], expected_first)
    # '?' is not in the alphabet: its column stays empty
    assert encoded[1, 0, 3, :2].tolist() == [1, 1] and encoded[1, 0, :, 2].sum() == 0
    assert normalize_name(" Schultheiß ") == "schultheiss" and normalize_name("Marszałek") == "marszalek"


def test_load_image_file(tmp_path):
    from PIL import Image

    rgb = np.zeros((6, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    Image.fromarray(np.full((6, 5), 17, np.uint8)).save(tmp_path / "gray.png")
    colour = load_image_file(tmp_path / "colour.png")
    assert colour.shape == (3, 6, 5) and colour[0].max() == 200 and colour[1].max() == 0
    gray = load_image_file(tmp_path / "gray.png")
    assert gray.shape == (6, 5) and gray.max() == 17
    (tmp_path / "fake.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="fake.png: not a readable image"):
        load_image_file(tmp_path / "fake.png")
    with pytest.raises(DataError, match="no such image file"):
        load_image_file(tmp_path / "absent.png")
