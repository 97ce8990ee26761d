"""kill -9 of `convtrain sweep --workers 2`: its workers notice within seconds, checkpoint the
trial they are training and stop, instead of training on until that trial ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.proc import children_of

ROOT = Path(__file__).resolve().parents[2]
# trials of 2,000 epochs on 200 digits: minutes each, far longer than the test waits
SWEEP = """
[fit]
data = "digits"
limit = 200
epochs = 2000
hidden = []
filters = [4]
batch_size = 50
track = false
[sweep]
name = "orphans"
method = "grid"
[space]
l2 = [1e-4, 1e-3]
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for an init that never reaps)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_stop_within_seconds_of_their_launchers_kill_9(tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("MLFLOW_TRACKING_URI", None)
    launcher = subprocess.Popen([sys.executable, "-m", "convtrain.cli", "sweep", "sweep.toml", "--workers", "2"],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        # both workers training: each trial has written its first epoch's checkpoint
        while len(list(tmp_path.glob("runs/**/checkpoint.npz"))) < 2:
            assert launcher.poll() is None, launcher.stderr.read().decode()
            assert time.monotonic() < deadline, "the workers never started training"
            time.sleep(0.2)
        workers = [pid for pid in children_of(launcher.pid) if "spawn_main" in command_line(pid)]
        assert len(workers) == 2, [command_line(pid) for pid in children_of(launcher.pid)]
        checkpoints = {path: path.stat().st_mtime_ns for path in tmp_path.glob("runs/**/checkpoint.npz")}

        launcher.kill()  # SIGKILL: no handler of its own runs
        launcher.wait()
        killed = time.monotonic()
        while any(running(pid) for pid in workers) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        stopped_after = time.monotonic() - killed
        assert not any(running(pid) for pid in workers), "workers still training 10 s after the launcher died"
        assert stopped_after < 5, f"the workers took {stopped_after:.1f} s to stop"
        # each checkpointed the epoch it was in before stopping
        assert all(path.stat().st_mtime_ns > mtime for path, mtime in checkpoints.items())
        assert launcher.stderr.read().decode().count("the sweep launcher (pid") == 2
    finally:
        for pid in [launcher.pid, *workers]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.wait()
