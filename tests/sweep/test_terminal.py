"""A one-worker sweep on a terminal prints one line per trial (as the README says), not each
trial's fit output; run under a pseudo-terminal, as a user would see it."""

import os
import pty
import re
import select
import sys

SWEEP = """
[fit]
data = "digits"
limit = 300
epochs = 2
hidden = []
batch_size = 32
experiment = "terminal"
[sweep]
name = "terminal-grid"
method = "grid"
[space]
filters = [[4], [6]]
"""

CONTROL = re.compile(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)")

def run_in_pty(args, cwd, env, seconds=600.0) -> tuple[int, str]:
    """Run `args` with stdin/stdout/stderr on a new pty; returns (exit status, everything it wrote)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        try:
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *args], env)
        finally:
            os._exit(127)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], seconds)
            if not ready:
                os.kill(pid, 9)
                raise AssertionError("the sweep wrote nothing for %.0f s: " % seconds + b"".join(chunks).decode())
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def screen_lines(text: str) -> list[str]:
    """The lines left on the screen, for the control sequences rich uses: carriage return,
    newline, erase line (ESC[2K) and cursor up (ESC[nA); colours and the cursor's visibility
    change nothing."""
    lines, row = [""], 0
    for token in CONTROL.split(text):
        if token == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif token == "\r" or not token:
            continue
        elif token == "\x1b[2K":
            lines[row] = ""
        elif re.fullmatch(r"\x1b\[\d*A", token):
            row = max(0, row - int(token[2:-1] or 1))
        elif not token.startswith("\x1b"):
            lines[row] += token  # after a \r rich always erases the line first
    return [line.rstrip() for line in lines if line.strip()]


def test_a_one_worker_sweep_prints_one_line_per_trial_on_a_terminal(tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL")}
    env.update({"COLUMNS": "100", "LINES": "40", "TERM": "xterm-256color"})
    env.pop("NO_COLOR", None)
    code, text = run_in_pty(["-m", "convtrain", "sweep", "sweep.toml"], tmp_path, env)
    assert code == 0, text
    assert "\x1b[" in text  # a terminal indeed: rich drew on it
    lines = screen_lines(text)
    trial_lines = [line for line in lines if re.match(r"trial +\d+ COMPLETE +val_accuracy \d", line)]
    assert len(trial_lines) == 2, lines
    # no fit's own output: no epoch lines, no history tables, no fit results, no MLflow INFO
    for line in lines:
        assert not re.match(r"epoch +\d+/2 +train loss", line), line
        assert not line.startswith("trial 0 epoch"), line  # the running trial's bar is erased
        assert "training history" not in line and not line.startswith(("model ", "checkpoint ")), line
        assert " INFO " not in line, line
    assert "best: trial" in text
