"""Runs `convtrain ui`'s MLflow server in a process group that dies with `convtrain ui`.

`python -m convtrain.tracking.server_group COMMAND...` is started by `convtrain ui` as the
leader of a new process group. It runs COMMAND (`mlflow server ...`, which starts uvicorn as its
own child; both stay in this group) and, when told to stop, stops the whole group: SIGTERM,
then SIGKILL for whatever lingers. It is told to stop by `convtrain ui` itself (Ctrl-C, `kill`)
and, on Linux, by the kernel when `convtrain ui` dies without a word (kill -9, the OOM killer):
PR_SET_PDEATHSIG. Where that is not available a thread notices the new parent within a second.
Without this, a killed `convtrain ui` left the server serving and the port taken.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

_GRACE_SECONDS = 5.0  # for the server to stop on SIGTERM before the group gets SIGKILL


def main(argv: list[str]) -> int:
    parent = os.getppid()
    stopping = threading.Event()
    server = None

    def stop_group(signum=None, frame=None) -> None:
        if stopping.is_set():
            return
        stopping.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM reaches this process too
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        group = os.getpgid(0)
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + _GRACE_SECONDS
        while server is not None and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(group, signal.SIGKILL, but_not=os.getpid())  # uvicorn, if it outlived its parent
        os._exit(0)

    signal.signal(signal.SIGTERM, stop_group)
    signal.signal(signal.SIGINT, stop_group)
    if not _set_parent_death_signal(signal.SIGTERM):
        threading.Thread(target=_watch_parent, args=(parent, stop_group), daemon=True).start()
    if os.getppid() != parent:  # the parent died before it could be watched
        stop_group()
    server = subprocess.Popen(argv)
    code = server.wait()
    if not stopping.is_set():
        stop_group()  # the server ended on its own: take anything it left in the group along
    return code


def _signal_group(group: int, signum: int, but_not: int | None = None) -> None:
    if but_not is None:
        try:
            os.killpg(group, signum)
        except (ProcessLookupError, PermissionError):
            pass
        return
    for pid in _group_members(group):
        if pid != but_not:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def _group_members(group: int) -> list[int]:
    """The processes of process group `group` (from /proc; empty where there is none)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == group:
                    members.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return members


def _watch_parent(parent: int, stop) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    stop()


def _set_parent_death_signal(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, signum) on Linux; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
