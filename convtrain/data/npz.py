"""A user's own data set as an .npz: arrays x, y, optionally x_test, y_test and class_names."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from convtrain.nn import npz_members

from .base import RawData, check_labels, data_error
from .limits import MAX_INFERRED_CLASSES, check_data_need, fit_bytes

# Whole numbers a float64 holds exactly; larger "labels" are no class numbers (and casting
# them to int64 is undefined: numpy warns and makes up a value).
_LARGEST_FLOAT_LABEL = 2 ** 53
_ARRAYS = ("x", "y", "x_test", "y_test", "class_names")


def load_npz(path: str | Path | None) -> RawData:
    path = Path(path).expanduser()
    if not path.is_file():
        raise data_error(path, "no such file (expected an .npz with arrays x and y)")
    try:
        # allow_pickle=False: object arrays would be unpickled, i.e. could run code.
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise data_error(path, f"not a readable .npz ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise data_error(path, "holds a single array (.npy), expected an .npz with arrays x and y")
    with archive:
        for required in ("x", "y"):
            if required not in archive.files:
                raise data_error(path, f"no array {required!r} (found: {', '.join(archive.files) or 'none'})")
        if ("x_test" in archive.files) != ("y_test" in archive.files):
            raise data_error(path, "has only one of x_test and y_test; give both or neither")
        claims = _claims(path, archive, [key for key in _ARRAYS if key in archive.files])
        x = _images(path, "x", _read(path, archive, claims["x"]))
        y = _labels(path, "y", _read(path, archive, claims["y"]), len(x))
        x_test = y_test = None
        if "x_test" in archive.files:
            x_test = _images(path, "x_test", _read(path, archive, claims["x_test"]))
            y_test = _labels(path, "y_test", _read(path, archive, claims["y_test"]), len(x_test))
            if x_test.shape[1:] != x.shape[1:]:
                raise data_error(path, f"x_test images are {x_test.shape[1:]}, but x images are {x.shape[1:]}")
        class_names = _class_names(path, archive, claims.get("class_names"))

    if class_names is None:
        highest = max(int(y.max()), int(y_test.max()) if y_test is not None and y_test.size else 0)
        if highest >= MAX_INFERRED_CLASSES:
            raise data_error(path, f"label {highest} would make {highest + 1} classes; without a 'class_names' "
                                   f"array, labels must be below {MAX_INFERRED_CLASSES}")
        class_names = [str(label) for label in range(highest + 1)]
    check_labels(f"{path} (y)", y, len(class_names))
    if y_test is not None:
        check_labels(f"{path} (y_test)", y_test, len(class_names))
    shape = "x".join(str(size) for size in x.shape)
    test = f", test {len(x_test)}" if x_test is not None else ", no test arrays"
    return RawData(x=x, y=y, x_test=x_test, y_test=y_test, class_names=class_names,
                   source=f"{path}: x {shape} {x.dtype}{test}")


def _claims(path: Path, archive, keys: list[str]) -> dict[str, npz_members.Claim]:
    """The arrays' header claims, checked (nn/npz_members.py) and held together to the memory a
    fit may use (x and x_test are trained and tested in one process) before anything is read."""
    size = path.stat().st_size
    claims: dict[str, npz_members.Claim] = {}
    for key in keys:  # in order, so a bomb in x is named as such before a defect in y
        try:
            claims[key] = npz_members.claim(archive.zip, key, size)
        except npz_members.MemberRefused as exc:
            raise data_error(path, str(exc)) from None
        need = sum(fit_bytes(found.values, found.dtype.itemsize) for found in claims.values())
        described = " and ".join(found.describe() for found in claims.values() if found.key in ("x", "x_test"))
        check_data_need(path, described or claims[key].describe(), need)
    return claims


def _read(path: Path, archive, found: npz_members.Claim) -> np.ndarray:
    try:
        return npz_members.read(archive.zip, found)
    except npz_members.MemberRefused as exc:
        raise data_error(path, str(exc)) from None


def _images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """(N, C, H, W): (N, H, W) gains a channel axis; floats become float32 and must be finite."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise data_error(path, f"{key!r} has shape {x.shape}, expected (N, C, H, W) or (N, H, W)")
    if 0 in x.shape:
        raise data_error(path, f"{key!r} is empty (shape {x.shape})")
    if x.dtype.kind == "b":
        return x.astype(np.uint8)
    if x.dtype.kind in "iu":
        return x  # converted to float32 after the split, so only the kept rows are copied
    if x.dtype.kind != "f":
        raise data_error(path, f"{key!r} has dtype {x.dtype}, expected numbers")
    return as_finite_float32(x, lambda problem: data_error(path, f"{key!r} has {problem}"))


def as_finite_float32(x: np.ndarray, refuse) -> np.ndarray:
    """Float images as float32, refused (refuse(problem) is the exception) if any value is NaN,
    infinite, or beyond float32's range (which the cast would make infinite: numpy warns on
    stderr, here it is the one line)."""
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise refuse(f"{bad} NaN or infinite value(s)")
    if x.dtype.itemsize > 4 and x.size:
        limit = float(np.finfo(np.float32).max)
        beyond = int(np.count_nonzero(np.abs(x) > limit))
        if beyond:
            raise refuse(f"{beyond} value(s) beyond float32's range (largest {float(np.abs(x).max()):.3g}, "
                         f"float32 holds up to {limit:.3g})")
    return x.astype(np.float32, copy=False)


def _labels(path: Path, key: str, y: np.ndarray, count: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != count:
        raise data_error(path, f"{key!r} has shape {y.shape}, expected ({count},) to match the images")
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        # Whole-valued floats (as MATLAB or pandas often write labels) are accepted.
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise data_error(path, f"{key!r} holds labels that are not whole numbers")
        too_large = np.abs(y) > _LARGEST_FLOAT_LABEL
        if too_large.any():
            raise data_error(path, f"{key!r} holds the label {y[too_large][0]:g}, too large for a class number")
        return y.astype(np.int64)
    raise data_error(path, f"{key!r} has dtype {y.dtype}, expected whole-number class labels")


def _class_names(path: Path, archive, found: npz_members.Claim | None) -> list[str] | None:
    if found is None:
        return None
    names = _read(path, archive, found)
    if names.ndim != 1 or names.dtype.kind not in "US" or names.size == 0:
        raise data_error(path, f"'class_names' is {names.dtype} of shape {names.shape}, expected a 1-D string array")
    return [name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name) for name in names.tolist()]
