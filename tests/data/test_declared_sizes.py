"""Sizes a data file merely claims are checked before anything is allocated for them.

Every hostile file here is small; what it claims is sized just past a limit (the format's, or a
memory limit lowered with CONVTRAIN_MEMORY_LIMIT), so that the readers' refusals are tested
without any test allocating gigabytes. Where a claim must be refused *before* it is read,
tracemalloc (which sees numpy's and Python's allocations) shows the reader's peak stayed far
below what the file claims.
"""

import gzip
import io
import pickle
import struct
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from numpy._core.multiarray import _reconstruct

from convtrain.data import load_dataset, load_image_file
from convtrain.data.cifar import MAX_BATCH_IMAGES
from convtrain.data.limits import MAX_ALPHABET, MAX_INFERRED_CLASSES, MAX_NAME_LENGTH
from convtrain.errors import DataError
from convtrain.nn.footprint import MEMORY_LIMIT_ENV

MB = 1024 * 1024


def refused(fragment, load, *args, **kwargs) -> tuple[str, int]:
    """(the DataError's one line, the peak bytes allocated while loading)."""
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning on stderr is a failure too
            with pytest.raises(DataError) as caught:
                load(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "\n" not in message
    assert fragment in message, message
    return message, peak


def npy_bytes(shape, descr="<f4", payload=b"") -> bytes:
    """An .npy header (magic included) declaring `shape`, followed by `payload`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + payload


def write_zip(path, entries, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def labels_entry(n):
    buffer = io.BytesIO()
    np.save(buffer, np.arange(n) % 10)
    return buffer.getvalue()


# ---- .npz -----------------------------------------------------------------------------------


def test_a_200_byte_npz_declaring_terabytes_is_refused_unread(tmp_path):
    shape = (1_600_000, 1, 1000, 1000)  # float32: 5.8 TiB
    path = write_zip(tmp_path / "claims.npz", {"x.npy": npy_bytes(shape, payload=b"\0" * 16),
                                                "y.npy": labels_entry(4)})
    assert path.stat().st_size < 600
    message, peak = refused("5.8 TiB", load_dataset, "npz", path, val_fraction=0)
    assert "(1600000, 1, 1000, 1000)" in message and "holds 16 bytes" in message
    assert str(path) in message
    assert peak < 4 * MB


def test_a_zip_entry_claiming_more_than_its_compressed_bytes_can_hold_is_refused(tmp_path):
    """The entry's declared size is forged to match the .npy header: deflate cannot expand
    200 bytes to 400 MB, so the claim is refused before numpy allocates it."""
    header = npy_bytes((100, 1, 1000, 1000), descr="|u1")
    path = write_zip(tmp_path / "forged.npz", {"x.npy": header + b"\0" * 64, "y.npy": labels_entry(100)},
                     zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    claimed = len(header) + 100 * 1000 * 1000
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    # the uncompressed size, in the local header (offset 22) and the central directory (offset 24)
    local = info.header_offset
    data[local + 22:local + 26] = struct.pack("<I", claimed)
    central = data.index(b"PK\x01\x02")
    while data[central + 46:central + 51] != b"x.npy":
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24:central + 28] = struct.pack("<I", claimed)
    path.write_bytes(bytes(data))
    _, peak = refused("compressed data can hold", load_dataset, "npz", path, val_fraction=0)
    assert peak < 4 * MB


def test_a_zip_bomb_npz_is_refused_before_it_is_decompressed(tmp_path, monkeypatch):
    """40 MB of zeros deflate to about 40 KB; with a fit allowed 16 MB the archive is refused
    from its headers, never decompressed."""
    path = tmp_path / "bomb.npz"
    count = 40 * MB
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as entry:
            entry.write(npy_bytes((count // 64, 1, 8, 8), descr="|u1"))
            block = bytes(MB)
            for _ in range(count // MB):
                entry.write(block)
        archive.writestr("y.npy", labels_entry(count // 64))
    assert path.stat().st_size < MB
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(32 * MB))
    message, peak = refused("needs", load_dataset, "npz", path, val_fraction=0)
    assert "a fit may use" in message and "40.0 MiB" in message
    assert peak < 4 * MB


def test_an_honest_npz_within_the_limits_still_loads(tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(32 * MB))
    np.savez_compressed(tmp_path / "ok.npz", x=np.zeros((50, 1, 8, 8), np.uint8), y=np.arange(50) % 5)
    assert load_dataset("npz", tmp_path / "ok.npz", val_fraction=0).x_train.shape == (50, 1, 8, 8)


def test_a_label_past_the_sane_class_count_is_refused_without_class_names(tmp_path):
    """Without class_names the classes are 0..highest label; a label of 10**9 would make a
    billion classes (a one-hot of gigabytes)."""
    y = np.arange(20) % 10
    y[3] = MAX_INFERRED_CLASSES
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 1, 4, 4)), y=y)
    message, _ = refused(f"label {MAX_INFERRED_CLASSES}", load_dataset, "npz", tmp_path / "d.npz", val_fraction=0)
    assert "class_names" in message
    # with that many class names, the same label is fine
    names = np.array([f"c{i}" for i in range(MAX_INFERRED_CLASSES + 1)])
    np.savez(tmp_path / "named.npz", x=np.zeros((20, 1, 4, 4)), y=y, class_names=names)
    assert load_dataset("npz", tmp_path / "named.npz", val_fraction=0).num_classes == MAX_INFERRED_CLASSES + 1


def test_a_float_label_of_1e20_is_refused_without_a_runtime_warning(tmp_path):
    y = (np.arange(20) % 10).astype(np.float64)
    y[5] = 1e20
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 1, 4, 4)), y=y)
    refused("label 1e+20, too large", load_dataset, "npz", tmp_path / "d.npz", val_fraction=0)


# ---- MNIST IDX ------------------------------------------------------------------------------


def idx_header(count, rows=28, cols=28) -> bytes:
    return struct.pack(">IIII", 2051, count, rows, cols)


def mnist_dir(tmp_path, images: bytes, count: int) -> object:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "train-images-idx3-ubyte.gz").write_bytes(images)
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">II", 2049, count) + bytes(count)))
    return directory


def gzip_stream(header: bytes, zeros: int) -> bytes:
    """header + `zeros` zero bytes, gzipped a megabyte at a time (never held whole)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as stream:
        stream.write(header)
        block = bytes(MB)
        for start in range(0, zeros, MB):
            stream.write(block[:min(MB, zeros - start)])
    return out.getvalue()


def test_a_gzip_inflating_past_its_header_is_read_no_further(tmp_path):
    """The header declares 10 images; the stream inflates to 40 MB. Only the declared bytes
    (and one more, to see there is more) are ever decompressed."""
    directory = mnist_dir(tmp_path, gzip_stream(idx_header(10), 40 * MB), 10)
    message, peak = refused("decompresses to more than the 7840 bytes", load_dataset, "mnist", directory,
                            val_fraction=0)
    assert "train-images-idx3-ubyte.gz" in message
    assert peak < 4 * MB


def test_a_gzip_whose_header_declares_more_than_memory_allows_is_refused_unread(tmp_path, monkeypatch):
    count = 40 * MB // 784
    directory = mnist_dir(tmp_path, gzip_stream(idx_header(count), count * 784), count)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(32 * MB))
    message, peak = refused(f"declares {count} images of 28x28", load_dataset, "mnist", directory, val_fraction=0)
    assert "a fit may use" in message
    assert peak < 4 * MB


