"""kill -9 of `convtrain ui`: its MLflow server and uvicorn go with it, so the port is free
again within seconds and the next `convtrain ui` starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import free_port
from tests.support.proc import group_of

ROOT = Path(__file__).resolve().parents[2]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_ui(folder: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"PYTHONPATH": str(ROOT), "COLUMNS": "120"})
    return subprocess.Popen([sys.executable, "-m", "convtrain.cli", "ui", "--port", str(port)], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def wait_for_url(ui: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    for line in ui.stdout:
        if line.startswith("http"):
            return
        assert time.monotonic() < deadline, "convtrain ui did not print its URL"
    raise AssertionError(f"convtrain ui exited with code {ui.wait()}")


def server_group(ui_pid: int) -> int | None:
    """The process group of the server `convtrain ui` (pid ui_pid) started: its child's own group."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == ui_pid and int(fields[2]) != os.getpgid(ui_pid):
                return int(fields[2])
    return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_kill_9_of_ui_takes_the_server_along_and_the_next_ui_starts(tmp_path):
    port = free_port()
    uis, groups = [], []
    try:
        ui = start_ui(tmp_path, port)
        uis.append(ui)
        wait_for_url(ui)
        group = server_group(ui.pid)
        assert group is not None
        groups.append(group)
        members = group_of(group)
        assert len(members) >= 2, members  # mlflow server and uvicorn (and the group keeper)

        os.kill(ui.pid, signal.SIGKILL)
        ui.wait()
        killed = time.monotonic()
        while (group_of(group) or port_open(port)) and time.monotonic() - killed < 15:
            time.sleep(0.2)
        assert group_of(group) == [] and not port_open(port), "the server outlived kill -9 of convtrain ui"
        assert time.monotonic() - killed < 10

        again = start_ui(tmp_path, port)  # the port is free: no "port already in use"
        uis.append(again)
        wait_for_url(again)
        groups.append(server_group(again.pid))
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=30) == 0
    finally:
        for ui in uis:
            if ui.poll() is None:
                ui.kill()
                ui.wait()
        for group in groups:
            if group is not None and group_of(group):
                os.killpg(group, signal.SIGKILL)
