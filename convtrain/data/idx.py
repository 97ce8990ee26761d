"""MNIST in its official IDX files (big-endian header, then uint8 payload), raw or gzipped."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .base import RawData, check_labels, data_error, existing_dir
from .limits import check_data_memory, read_capped, values_in

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
_KIND = {IMAGES_MAGIC: "an IDX image file", LABELS_MAGIC: "an IDX label file"}
_GZIP_MAGIC = b"\x1f\x8b"

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = [str(digit) for digit in range(10)]


def load_mnist(path: str | Path | None) -> RawData:
    """Train from train-*, test from t10k-* (both files of a pair, or neither)."""
    directory = existing_dir(path, "the MNIST IDX files")
    train_images, train_labels = _find_pair(directory, "train")
    if train_images is None or train_labels is None:
        missing = SPLIT_FILES["train"][0 if train_images is None else 1]
        raise data_error(directory / missing, "missing (also looked for .gz)")
    x, y = read_idx_pair(train_images, train_labels)
    loaded = [f"{train_images.name}, {train_labels.name} ({len(y)} images)"]

    x_test = y_test = None
    test_images, test_labels = _find_pair(directory, "test")
    if (test_images is None) != (test_labels is None):
        missing = SPLIT_FILES["test"][0 if test_images is None else 1]
        raise data_error(directory / missing, "missing, but the other test file is there")
    if test_images is not None:
        x_test, y_test = read_idx_pair(test_images, test_labels)
        loaded.append(f"{test_images.name}, {test_labels.name} ({len(y_test)} images)")
    else:
        loaded.append("no t10k files")
    return RawData(x=x, y=y, x_test=x_test, y_test=y_test, class_names=CLASS_NAMES,
                   source=f"{directory}: " + "; ".join(loaded))


def _find_pair(directory: Path, split: str) -> tuple[Path | None, Path | None]:
    return tuple(_find(directory, stem) for stem in SPLIT_FILES[split])


def _find(directory: Path, stem: str) -> Path | None:
    # Some mirrors (e.g. Kaggle's) spell the files "train-images.idx3-ubyte".
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise data_error(labels_path, f"{len(labels)} labels, but {images_path.name} has {len(images)} images")
    check_labels(labels_path, labels, len(CLASS_NAMES))
    return images, labels


def read_idx_images(path: Path) -> np.ndarray:
    """(count, 1, rows, cols) uint8, a read-only view of the file's bytes."""
    (count, rows, cols), payload = _read_idx(path, IMAGES_MAGIC, "images")
    return np.frombuffer(payload, dtype=np.uint8).reshape(count, 1, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    (count,), payload = _read_idx(path, LABELS_MAGIC, "labels")
    return np.frombuffer(payload, dtype=np.uint8).astype(np.int64)


def _read_idx(path: Path, magic: int, what: str) -> tuple[tuple[int, ...], bytes]:
    """The sizes the header declares and exactly that many payload bytes.

    The header is read first and its claim checked (against the memory a fit would need, and
    for a raw file against the file's size) before the payload is read; a gzipped payload is
    decompressed with a cap, so a small .gz that inflates to gigabytes costs no more than its
    header declared.
    """
    dims = 3 if magic == IMAGES_MAGIC else 1
    header_size = 4 * (1 + dims)
    try:
        with path.open("rb") as raw:
            start = raw.read(2)
            if not start:
                raise data_error(path, "empty file")
            raw.seek(0)
            # Decide by content, not by name: a raw file called .gz (or the reverse) still loads.
            gzipped = start == _GZIP_MAGIC
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
            header = stream.read(header_size)
            sizes = _header(path, header, magic, dims)
            expected = values_in(sizes)
            claim = (f"{sizes[0]} images of {sizes[1]}x{sizes[2]}" if dims == 3 else f"{sizes[0]} labels")
            if not gzipped:
                found = path.stat().st_size - header_size
                _check_payload(path, found, expected, claim)
            check_data_memory(path, claim, expected, 1)
            if gzipped:
                payload = read_capped(stream, expected, path, what)
            else:
                payload = stream.read(expected)
            _check_payload(path, len(payload), expected, claim)
            return sizes, payload
    except OSError as exc:
        if isinstance(exc, gzip.BadGzipFile):
            raise data_error(path, f"corrupt gzip data ({exc})") from None
        raise data_error(path, f"cannot read ({exc.strerror or exc})") from None
    except EOFError:
        raise data_error(path, "truncated gzip stream (the file ends before the compressed data does)") from None
    except zlib.error as exc:
        raise data_error(path, f"corrupt gzip data ({exc})") from None


def _header(path: Path, data: bytes, magic: int, dims: int) -> tuple[int, ...]:
    header_size = 4 * (1 + dims)
    if len(data) < header_size:
        raise data_error(path, f"only {len(data)} bytes, shorter than the {header_size}-byte IDX header")
    found, *sizes = (int(v) for v in np.frombuffer(data, dtype=">u4", count=1 + dims))
    if found != magic:
        what = _KIND.get(found, "not an IDX file of unsigned bytes")
        raise data_error(path, f"magic number {found}, expected {magic} for {_KIND[magic]} ({what})")
    if 0 in sizes:
        raise data_error(path, f"header declares an empty array {tuple(sizes)}")
    return tuple(sizes)


def _check_payload(path: Path, found: int, expected: int, what: str) -> None:
    if found < expected:
        raise data_error(path, f"truncated: header declares {what} ({expected} bytes), file holds {found}")
    if found > expected:
        raise data_error(path, f"{found - expected} bytes beyond the {what} its header declares")