def test_a_raw_idx_file_is_checked_against_its_size_before_it_is_read(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "train-images-idx3-ubyte").write_bytes(idx_header(2_700_000, 1000, 1000) + bytes(100))
    (directory / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 3) + bytes(3))
    refused("truncated: header declares 2700000 images of 1000x1000", load_dataset, "mnist", directory,
            val_fraction=0)


# ---- CIFAR-10 pickles -----------------------------------------------------------------------


class Declares:
    """Pickles as _reconstruct(ndarray, shape, dtype): numpy's own opening move, with a shape
    of the attacker's choosing and no pixel data in the file at all."""

    def __init__(self, shape, dtype="u1", callable_=_reconstruct, with_subtype=True):
        self.args = (np.ndarray, shape, dtype) if with_subtype else (shape, dtype)
        self.callable = callable_

    def __reduce__(self):
        return self.callable, self.args


def write_cifar(tmp_path, batch) -> object:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    (directory / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=4))
    return directory


def test_a_tiny_cifar_pickle_declaring_more_images_than_a_batch_holds_is_refused(tmp_path):
    n = MAX_BATCH_IMAGES + 1
    directory = write_cifar(tmp_path, {b"data": Declares((n, 3072)), b"labels": Declares((n,), "<i8")})
    assert (directory / "data_batch_1").stat().st_size < 300
    message, peak = refused("more than a CIFAR batch", load_dataset, "cifar10", directory, val_fraction=0)
    assert "data_batch_1" in message and "10,000 images" in message
    assert peak < 4 * MB


