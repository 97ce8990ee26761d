"""`convtrain ui`: an `mlflow server` on the fits' store, started, announced and stopped."""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Callable

from convtrain.errors import ConfigError, TrackingError
from convtrain.tracking.store import (
    check_reachable,
    client_for,
    is_http,
    open_store,
    resolve_tracking_uri,
    runs_table_url,
)
from convtrain.training.signals import sigterm_as_keyboard_interrupt

DEFAULT_EXPERIMENT = "convtrain"


def serve_ui(*, tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000,
             experiment: str | None = None, echo: Callable[[str], None] = print,
             startup_seconds: float = 60.0) -> int:
    """Run `mlflow server` on the fits' store until Ctrl-C; print the runs-table URL once it answers.

    The URL opens `experiment`'s runs table; one named that the store does not hold is refused
    with the names it does hold. Without a name: the "convtrain" experiment, or the list of
    experiments when there is none of that name.
    An http(s) store already is a server: its URL is printed and nothing is started.
    Returns the server's exit code (0 after Ctrl-C).
    """
    import subprocess

    if not 1 <= port <= 65535:
        raise ConfigError(f"port: got {port}, expected a port number from 1 to 65535")
    uri = resolve_tracking_uri(tracking_uri)
    if is_http(uri):
        check_reachable(uri)
        echo(runs_table_url(uri, experiment_to_open(uri, experiment)))
        return 0
    check_reachable(uri)
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise TrackingError(f"port {port} on {host} is already in use; pass another --port")
    # one worker process is plenty for a dashboard on your own machine (MLflow's default is 4)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    # run by server_group.py, which leads the server's process group and stops all of it when
    # this process ends, even by kill -9 (the kernel tells it on Linux)
    group_command = [sys.executable, "-m", "convtrain.tracking.server_group", *command]
    # Made ready before the server starts: a new SQLite store is built whole here (the server
    # would create its tables step by step, racing a fit started meanwhile); a broken one is
    # one line now rather than a server that dies with a traceback.
    open_store(uri)
    experiment_id = experiment_to_open(uri, experiment)
    server = None
    # SIGTERM is turned into KeyboardInterrupt from here on, so `kill` also stops the server.
    with sigterm_as_keyboard_interrupt():
        try:
            # Its own process group: `mlflow server` starts uvicorn as a child, and both must
            # stop. Its log goes to stderr, so stdout holds just the lines printed below.
            server = subprocess.Popen(group_command, start_new_session=True, env=server_environment(),
                                      stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None)
            base = f"http://{host}:{port}"
            _wait_until_answering(server, base, startup_seconds, command)
            echo(f"MLflow UI for {uri}")
            echo(runs_table_url(base, experiment_id))
            echo("Ctrl-C stops it.")
            return server.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            if server is not None:
                stop_process_group(server, timeout=5.0)

def experiment_to_open(uri: str, name: str | None) -> str | None:
    """The id of the experiment the printed URL opens (None: the experiment list)."""
    try:
        experiments = client_for(uri).search_experiments()
    except Exception as exc:
        if name is None:
            return None
        raise TrackingError(f"could not list the experiments of {uri} to find {name!r} ({exc})") from None
    by_name = {e.name: e.experiment_id for e in experiments}
    if name is None:
        return by_name.get(DEFAULT_EXPERIMENT)
    if name in by_name:
        return by_name[name]
    names = sorted(by_name)
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    raise ConfigError(f"experiment: {uri} has no experiment {name!r}; "
                      + (f"it has: {shown}" if names else "it has none yet (a fit creates one)"))

def _wait_until_answering(server, base: str, seconds: float, command: list[str]) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            raise TrackingError(f"mlflow server exited with code {server.returncode} (command: {' '.join(command)})")
        try:
            check_reachable(base, timeout=1.0)
            return
        except TrackingError:
            if time.monotonic() > deadline:
                raise TrackingError(f"mlflow server did not answer on {base} within {seconds:.0f}s") from None
            time.sleep(0.5)

def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True

def server_environment() -> dict[str, str]:
    """The environment for `mlflow server`: without its job runner (MLflow 3 starts seven
    huey worker processes for GenAI jobs the runs table never uses) unless asked for."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}

def stop_process_group(process, timeout: float = 15.0) -> None:
    """SIGTERM the group led by `process` (started with start_new_session), SIGKILL if it lingers."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
