"""CIFAR-10's python batches, read with an unpickler that can only rebuild numpy arrays.

The batches are pickles, and a pickle can name any importable callable (os.system, eval, ...)
and have it called while loading. The official files need exactly three globals to rebuild
their uint8 array, so find_class admits those (in numpy 1's and numpy 2's spellings) and
refuses everything else before it is imported.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
from numpy._core.multiarray import _reconstruct

from convtrain.errors import one_line

from .base import RawData, check_labels, data_error, existing_dir

DIRECTORY_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
# The official order, used only when batches.meta is absent.
DEFAULT_CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                       "dog", "frog", "horse", "ship", "truck"]
IMAGE_SHAPE = (3, 32, 32)  # each row: 1024 red, then green, then blue, each 32x32 row-major
# The format's limits: every official batch holds 10,000 images of 3,072 bytes.
MAX_BATCH_IMAGES = 10_000
PIXELS_PER_IMAGE = 3 * 32 * 32
# What numpy arrays one batch file may ask the unpickler to allocate in all: the image array
# plus room for its labels as an int64 array.
_MAX_ARRAY_BYTES = MAX_BATCH_IMAGES * PIXELS_PER_IMAGE + MAX_BATCH_IMAGES * 8


class _NdarrayType:
    """Stands in for numpy.ndarray inside a batch pickle: numpy's own pickles only pass it to
    _reconstruct; calling it directly (ndarray(shape) allocates any size) is refused."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("the pickle calls numpy.ndarray directly, refused")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS; anything else is a DataError."""

    def __init__(self, file, path: Path):
        # Python 2 byte strings (the official batches) stay bytes instead of being decoded.
        super().__init__(file, encoding="bytes")
        self.path = path

        self.array_bytes = 0  # what the arrays built so far allocated

    def find_class(self, module: str, name: str):
        try:
            found = ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise data_error(self.path, f"refused to unpickle: it asks for the global {module}.{name}, "
                                        "but only numpy array reconstruction is allowed") from None
        return self._reconstruct if found == "_reconstruct" else found

    def _reconstruct(self, subtype, shape, dtype):
        """numpy's _reconstruct(ndarray, shape, dtype), which allocates `shape` uninitialized:
        numpy's pickles pass shape (0,) and then fill the array from bytes in the file, but a
        hand-made pickle can declare any shape here. Bounded by what a CIFAR batch can hold."""
        if subtype is not _NdarrayType:
            raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
        try:
            itemsize = np.dtype(dtype).itemsize
            sizes = [int(size) for size in (shape if isinstance(shape, tuple) else (shape,))]
        except (TypeError, ValueError) as exc:
            raise pickle.UnpicklingError(f"_reconstruct with shape {shape!r} and dtype {dtype!r} ({exc})") from None
        self.array_bytes += max(math.prod(sizes), 0) * itemsize
        # the first axis of a batch's arrays counts images (data (N, 3072), labels (N,))
        if (sizes and sizes[0] > MAX_BATCH_IMAGES) or self.array_bytes > _MAX_ARRAY_BYTES:
            raise data_error(self.path, f"declares numpy arrays of shape {shape!r} "
                                        f"({self.array_bytes:,} bytes so far), more than a CIFAR batch of at most "
                                        f"{MAX_BATCH_IMAGES:,} images of {PIXELS_PER_IMAGE:,} bytes holds")
        return _reconstruct(np.ndarray, shape, dtype)

    def persistent_load(self, pid):
        raise data_error(self.path, "refused to unpickle: it uses persistent ids")


