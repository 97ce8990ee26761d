"""Which process owns something (a sweep trial, an MLflow run), and whether it still runs.

An owner is {"host", "boot", "pid", "start"}: the boot id and the process's start time make
a pid name one process even after the machine reboots or the pid is reused. Only owners on
this machine can be checked; callers leave the others alone.
"""

from __future__ import annotations

import os
import socket


def this_process() -> dict:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "start": _start_ticks(os.getpid())}


def on_this_machine(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and owner.get("boot") == _boot_id()


def alive(owner: dict) -> bool:
    """Whether the owner's process still runs (True when that cannot be told)."""
    pid = owner.get("pid")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, OverflowError):
        return True
    # the pid exists, but it may have been reused by another process since, or be a zombie
    # (killed, not yet reaped by its parent: in a container whose init does not reap, for good)
    state, ticks = _stat_fields(pid)
    if state == "Z":
        return False
    started = owner.get("start")
    return started is None or ticks in (None, started)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """A process's start time (clock ticks after boot): with the pid it names one process."""
    return _stat_fields(pid)[1]


def _stat_fields(pid: int) -> tuple[str | None, int | None]:
    """(state letter, start time in clock ticks after boot) from /proc/<pid>/stat, or Nones."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None, None
