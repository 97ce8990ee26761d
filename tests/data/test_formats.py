"""Each format reader on small files written here: good files load, bad ones raise DataError."""

import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from convtrain.data import load_dataset
from convtrain.errors import DataError

# ---- MNIST IDX ---------------------------------------------------------------------------


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def write_mnist(directory, n_train=30, n_test=10, compress=False, **overrides):
    """A tiny MNIST directory; overrides replace a file's bytes by name (without .gz)."""
    rng = np.random.default_rng(0)
    contents = {
        "train-images-idx3-ubyte": idx_images(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": idx_labels(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": idx_images(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_labels(np.arange(n_test) % 10),
    }
    contents.update(overrides)
    directory.mkdir(exist_ok=True)
    for name, data in contents.items():
        if data is None:
            continue
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return directory


def load_mnist_dir(directory):
    return load_dataset("mnist", directory, val_fraction=0)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_raw_and_gzip_load_the_same_pixels(tmp_path, compress):
    splits = load_mnist_dir(write_mnist(tmp_path / "m", compress=compress))
    expected = np.random.default_rng(0).integers(0, 256, (30, 28, 28))
    assert splits.x_train.shape == (30, 1, 28, 28) and splits.x_train.dtype == np.float32
    np.testing.assert_array_equal(splits.x_train[:, 0], expected)
    assert splits.y_train.tolist() == [i % 10 for i in range(30)]
    assert splits.x_test.shape == (10, 1, 28, 28)


def test_mnist_without_test_files_has_no_test_set(tmp_path):
    directory = write_mnist(tmp_path / "m", **{"t10k-images-idx3-ubyte": None, "t10k-labels-idx1-ubyte": None})
    splits = load_mnist_dir(directory)
    assert splits.x_test is None and "no t10k files" in splits.source


def expect_data_error(fragment, load, *args, **kwargs):
    with pytest.raises(DataError) as caught:
        load(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert fragment in message, message
    return message


def test_mnist_truncated_gzip(tmp_path):
    directory = write_mnist(tmp_path / "m", compress=True)
    path = directory / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-2000])
    message = expect_data_error("truncated gzip", load_mnist_dir, directory)
    assert "train-images-idx3-ubyte.gz" in message


def test_mnist_corrupt_gzip(tmp_path):
    directory = write_mnist(tmp_path / "m", compress=True)
    path = directory / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC32 trailer
    path.write_bytes(bytes(data))
    expect_data_error("corrupt gzip", load_mnist_dir, directory)


def test_mnist_truncated_raw_payload(tmp_path):
    images = idx_images(np.zeros((30, 28, 28)))[:-5]
    directory = write_mnist(tmp_path / "m", **{"train-images-idx3-ubyte": images})
    expect_data_error("truncated: header declares 30 images of 28x28", load_mnist_dir, directory)


def test_mnist_wrong_magic(tmp_path):
    # A label file where the image file should be: the magic number says so.
    directory = write_mnist(tmp_path / "m", **{"train-images-idx3-ubyte": idx_labels(np.zeros(30))})
    expect_data_error("magic number 2049, expected 2051", load_mnist_dir, directory)


def test_mnist_count_mismatch(tmp_path):
    directory = write_mnist(tmp_path / "m", **{"train-labels-idx1-ubyte": idx_labels(np.zeros(29))})
    expect_data_error("29 labels, but train-images-idx3-ubyte has 30 images", load_mnist_dir, directory)


def test_mnist_label_out_of_range(tmp_path):
    labels = np.arange(30) % 10
    labels[4] = 11
    directory = write_mnist(tmp_path / "m", **{"train-labels-idx1-ubyte": idx_labels(labels)})
    expect_data_error("label 11 out of range", load_mnist_dir, directory)


def test_mnist_empty_and_missing_files(tmp_path):
    directory = write_mnist(tmp_path / "m", **{"t10k-labels-idx1-ubyte": b""})
    expect_data_error("t10k-labels-idx1-ubyte: empty file", load_mnist_dir, directory)
    directory = write_mnist(tmp_path / "n", **{"train-labels-idx1-ubyte": None})
    expect_data_error("train-labels-idx1-ubyte: missing", load_mnist_dir, directory)
    expect_data_error("no such directory", load_mnist_dir, tmp_path / "absent")


# ---- CIFAR-10 pickles --------------------------------------------------------------------


def write_cifar(directory, batches, meta=True, protocol=4):
    directory.mkdir(parents=True, exist_ok=True)
    if meta:
        names = [name.encode() for name in ["airplane", "automobile", "bird", "cat", "deer",
                                            "dog", "frog", "horse", "ship", "truck"]]
        (directory / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=3))
    for name, batch in batches.items():
        data = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=protocol)
        (directory / name).write_bytes(data)
    return directory


