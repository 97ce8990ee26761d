"""CIFAR-10's python batches, read with an unpickler that can only rebuild uint8 arrays.

The batches are pickles, and a pickle can name any importable callable (os.system, eval, ...)
and have it called while loading. The official files need exactly three globals to rebuild
their uint8 array, so find_class admits those (in numpy 1's and numpy 2's spellings) and
refuses everything else before it is imported. Even those three are never handed to numpy as
they are: numpy.dtype and _reconstruct give stand-ins, and an array is made only from a BUILD
state whose dtype is uint8 and whose bytes are exactly as many as its shape needs (an object
array, or a shape larger than its data, would have numpy read past the end in C). Lists, dicts
and the memo are bounded while reading; the result may only be what a batch holds.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np

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


# The official batch files are about 31 MB; a file may not be much larger, which also bounds
# how much the unpickler's stack and memo can grow while reading it.
MAX_BATCH_FILE_BYTES = 32 * 1024 * 1024
# A batch's lists (labels, filenames) hold one entry per image; batches.meta's a few.
MAX_LIST_LENGTH = MAX_BATCH_IMAGES
MAX_MEMO_ENTRIES = 100_000  # the official files use about 20
MAX_DICT_ENTRIES = 100  # a batch has 4 keys, batches.meta 3
# dict -> list -> value: how deep a batch or batches.meta nests
MAX_NESTING = 2


class _NdarrayType:
    """Stands in for numpy.ndarray inside a batch pickle: numpy's own pickles only pass it to
    _reconstruct; calling it directly (ndarray(shape) allocates any size) is refused."""

    def __new__(cls, *args, **kwargs):
        _refuse("the pickle calls numpy.ndarray directly")


class _Refused(pickle.UnpicklingError):
    """What a batch never holds, found while unpickling: its message is the error line."""


def _refuse(message: str):
    raise _Refused(f"refused to unpickle: {message}")


class _Uint8Dtype:
    """What numpy.dtype('u1', False, True) stands for while unpickling; its BUILD state must be
    uint8's own. Any other dtype (object, structured, a foreign byte order) is refused."""

    STATE_FIELDS = ("|", None, None, None, -1, -1, 0)

    def __init__(self, name, align=False, copy=True):
        name = name.decode("latin-1") if isinstance(name, bytes) else name
        if name not in ("u1", "uint8") or not isinstance(align, bool) or not isinstance(copy, bool):
            _refuse(f"numpy.dtype({name!r}), but a CIFAR batch holds uint8 arrays only")

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 8 and state[1] == b"|":
            state = (state[0], "|", *state[2:])  # a Python 2 pickle read with encoding="bytes"
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] in (3, 4)
                and state[1:] == self.STATE_FIELDS):
            _refuse(f"a uint8 dtype with the state {str(state)[:80]}")


class _Uint8Array:
    """What numpy's _reconstruct(ndarray, (0,), b'b') stands for while unpickling: BUILD then
    gives it (version, shape, dtype, fortran, bytes), checked before any array exists."""

    def __init__(self, unpickler: RestrictedUnpickler):
        self.unpickler = unpickler
        self.array: np.ndarray | None = None

    def __setstate__(self, state):
        if self.array is not None:
            _refuse("an array is built twice")
        if not (isinstance(state, tuple) and len(state) == 5):
            _refuse(f"an array's state is {type(state).__name__}, not numpy's (version, shape, dtype, order, bytes)")
        _version, shape, dtype, fortran, data = state
        if not isinstance(dtype, _Uint8Dtype):
            _refuse(f"an array of dtype {type(dtype).__name__}, but a CIFAR batch holds uint8 arrays only")
        if not (isinstance(shape, tuple) and 1 <= len(shape) <= 2
                and all(type(size) is int and size >= 0 for size in shape)):
            _refuse(f"an array of shape {str(shape)[:80]}, expected (N,) or (N, {PIXELS_PER_IMAGE})")
        if not isinstance(data, bytes) or not isinstance(fortran, bool):
            _refuse("an array whose contents are not a byte string")
        count = math.prod(shape)
        if shape[0] > MAX_BATCH_IMAGES or count > MAX_BATCH_IMAGES * PIXELS_PER_IMAGE:
            _refuse(f"an array of shape {shape}, more than a CIFAR batch of at most "
                    f"{MAX_BATCH_IMAGES:,} images of {PIXELS_PER_IMAGE:,} bytes holds")
        if len(data) != count:
            _refuse(f"an array of shape {shape} needs {count:,} bytes, the file gives {len(data):,}")
        self.unpickler.count_array(count)
        self.array = np.frombuffer(data, np.uint8).reshape(shape, order="F" if fortran else "C")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _Uint8Dtype,
}