def test_many_small_reconstructed_arrays_count_together(tmp_path):
    arrays = [Declares((MAX_BATCH_IMAGES // 4, 3072)) for _ in range(5)]
    directory = write_cifar(tmp_path, {b"data": arrays, b"labels": []})
    refused("more than a CIFAR batch", load_dataset, "cifar10", directory, val_fraction=0)


def test_calling_ndarray_directly_from_a_pickle_is_refused(tmp_path):
    directory = write_cifar(tmp_path, {b"data": Declares(((MAX_BATCH_IMAGES * 70, 3072), "u1"),
                                                          callable_=np.ndarray, with_subtype=False),
                                       b"labels": []})
    refused("numpy.ndarray directly", load_dataset, "cifar10", directory, val_fraction=0)


def test_cifar_labels_nested_past_numpys_64_dimensions(tmp_path):
    labels = [0]
    for _ in range(70):
        labels = [labels]
    directory = write_cifar(tmp_path, {b"data": np.zeros((1, 3072), np.uint8), b"labels": labels})
    refused("nests lists or dicts deeper", load_dataset, "cifar10", directory, val_fraction=0)


# ---- names ----------------------------------------------------------------------------------


def write_files(directory, files):
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def test_a_surname_longer_than_any_name_is_refused_before_encoding(tmp_path):
    directory = write_files(tmp_path / "n", {"English.txt": "smith\n" + "a" * 200_000 + "\n",
                                             "German.txt": "muller\n"})
    message, peak = refused(f"line 2: a name of 200000 characters, more than the {MAX_NAME_LENGTH}",
                            load_dataset, "names", directory, val_fraction=0)
    assert "English.txt" in message
    assert peak < 8 * MB


def test_an_alphabet_of_thousands_of_letters_is_refused(tmp_path):
    letters = [chr(0x4E00 + i) for i in range(MAX_ALPHABET + 1)]  # CJK: no ASCII folding
    names = "\n".join("".join(letters[i:i + 8]) for i in range(0, len(letters), 8))
    directory = write_files(tmp_path / "n", {"Chinese.txt": names, "English.txt": "smith\n"})
    refused(f"different letters, more than the {MAX_ALPHABET}", load_dataset, "names", directory, val_fraction=0)


def test_a_names_encoding_past_memory_is_refused(tmp_path, monkeypatch):
    names = "\n".join("abcdefghijklmnopqrstuvwxyz"[i % 26] * 200 for i in range(2000))
    directory = write_files(tmp_path / "n", {"A.txt": names, "B.txt": names})
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(32 * MB))
    refused("4000 names of up to 200 letters", load_dataset, "names", directory, val_fraction=0)


DD2424 = {"category_labels.txt": "1 Arabic\n2 Chinese\n"}


@pytest.mark.parametrize("files, fragment", [
    ({"ascii_names.txt": "Abadi 1\nBai ²\n"}, "line 2: 'Bai ²' is not '<name> <class number>'"),
    ({"ascii_names.txt": "Abadi 1\nBai " + "9" * 5000 + "\n"}, "line 2:"),
    ({"ascii_names.txt": "Abadi 1\nBai 99999999999999999\n"}, "class 99999999999999999 out of range"),
    ({"category_labels.txt": "1 Arabic\n² Chinese\n", "ascii_names.txt": "Abadi 1\n"},
     "line 2: '² Chinese' is not '<class number> <language>'"),
    ({"category_labels.txt": "1 Arabic\n" + "9" * 5000 + " Chinese\n", "ascii_names.txt": "Abadi 1\n"}, "line 2:"),
    ({"ascii_names.txt": "Abadi 1\nBai 2\n", "Validation_Inds.txt": "1 " + "9" * 30 + "\n"}, "is not an index"),
    ({"ascii_names.txt": "Abadi 1\nBai 2\n", "Validation_Inds.txt": "1 ²\n"}, "'²' is not an index"),
    ({"ascii_names.txt": "Abadi 1\nBai 2\n", "Validation_Inds.txt": "2 1\n"}, "holds out all 2 names"),
    ({"ascii_names.txt": "Abadi 1\n" + "b" * 300 + " 2\n"}, "line 2: a name of 300 characters"),
])
def test_dd2424_files_with_hostile_numbers(tmp_path, files, fragment):
    directory = write_files(tmp_path / "dd", {**DD2424, **files})
    refused(fragment, load_dataset, "names", directory, val_fraction=0)


# ---- image files ----------------------------------------------------------------------------


def test_an_image_past_pillows_pixel_limit_is_refused_not_warned_about(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    # 1600 pixels: past the limit but below twice it, where Pillow only warns and decodes anyway
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    refused("image too large", load_image_file, tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # past twice the limit: Pillow's own error
    refused("image too large", load_image_file, tmp_path / "big.png")
