"""What the CLI tests share: running a command in this process with a fixed terminal width,
reading its one error line, and a free port for a server."""

import socket

from typer.testing import CliRunner

from convtrain.cli import app

# the smallest fit that still trains: a few hundred digits, one small conv block, one epoch
TINY = ["--limit", "300", "--filters", "4", "--epochs", "1", "--batch-size", "32"]

# a fixed width (rich wraps to it) and none of the user's tracking store or debug setting
ENV = {"COLUMNS": "120", "MLFLOW_TRACKING_URI": None, "CONVTRAIN_DEBUG": None}


def invoke(*args, env=None):
    """`convtrain ARGS...` through typer's runner; stdout and stderr kept apart."""
    return CliRunner().invoke(app, [str(a) for a in args], env={**ENV, **(env or {})})


def error_line(result) -> str:
    """The failed command's only stderr line, which must be `error: ...` (no traceback)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
