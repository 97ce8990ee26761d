"""The sweep's terminal output, which a closed stdout silences instead of ending the sweep.

`convtrain sweep ... | head -2` closes the pipe after two lines. rich's Console answers the next
write with SystemExit(1): the sweep would stop between trials, print nothing about it and
leave its parent run unfinished. Here stdout is pointed at /dev/null instead (so no later
write or the interpreter's last flush fails either) and the sweep carries on to its end.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null: what is still written to stdout is dropped."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing to redirect
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class SweepConsole(Console):
    """rich's Console that goes quiet, rather than exiting, once its reader has gone."""

    def __init__(self, **kwargs):
        kwargs.setdefault("highlight", False)
        kwargs.setdefault("soft_wrap", True)
        super().__init__(**kwargs)

    def on_broken_pipe(self) -> None:
        self.quiet = True
        silence_stdout()
