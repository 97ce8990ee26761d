"""Who owns a run or a trial, and whether that process still runs."""

import os
import signal
import subprocess
import sys
import time

from convtrain.tracking.processes import alive, on_this_machine, this_process


def test_this_process_is_alive_and_on_this_machine():
    owner = this_process()
    assert on_this_machine(owner) and alive(owner)


def test_a_reused_pid_is_not_the_owner():
    owner = {**this_process(), "start": this_process()["start"] - 1}
    assert not alive(owner)


def test_a_killed_child_is_dead_before_and_after_it_is_reaped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {**this_process(), "pid": child.pid}
        owner["start"] = None
        assert alive(owner)
        os.kill(child.pid, signal.SIGKILL)
        # not reaped yet: a zombie, which os.kill(pid, 0) still finds
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _state(child.pid) != "Z":
            time.sleep(0.01)
        assert _state(child.pid) == "Z"
        assert not alive(owner)
    finally:
        child.kill()
        child.wait()
    assert not alive(owner)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]
