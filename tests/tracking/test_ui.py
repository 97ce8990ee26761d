"""`convtrain ui`: starts MLflow on the fits' store and prints the classic runs-table URL."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support.cli import free_port


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_ui_serves_the_default_store_and_prints_the_runs_table_url(tmp_path):
    import mlflow

    experiment_id = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("convtrain")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen([sys.executable, "-m", "convtrain.cli", "ui", "--port", str(port)], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        for line in process.stdout:
            lines.append(line.strip())
            if line.startswith("http") or time.monotonic() > deadline:
                break
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        assert url in lines, (lines, process.stderr.read() if process.poll() is not None else "")
        assert lines[0] == f"MLflow UI for sqlite:///{tmp_path / 'mlflow.db'}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:  # a failed assertion: SIGTERM still takes the server down
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    deadline = time.monotonic() + 15
    while port_open(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_open(port), "the MLflow server outlived `convtrain ui`"


def test_ui_refuses_a_busy_port_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from convtrain.cli import app

    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--port", str(port)], env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: port {port} on 127.0.0.1 is already in use; pass another --port"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1"])
def test_ui_for_a_dead_server_store_says_so(uri):
    from typer.testing import CliRunner

    from convtrain.cli import app

    result = CliRunner().invoke(app, ["ui", "--tracking-uri", uri])
    assert result.exit_code == 1 and "cannot be reached" in result.stderr
