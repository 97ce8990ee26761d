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
    # the pid exists, but it may have been reused by another process since
    started = owner.get("start")
    return started is None or _start_ticks(pid) in (None, started)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """A process's start time (clock ticks after boot): with the pid it names one process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