def safe_unpickle(path: Path):
    """The object in a pickle file, built with RestrictedUnpickler."""
    try:
        with path.open("rb") as file:
            if not file.read(1):
                raise data_error(path, "empty file")
            file.seek(0)
            return RestrictedUnpickler(file, path).load()
    except OSError as exc:
        raise data_error(path, f"cannot read ({exc.strerror or exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as exc:
        raise data_error(path, f"not a readable pickle ({type(exc).__name__}: {exc})") from None


def load_cifar10(path: str | Path | None) -> RawData:
    """Every data_batch_1..5 present as training data, test_batch (if present) as test data."""
    directory = existing_dir(path, f"{DIRECTORY_NAME} or its parent")
    if (directory / DIRECTORY_NAME).is_dir():
        directory = directory / DIRECTORY_NAME
    class_names, meta_note = _class_names(directory)

    train_names = [name for name in TRAIN_BATCHES if (directory / name).is_file()]
    if not train_names:
        raise data_error(directory, f"no training batch found (expected {', '.join(TRAIN_BATCHES)})")
    batches = [_read_batch(directory / name, len(class_names)) for name in train_names]
    x = np.concatenate([images for images, _ in batches])
    y = np.concatenate([labels for _, labels in batches])
    loaded = f"{', '.join(train_names)} ({len(y)} images)"

    x_test = y_test = None
    if (directory / TEST_BATCH).is_file():
        x_test, y_test = _read_batch(directory / TEST_BATCH, len(class_names))
        loaded += f"; {TEST_BATCH} ({len(y_test)} images)"
    else:
        loaded += f"; no {TEST_BATCH}"
    return RawData(x=x, y=y, x_test=x_test, y_test=y_test, class_names=class_names,
                   source=f"{directory}: {loaded}{meta_note}")


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _string_keys(path, safe_unpickle(path))
    for key in ("data", "labels"):
        if key not in batch:
            raise data_error(path, f"no {key!r} entry (keys: {', '.join(sorted(batch))})")
    data = batch["data"]
    pixels_per_image = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != pixels_per_image:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise data_error(path, f"'data' is {dtype} of shape {shape}, expected uint8 (N, {pixels_per_image})")
    if len(data) > MAX_BATCH_IMAGES:
        raise data_error(path, f"holds {len(data)} images, more than the {MAX_BATCH_IMAGES:,} of a CIFAR batch")
    labels = _label_array(path, batch["labels"])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise data_error(path, f"'labels' must be a list of whole numbers, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(data):
        raise data_error(path, f"{len(labels)} labels for {len(data)} images")
    if len(data) == 0:
        raise data_error(path, "holds no images")
    labels = labels.astype(np.int64)
    check_labels(path, labels, num_classes)
    return data.reshape(len(data), *IMAGE_SHAPE), labels


def _label_array(path: Path, labels) -> np.ndarray:
    """The 'labels' entry as an array; a list nested past numpy's 64 dimensions, ragged lists or
    values of mixed kinds are refused in one line."""
    if isinstance(labels, (list, tuple)) and len(labels) > MAX_BATCH_IMAGES:
        raise data_error(path, f"holds {len(labels)} labels, more than the {MAX_BATCH_IMAGES:,} of a CIFAR batch")
    try:
        return np.asarray(labels)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise data_error(path, f"'labels' must be a list of whole numbers ({one_line(str(exc))})") from None


def _class_names(directory: Path) -> tuple[list[str], str]:
    path = directory / META_FILE
    if not path.is_file():
        return DEFAULT_CLASS_NAMES, f"; no {META_FILE}, standard class names"
    names = _string_keys(path, safe_unpickle(path)).get("label_names")
    if not isinstance(names, list) or not names \
            or not all(isinstance(name, (bytes, str)) for name in names):
        raise data_error(path, "no 'label_names' list of strings")
    return [name.decode("utf-8", "replace") if isinstance(name, bytes) else name for name in names], ""


def _string_keys(path: Path, obj) -> dict:
    """A batch dict with str keys, whether pickled by Python 2 (bytes) or Python 3 (str)."""
    if not isinstance(obj, dict):
        raise data_error(path, f"holds a {type(obj).__name__}, expected a dict of 'data' and 'labels'")
    return {key.decode("latin-1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}
