"""Atomic, pickle-free .npz I/O shared by saved models and training checkpoints.

A file is a plain numpy .npz: arrays under their names, and JSON documents stored as
0-d unicode arrays (so `allow_pickle=False` can read everything). Writes go to a temp
file in the same directory, are flushed and fsynced, then renamed over the target and
the directory is fsynced: a reader sees either the old file or the new one, never half.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from convtrain.errors import CheckpointError
from convtrain.nn import npz_members
from convtrain.nn.footprint import MEMORY_SHARE, available_memory, format_bytes


def json_entry(value: Any) -> np.ndarray:
    """A JSON document as a 0-d unicode array (loadable without pickle)."""
    return np.array(json.dumps(value, sort_keys=True))


def text_entry(text: str) -> np.ndarray:
    return np.array(text)


def write_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` to `path` as an uncompressed .npz; all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode an ordinary open() would (umask)
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            # a failed write (a full disk) names no file: say which one could not be written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_directory(path.parent)
    _remove_stale_temp_files(path)
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temp_files(path: Path) -> None:
    # A process killed mid-write (SIGKILL, power loss) leaves its temp file behind; the next
    # complete write of the same file clears them, so killed-and-resumed fits do not pile up.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_npz(path: str | Path, what: str = "model", working_bytes_per_value: int = 0) -> dict[str, np.ndarray]:
    """Every array of an .npz, fully read; CheckpointError (one line) on any defect.

    Every member's header is checked before anything is allocated for it (nn/npz_members.py),
    and all of them together must fit in the share of available memory a fit may use: a file
    of a few hundred bytes can declare terabytes. `working_bytes_per_value`: what the caller
    will need besides, per value read (a float32 copy of the input, say)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} file {str(path)!r} not found")
    if path.is_dir():
        raise CheckpointError(f"{what} file {str(path)!r} is a directory, expected an .npz file")
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            claims = [npz_members.claim(archive, key, size) for key in npz_members.array_keys(archive)]
            _check_memory(path, what, claims, working_bytes_per_value)
            # Reading each member here surfaces truncation and CRC errors now, not later.
            return {found.key: npz_members.read(archive, found) for found in claims}
    except npz_members.MemberRefused as exc:
        raise CheckpointError(f"{what} file {str(path)!r}: {exc}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise CheckpointError(
            f"{what} file {str(path)!r} is truncated or not an .npz file ({reason})") from None


def _check_memory(path: Path, what: str, claims: list, working_bytes_per_value: int = 0) -> None:
    total = sum(found.nbytes + working_bytes_per_value * found.values for found in claims)
    available = available_memory()
    if available is not None and total > MEMORY_SHARE * available:
        largest = max(claims, key=lambda found: found.nbytes)
        raise CheckpointError(
            f"{what} file {str(path)!r} declares {largest.describe() if len(claims) == 1 else 'arrays'} needing "
            f"{format_bytes(total)} in memory{'' if len(claims) == 1 else f' (the largest {largest.describe()})'}, "
            f"more than the {format_bytes(int(MEMORY_SHARE * available))} a model may use "
            f"(half of the {format_bytes(available)} available)")


def read_json(arrays: dict[str, np.ndarray], key: str, path: str | Path, what: str = "model") -> Any:
    if key not in arrays:
        raise CheckpointError(f"{what} file {str(path)!r} has no {key!r} entry: not a convtrain {what}")
    try:
        return json.loads(str(arrays[key][()]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{what} file {str(path)!r}: entry {key!r} is not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{what} file {str(path)!r}: entry {key!r} nests JSON arrays or objects "
                              "too deeply to be a convtrain entry") from None
