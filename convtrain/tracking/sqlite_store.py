"""A local SQLite tracking store that is either complete or absent.

MLflow creates a new SQLite store in dozens of migration steps, each committed on its own:
two processes creating it at once, or a kill during creation, leave a half-made store
(`_alembic_tmp_*` tables) that MLflow can never open again. Here a new store is built
under an exclusive file lock (`<store>.lock` beside it) in a temporary file in the same
folder and renamed into place once MLflow has finished, so the store path only ever names
a complete store. A store that exists is only checked and opened. mlflow is imported only
when a store is built.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import uuid
from pathlib import Path

from convtrain.errors import TrackingError, one_line

_SQLITE_HEADER = b"SQLite format 3\x00"
_BUILDING_SUFFIX = ".building"  # <store>.<unique>.building: a store being built, never opened by fits


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///path` URI; None for other URIs, in-memory stores and URIs with options."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):]
    if not rest or rest == ":memory:" or "?" in rest:
        return None
    return Path(rest).expanduser().absolute()


def check_existing_store(path: Path) -> bool:
    """True if `path` is a complete MLflow store, False if it does not exist or is an empty file
    (a new store may be built there); TrackingError (one line) for anything else."""
    if path.is_dir():
        raise TrackingError(f"tracking store {path} is a folder, not an MLflow SQLite file; "
                            "move it away or pass another --tracking-uri")
    try:
        with open(path, "rb") as fh:
            header = fh.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise TrackingError(f"tracking store {path} cannot be read ({exc.strerror or exc})") from None
    if not header:
        return False
    broken = "move it away (a new store is then created) or pass another --tracking-uri"
    if header != _SQLITE_HEADER:
        raise TrackingError(f"tracking store {path} is not an SQLite database (damaged, or another kind "
                            f"of file); {broken}")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=30)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.Error as exc:
        raise TrackingError(f"tracking store {path} cannot be opened as an SQLite database "
                            f"({one_line(exc)}); {broken}") from None
    if not tables:
        return False  # SQLite's empty database: nothing lost by building a store in its place
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        holds = (f"it holds {runs} runs: restore it from a backup, or move it away" if runs
                 else "it holds no runs: move it away or delete it")
        raise TrackingError(f"tracking store {path} was left half-made by an interrupted creation or upgrade "
                            f"(table {leftovers[0]}); {holds}, and a new store is created on the next fit")
    if not {"alembic_version", "experiments", "runs"} <= tables:
        raise TrackingError(f"tracking store {path} is an SQLite database but not an MLflow store; "
                            "move it away or pass another --tracking-uri")
    return True


def ensure_sqlite_store(path: Path) -> None:
    """Make sure `path` is a complete MLflow store: check it if it exists, else build it
    atomically (see the module docstring). Concurrent callers wait for the one building."""
    if check_existing_store(path):
        return
    if not path.parent.is_dir():
        raise TrackingError(f"tracking store {path}: folder {path.parent} does not exist")
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise TrackingError(f"tracking store {path}: cannot create its lock file {lock_path} "
                            f"({exc.strerror or exc})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if check_existing_store(path):  # built by the process that held the lock before
            return
        _remove_leftovers(path)  # from builders killed before they could clean up
        building = path.with_name(f"{path.name}.{uuid.uuid4().hex}{_BUILDING_SUFFIX}")
        try:
            _build(building)
            os.replace(building, path)
        except Exception as exc:  # MLflow's, SQLAlchemy's or the OS's: one line either way
            raise TrackingError(store_write_error(path, exc, "cannot be created")) from None
        finally:
            _remove(building)
    finally:
        os.close(lock)


def store_write_error(path, exc: BaseException, what: str = "refused a write") -> str:
    """The line for a store that could not be written; names a full disk as such."""
    if is_disk_full(exc):
        return f"tracking store {path}: the disk is full; free some space and run again"
    return f"tracking store {path} {what} ({one_line(exc)})"


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it: MLflow wraps SQLAlchemy wraps sqlite3) says the disk is full."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc).lower()
        if "database or disk is full" in text or "no space left on device" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _build(building: Path) -> None:
    """Let MLflow create its tables in `building` (one call runs every migration), then let go of it."""
    import mlflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{building}"
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    finally:
        engine = SqlAlchemyStore._engine_map.pop(uri, None)  # close its connections before the rename
        if engine is not None:
            engine.dispose()


def _remove_leftovers(path: Path) -> None:
    for leftover in path.parent.glob(f"{path.name}.*{_BUILDING_SUFFIX}*"):
        _remove(leftover)


def _remove(building: Path) -> None:
    for name in (building, building.with_name(building.name + "-journal")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)