class RestrictedUnpickler(pickle._Unpickler):
    """pickle's Python unpickler, resolving only ALLOWED_GLOBALS, with numpy arrays rebuilt only
    as checked uint8 arrays and its lists and memo bounded: anything else is a DataError.

    The Python unpickler (not the C one) so that the opcodes which grow lists and the memo can be
    bounded while reading; the official batches need a few thousand opcodes, read in well under a
    second."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: Path):
        # Python 2 byte strings (the official batches) stay bytes instead of being decoded.
        super().__init__(file, encoding="bytes")
        self.path = path
        self.array_bytes = 0  # what the arrays built so far hold

    def find_class(self, module: str, name: str):
        try:
            found = ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise data_error(self.path, f"refused to unpickle: it asks for the global {module}.{name}, "
                                        "but only numpy array reconstruction is allowed") from None
        return self._reconstruct if found == "_reconstruct" else found

    def _reconstruct(self, subtype=None, shape=None, dtype=None):
        """numpy's _reconstruct(ndarray, shape, dtype) allocates `shape` uninitialized: numpy's
        pickles pass (0,) and a placeholder dtype, then BUILD fills the array from the file."""
        if subtype is not _NdarrayType:
            _refuse("_reconstruct of something other than numpy.ndarray")
        if shape not in ((0,), 0) or not isinstance(dtype, (bytes, str)):
            sizes = shape if isinstance(shape, tuple) else (shape,)
            images = f"{sizes[0]:,} images, " if sizes and type(sizes[0]) is int and sizes[0] > MAX_BATCH_IMAGES else ""
            _refuse(f"_reconstruct declares shape {str(shape)[:80]} ({images}numpy's own pickles declare (0,) and "
                    f"fill it from the file), more than a CIFAR batch of at most {MAX_BATCH_IMAGES:,} "
                    f"images of {PIXELS_PER_IMAGE:,} bytes holds")
        return _Uint8Array(self)

    def count_array(self, nbytes: int):
        self.array_bytes += nbytes
        if self.array_bytes > _MAX_ARRAY_BYTES:
            _refuse(f"its arrays hold {self.array_bytes:,} bytes, more than a CIFAR batch of at most "
                    f"{MAX_BATCH_IMAGES:,} images of {PIXELS_PER_IMAGE:,} bytes holds")

    def persistent_load(self, pid):
        raise data_error(self.path, "refused to unpickle: it uses persistent ids")

    # ---- bounded opcodes ----

    def _check_list(self, items):
        if len(items) > MAX_LIST_LENGTH:
            _refuse(f"a list of more than {MAX_LIST_LENGTH:,} entries, more than a CIFAR batch holds")

    def _load_append(self):
        if len(self.stack) < 2 or type(self.stack[-2]) is not list:
            _refuse("APPEND to something other than a list")
        super().load_append()
        self._check_list(self.stack[-1])

    def _load_appends(self):
        if not (self.metastack and self.metastack[-1] and type(self.metastack[-1][-1]) is list):
            _refuse("APPENDS to something other than a list")
        super().load_appends()
        self._check_list(self.stack[-1])

    def _load_list(self):
        super().load_list()
        self._check_list(self.stack[-1])

    def _load_tuple(self):
        super().load_tuple()
        self._check_list(self.stack[-1])

    def _check_dict(self, obj):
        if type(obj) is not dict:
            _refuse("SETITEM on something other than a dict")
        if len(obj) > MAX_DICT_ENTRIES:
            _refuse(f"a dict of more than {MAX_DICT_ENTRIES} entries, more than a CIFAR batch holds")

    def _load_setitem(self):
        if len(self.stack) < 3:
            _refuse("SETITEM without a dict")
        self._check_dict(self.stack[-3])
        super().load_setitem()
        self._check_dict(self.stack[-1])

    def _load_setitems(self):
        if not (self.metastack and self.metastack[-1]):
            _refuse("SETITEMS without a dict")
        self._check_dict(self.metastack[-1][-1])
        super().load_setitems()
        self._check_dict(self.stack[-1])

    def _memoized(load):
        def bounded(self):
            load(self)
            if len(self.memo) > MAX_MEMO_ENTRIES:
                _refuse(f"it memoizes more than {MAX_MEMO_ENTRIES:,} objects")
        return bounded

    def _reduce(self):
        args = self.stack[-1]
        if not isinstance(args, tuple) or len(args) > 3:
            _refuse("a call with arguments other than numpy's")
        super().load_reduce()

    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.LIST[0]] = _load_list
    dispatch[pickle.TUPLE[0]] = _load_tuple
    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    for _opcode, _load in ((pickle.PUT, pickle._Unpickler.load_put), (pickle.BINPUT, pickle._Unpickler.load_binput),
                           (pickle.LONG_BINPUT, pickle._Unpickler.load_long_binput),
                           (pickle.MEMOIZE, pickle._Unpickler.load_memoize)):
        dispatch[_opcode[0]] = _memoized(_load)
    # what a batch never holds, and what could grow or call without the checks above
    for _opcode in (pickle.OBJ, pickle.INST, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2,
                    pickle.EXT4, pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER,
                    pickle.EMPTY_SET, pickle.FROZENSET, pickle.ADDITEMS):
        dispatch.pop(_opcode[0], None)
    del _opcode, _load, _memoized


def _finished(path: Path, obj, depth: int = 0):
    """The unpickled object with its arrays in place; only what a batch holds is let through:
    dicts of str/bytes keys, lists, ints, strings, None and the uint8 arrays."""
    if isinstance(obj, _Uint8Array):
        if obj.array is None:
            raise data_error(path, "refused to unpickle: an array is declared but never filled")
        return obj.array
    if obj is None or type(obj) in (int, bool, float, bytes, str):
        return obj
    if type(obj) in (dict, list) and depth > MAX_NESTING:
        raise data_error(path, "refused to unpickle: it nests lists or dicts deeper than a CIFAR batch's "
                               "dict of lists")
    if type(obj) not in (dict, list):
        raise data_error(path, f"refused to unpickle: it holds a {type(obj).__name__}, which a CIFAR batch does not")
    if type(obj) is list:
        return [_finished(path, item, depth + 1) for item in obj]
    if not all(type(key) in (bytes, str) for key in obj):
        raise data_error(path, "refused to unpickle: a dict with keys other than strings")
    return {key: _finished(path, value, depth + 1) for key, value in obj.items()}


def safe_unpickle(path: Path):
    """The object in a pickle file, built with RestrictedUnpickler."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_BATCH_FILE_BYTES:
                raise data_error(path, f"{size:,} bytes, larger than a CIFAR batch "
                                       f"(at most {MAX_BATCH_FILE_BYTES:,})")
            if not file.read(1):
                raise data_error(path, "empty file")
            file.seek(0)
            obj = RestrictedUnpickler(file, path).load()
    except OSError as exc:
        raise data_error(path, f"cannot read ({exc.strerror or exc})") from None
    except _Refused as exc:
        raise data_error(path, str(exc)) from None
    except KeyError as exc:  # an opcode the dispatch table does not hold
        raise data_error(path, f"refused to unpickle: it uses the pickle opcode {exc}, "
                               "which a CIFAR batch does not") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, RecursionError, struct.error) as exc:
        raise data_error(path, f"not a readable pickle ({type(exc).__name__}: {exc})") from None
    return _finished(path, obj)


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