def cifar_batch(n, offset=0):
    data = (np.arange(n * 3072) + offset).astype(np.uint8).reshape(n, 3072)
    return {b"data": data, b"labels": [i % 10 for i in range(n)], b"batch_label": b"test"}


def test_cifar_batches_and_test_batch(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", {
        "data_batch_1": cifar_batch(20), "data_batch_3": cifar_batch(10, 7), "test_batch": cifar_batch(5)})
    splits = load_dataset("cifar10", tmp_path, val_fraction=0)  # the parent directory
    assert splits.x_train.shape == (30, 3, 32, 32) and splits.x_test.shape == (5, 3, 32, 32)
    assert "data_batch_1, data_batch_3 (30 images); test_batch (5 images)" in splits.source
    # Row layout: 1024 red values, then green, then blue.
    row = cifar_batch(20)[b"data"][1]
    np.testing.assert_array_equal(splits.x_train[1, 1].ravel(), row[1024:2048])


def test_cifar_accepts_numpy1_spelling_of_reconstruct(tmp_path):
    # Protocol 3 writes globals as text, so numpy 2's module name can be swapped for numpy 1's,
    # which is what the official (Python 2, numpy 1) files contain.
    data = pickle.dumps(cifar_batch(10), protocol=3)
    assert b"numpy._core.multiarray\n_reconstruct" in data
    data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    directory = write_cifar(tmp_path / "c", {"data_batch_1": data})
    assert load_dataset("cifar10", directory, val_fraction=0).x_train.shape == (10, 3, 32, 32)


class RunsShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_hostile_pickle_does_not_run_code(tmp_path):
    canary = tmp_path / "canary"
    batch = {b"data": RunsShellCommand(f"touch {canary}"), b"labels": [0]}
    directory = write_cifar(tmp_path / "c", {"data_batch_1": batch}, protocol=3)
    message = expect_data_error("system", load_dataset, "cifar10", directory, val_fraction=0)
    assert "data_batch_1" in message and "refused" in message
    assert not canary.exists()


@pytest.mark.parametrize("obj, protocol, global_name", [
    (np.float64(1.5), 3, "numpy._core.multiarray.scalar"),
    (print, 3, "builtins.print"),
    (np.arange(3), 2, "_codecs.encode"),  # protocol 2 from Python 3 stores bytes through it
])
def test_any_other_global_is_refused_and_named(tmp_path, obj, protocol, global_name):
    batch = {b"data": obj, b"labels": [0]}
    directory = write_cifar(tmp_path / "c", {"data_batch_1": batch}, protocol=protocol)
    expect_data_error(global_name, load_dataset, "cifar10", directory, val_fraction=0)


