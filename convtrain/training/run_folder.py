"""A fit's run folder (its --out): the one place its file names are spelled, and its lock.

    runs/<name>/
        config.toml            the resolved FitConfig (what `fit --config` takes back)
        checkpoint.npz         the training checkpoint (training/checkpoint.py owns its format)
        model.npz              the final model (nn/network.py owns its format)
        plots/                 learning curves, confusion matrix, first-layer filters
        unlogged-metrics.json  metrics the tracking store did not take, sent by `--resume`
        .convtrain.lock        held by the fit writing the folder

One folder, one writer: two fits writing one folder (`--resume d` twice, `--out same` twice,
`--resume <run id>` of a run whose folder another fit is using) would log every metric twice and
overwrite each other's checkpoints. The lock is `fcntl.flock` on the lock file: the kernel
releases it when the process ends however it ends (kill -9 included), so a stale lock cannot
outlive its fit. The file records the holder's pid and host for the message the second fit prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from convtrain.errors import ConfigError

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.npz"
MODEL_FILE = "model.npz"
PLOTS_DIR = "plots"
UNLOGGED_FILE = "unlogged-metrics.json"
LOCK_FILE = ".convtrain.lock"


class RunFolder:
    """The paths inside one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def unlogged(self) -> Path:
        return self.path / UNLOGGED_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE


class RunFolderLock:
    """`with RunFolderLock() as lock: ... lock.take(folder) ...`: held until the block ends.

    `take` creates the folder if needed (the lock file lives in it); a folder created by `take`
    that holds nothing but the lock when the block ends in an error is removed again, so a fit
    refused after taking the lock leaves nothing behind."""

    def __init__(self):
        self.folder: Path | None = None
        self._fd: int | None = None
        self._created = False

    def take(self, folder: Path) -> None:
        if self.folder is not None:
            if Path(folder) == self.folder:
                return
            raise RuntimeError(f"already holding the lock on {self.folder}")
        folder = Path(folder)
        self._created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(RunFolder(folder).lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise ConfigError(f"out: {folder} is in use by another fit ({_holder(RunFolder(folder).lock)}); "
                              "wait for it to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self.folder, self._fd = folder, fd

    def release(self, *, failed: bool = False) -> None:
        if self._fd is None:
            return
        folder, fd = self.folder, self._fd
        self.folder, self._fd = None, None
        if failed and self._created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                os.remove(RunFolder(folder).lock)
                folder.rmdir()
        os.close(fd)  # closing the last descriptor releases the lock

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {int(holder['pid'])} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid and host are not recorded yet"
