"""Bounds on what a data file may claim, checked before anything is allocated for it.

A file's header says how large its arrays are (an IDX header, an .npy header inside an .npz, a
pickled numpy array, the longest name), and a few hundred bytes can claim terabytes. Each reader
checks such a claim against the bytes really there, the format's own limits and the memory the
fit would need, then reads no more than it checked (a gzip stream or a zip member is
decompressed with a cap, never to its end). A refusal is one DataError line naming the file,
what it claims and the limit. The checks of an .npz member's header against its zip entry are
nn/npz_members.py's, shared with saved models and checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path

from convtrain.nn.footprint import MEMORY_SHARE, available_memory, format_bytes

from .base import data_error

# Without class names, the classes are 0..highest label: a label of 10**9 would make a
# billion classes (and a one-hot of gigabytes). More than this needs explicit class names.
MAX_INFERRED_CLASSES = 10_000
# The names data set: a name is a surname (DD2424's longest is 19 letters) and the alphabet
# the letters of the training names; either one sizes the one-hot encoding.
MAX_NAME_LENGTH = 256
MAX_ALPHABET = 1024
# A fit keeps the stored values plus two float32 copies (the split, then normalized).
_FIT_BYTES_PER_VALUE = 8


def fit_bytes(values: int, stored_itemsize: int) -> int:
    """What a data set of `values` numbers stored at `stored_itemsize` bytes costs a fit."""
    return values * (stored_itemsize + _FIT_BYTES_PER_VALUE)


def check_data_memory(path: str | Path, claim: str, values: int, stored_itemsize: int) -> None:
    """Refuse a data set (described by `claim`, e.g. '700000 images of 32x32') whose arrays would
    not fit in the share of available memory a fit may use."""
    check_data_need(path, claim, fit_bytes(values, stored_itemsize))


def check_data_need(path: str | Path, claim: str, need: int) -> None:
    """check_data_memory for a data set whose arrays together cost `need` bytes (fit_bytes)."""
    available = available_memory()
    if available is not None and need > MEMORY_SHARE * available:
        raise data_error(path, f"declares {claim}, which needs {format_bytes(need)} in memory to train on, "
                               f"more than the {format_bytes(int(MEMORY_SHARE * available))} a fit may use "
                               f"(half of the {format_bytes(available)} available)")


def values_in(shape) -> int:
    """The number of values in an array of `shape`, as an exact Python int."""
    return math.prod(int(size) for size in shape)


def read_capped(stream, size: int, path: str | Path, what: str) -> bytes:
    """Exactly `size` bytes of `stream` (a decompressing reader), and proof that no more follow:
    reads size + 1 at most, so a stream that decompresses to gigabytes costs only `size`."""
    data = stream.read(size + 1)
    if len(data) > size:
        raise data_error(path, f"decompresses to more than the {size} bytes of {what} its header declares")
    return data