@pytest.mark.parametrize("batch, fragment", [
    ({b"data": np.array([None] * 3072, dtype=object).reshape(1, 3072), b"labels": [0]}, "uint8 arrays only"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "expected uint8 (N, 3072)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "label 10 out of range"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
    ([1, 2, 3], "expected a dict"),
    (b"", "empty file"),
    (pickle.dumps(cifar_batch(3))[:-100], "not a readable pickle"),
])
def test_cifar_malformed_batches(tmp_path, batch, fragment):
    directory = write_cifar(tmp_path / "c", {"data_batch_1": batch})
    message = expect_data_error(fragment, load_dataset, "cifar10", directory, val_fraction=0)
    assert "data_batch_1" in message


def test_cifar_needs_a_training_batch(tmp_path):
    directory = write_cifar(tmp_path / "c", {"test_batch": cifar_batch(3)})
    expect_data_error("no training batch", load_dataset, "cifar10", directory)


# ---- npz ---------------------------------------------------------------------------------


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_with_test_arrays_and_class_names(tmp_path):
    x = np.random.default_rng(1).random((40, 5, 6))
    path = write_npz(tmp_path / "d.npz", x=x, y=np.arange(40) % 4, x_test=x[:8], y_test=np.arange(8) % 4,
                     class_names=np.array(["a", "b", "c", "d"]))
    splits = load_dataset("npz", path, val_fraction=0)
    assert splits.input_shape == (1, 5, 6) and splits.x_train.dtype == np.float32
    assert splits.class_names == ["a", "b", "c", "d"] and splits.x_test.shape == (8, 1, 5, 6)
    np.testing.assert_allclose(splits.x_train[:, 0], x, rtol=1e-6)


def test_npz_without_class_names_numbers_the_classes(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((6, 2, 3, 3), np.uint8), y=np.array([0, 2, 1, 2, 0, 1.0]))
    splits = load_dataset("npz", path, val_fraction=0)
    assert splits.class_names == ["0", "1", "2"] and splits.y_train.dtype == np.int64


@pytest.mark.parametrize("arrays, fragment", [
    (dict(x=np.array([[1, "a"]], dtype=object), y=np.array([0])), "dtype=object"),
    (dict(x=np.array([[[np.nan, 1.0]]]), y=np.array([0])), "1 NaN or infinite"),
    (dict(x=np.full((1, 2, 2), np.inf), y=np.array([0])), "4 NaN or infinite"),
    (dict(x=np.zeros((2, 3, 3)), y=np.array([0, -1])), "label -1 out of range"),
    (dict(x=np.zeros((2, 3, 3)), y=np.array([0, 1.5])), "not whole numbers"),
    (dict(x=np.zeros((2, 3, 3)), y=np.array([0, 2]), class_names=np.array(["a", "b"])), "label 2 out of range"),
    (dict(x=np.zeros((2, 3, 3)), y=np.array([0, 1, 1])), "expected (2,)"),
    (dict(x=np.zeros((2, 3)), y=np.array([0, 1])), "expected (N, C, H, W) or (N, H, W)"),
    (dict(x=np.zeros((0, 3, 3)), y=np.array([], dtype=int)), "is empty"),
    (dict(x=np.zeros((2, 3, 3)), y=np.array([0, 1]), x_test=np.zeros((1, 3, 3))), "only one of x_test"),
    (dict(x=np.zeros((2, 3, 3)), y=np.array([0, 1]), x_test=np.zeros((1, 4, 3)), y_test=np.array([0])),
     "x_test images are"),
    (dict(y=np.array([0, 1])), "no array 'x'"),
])
def test_npz_bad_contents(tmp_path, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    message = expect_data_error(fragment, load_dataset, "npz", path, val_fraction=0)
    assert "bad.npz" in message


def test_npz_not_a_zip_or_missing(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    expect_data_error("not a readable .npz", load_dataset, "npz", tmp_path / "junk.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    expect_data_error("empty.npz", load_dataset, "npz", tmp_path / "empty.npz")
    expect_data_error("no such file", load_dataset, "npz", tmp_path / "absent.npz")


# ---- names -------------------------------------------------------------------------------


def write_names(directory, files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return directory


def test_names_are_folded_and_one_hot_encoded(tmp_path):
    directory = write_names(tmp_path / "n", {
        "German.txt": "Groß\nMüller\n\n", "Spanish.txt": "Ñáñez\nDe la Cruz\n", "Irish.txt": "O'Brien\n"})
    splits = load_dataset("names", directory, val_fraction=0)
    assert splits.class_names == ["German", "Irish", "Spanish"]
    assert splits.meta["alphabet"] == " 'abcdegilmnorsuz"
    assert splits.meta["max_len"] == len("de la cruz")
    first = splits.x_train[0, 0]  # "gross", zero-padded to 10 columns
    alphabet = splits.meta["alphabet"]
    assert [alphabet[row] for row in first.argmax(axis=0)[:5]] == list("gross")
    assert first[:, 5:].sum() == 0 and first.sum() == 5


def test_a_names_fit_feeds_the_one_hot_encoding_unstandardized(tmp_path):
    """Standardizing the single one-hot channel would make every empty cell -mean/std instead of
    0; names are a data set whose input is used as encoded, images are standardized."""
    from convtrain.config import FitConfig
    from convtrain.pipeline.fit import fit

    languages = {"German.txt": "Mueller\nSchmidt\nSchneider\nFischer\nWeber\nWagner\n",
                 "Irish.txt": "Obrien\nMurphy\nKelly\nWalsh\nByrne\nRyan\n"}
    directory = write_names(tmp_path / "n", languages)
    assert load_dataset("names", directory, val_fraction=0).standardize is False
    assert load_dataset("digits", val_fraction=0).standardize is True
    config = FitConfig(data="names", data_path=str(directory), val_fraction=0, filters=[4],
                       kernel_sizes=[[17, 3]], epochs=1, batch_size=4, track=False, out=str(tmp_path / "out"))
    result = fit(config, progress=None)
    assert result.network.normalization is None
    x = load_dataset("names", directory, val_fraction=0).x_train
    assert np.array_equal(result.network.normalize(x), x)  # zeros stay zeros
    digits = fit(FitConfig(limit=100, filters=[4], epochs=1, track=False, out=str(tmp_path / "d")), progress=None)
    assert digits.network.normalization is not None


def test_dd2424_layout(tmp_path):
    names = "".join(f"{name} {label}\n" for name, label in
                    [("Abadi", 1), ("Nassar", 1), ("Ng", 2), ("Van Der Berg", 2), ("Li", 2), ("Haddad", 1)])
    directory = write_names(tmp_path / "dd", {
        "ascii_names.txt": names, "category_labels.txt": "1 Arabic\n2 Chinese\n", "Validation_Inds.txt": "2 5\n"})
    splits = load_dataset("names", directory, val_fraction=0)
    assert splits.class_names == ["Arabic", "Chinese"]
    assert splits.y_test.tolist() == [0, 1] and len(splits.y_train) == 4
    assert splits.meta["max_len"] == len("van der berg")
    assert "Validation_Inds.txt held out as the test set" in splits.source


@pytest.mark.parametrize("files, fragment", [
    ({"Czech.txt": "", "Dutch.txt": "Smit\n"}, "Czech.txt: empty file"),
    ({"Czech.txt": b"Nov\xe1k\n"}, "not UTF-8"),
    ({"README.md": "no names here"}, "no <Language>.txt files"),
    ({"ascii_names.txt": "Abadi 1\n", "category_labels.txt": "1 Arabic\n", "Validation_Inds.txt": "3\n"},
     "index 3 out of range"),
    ({"ascii_names.txt": "Abadi 3\n", "category_labels.txt": "1 Arabic\n"}, "class 3 out of range"),
    ({"ascii_names.txt": "Abadi\n", "category_labels.txt": "1 Arabic\n"}, "is not '<name> <class number>'"),
    ({"ascii_names.txt": "Abadi 1\n", "category_labels.txt": "1 Arabic\n3 Chinese\n"}, "are not 1..2"),
])
def test_names_bad_files(tmp_path, files, fragment):
    directory = write_names(tmp_path / "n", files)
    expect_data_error(fragment, load_dataset, "names", directory, val_fraction=0)


# ---- digits -------------------------------------------------------------------------------------

def test_digits_are_scikit_learns_without_importing_it():
    from sklearn.datasets import load_digits

    from convtrain.data.digits import load_digits_data

    ours, theirs = load_digits_data(), load_digits()
    np.testing.assert_array_equal(ours.x[:, 0], theirs.images.astype(np.float32))
    np.testing.assert_array_equal(ours.y, theirs.target)
    assert ours.x.shape == (1797, 1, 8, 8) and ours.class_names == [str(k) for k in range(10)]
    child = subprocess.run([sys.executable, "-c", "import sys; from convtrain.data.digits import load_digits_data; "
                            "load_digits_data(); print('sklearn' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "False", child.stderr
