"""What Linux's /proc says about the processes a test started: who their parent is, which
process group they are in, whether they are still running (a zombie is not)."""

from __future__ import annotations

from pathlib import Path


def _stat_fields(pid_dir: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, pgrp, ..."""
    try:
        return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None  # the process ended while we looked


def _live_processes():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry)
            if fields is not None:
                yield int(entry.name), fields


def children_of(pid: int) -> list[int]:
    return [child for child, fields in _live_processes() if int(fields[1]) == pid]


def group_of(pgid: int) -> list[int]:
    """The members of process group `pgid` that are still running."""
    return [member for member, fields in _live_processes() if int(fields[2]) == pgid and fields[0] != "Z"]


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    fields = _stat_fields(Path(f"/proc/{pid}"))
    return fields is not None and fields[0] != "Z"
