"""Which folder a fit writes to, checked before anything is written: resolvable, writable, not
another fit's (one with a checkpoint, or one another fit holds the lock of)."""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from pathlib import Path

from convtrain.errors import ConfigError
from convtrain.tracking.safe_names import safe_name
from convtrain.training.run_folder import RunFolder, RunFolderLock


def writable_out_folder(config, resume_checkpoint: Path | None) -> Path:
    """The --out folder, the resumed checkpoint's folder, or the parent of a new run's folder
    (./runs), resolved; ConfigError if nothing can be written there."""
    out_dir = _resolve_out(Path(resume_checkpoint.parent if resume_checkpoint is not None
                                else (config.out or Path.cwd() / "runs")))
    _check_writable(out_dir)
    return out_dir


def claim_out_folder(out_dir: Path, config, *, resumed: bool, lock: RunFolderLock) -> None:
    """Lock a named folder (--out, or the resumed fit's) for this fit; a new fit's --out must not
    hold another fit's checkpoint."""
    if not resumed and config.out is not None:
        _check_no_other_checkpoint(out_dir)
    if resumed or config.out is not None:
        lock.take(out_dir)  # before the run exists; from here on no other fit writes there
        if not resumed:
            _check_no_other_checkpoint(out_dir)  # another fit may have ended there since the check above


def new_run_folder(parent: Path, name: str | None, lock: RunFolderLock) -> Path:
    """A new folder in `parent` named after the run (or the time), created and locked."""
    folder = _unique_dir(parent / safe_name(name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S"), fallback="run"))
    lock.take(folder)
    return folder


def _unique_dir(path: Path) -> Path:
    """A new folder named like `path` (path-2, path-3, ... if taken), created here so that two
    fits starting at once with the same run name cannot both pick it."""
    candidate, n = path, 2
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            candidate = path.with_name(f"{path.name}-{n}")
            n += 1


def _check_no_other_checkpoint(out_dir: Path) -> None:
    if RunFolder(out_dir).checkpoint.exists():
        raise ConfigError(f"out: {out_dir} already holds a checkpoint of another fit; continue it with "
                          f"--resume {out_dir}, or choose another --out")


def _resolve_out(folder: Path) -> Path:
    try:
        return folder.resolve()
    except RuntimeError:  # Python 3.11's way of saying ELOOP
        raise ConfigError(f"out: {folder} goes through a symbolic link loop; choose another --out") from None
    except OSError as exc:
        raise ConfigError(f"out: {folder} cannot be resolved ({exc.strerror or exc}); choose another --out") from None


def _check_writable(folder: Path) -> None:
    """Refuse an output folder that cannot be created or written, before anything is written."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"out: {existing} is a file, expected a folder for checkpoints and the model")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out: {existing} is not writable; choose another --out")
    # access() says yes to root, and on some file systems (sysfs, NFS with root squashing, FUSE)
    # where creating a file then fails; an unnamed temp file is the real test and leaves nothing
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"out: cannot create files in {existing} ({exc.strerror or exc}); "
                          "choose another --out") from None
