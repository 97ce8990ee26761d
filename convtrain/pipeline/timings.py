"""Where a fit's wall time went, phase by phase (`convtrain fit --timings`).

The phases follow the fit's steps: start-up (the interpreter, imports and the config, up to
`prepare`), data (load, split, standardize, build the network, the run folder), store (the
MLflow store and run, params and datasets), training (the updates, checkpoints included),
evaluation (the validation set each epoch, a full re-score of the training set with
`train_metrics = "full"`, and the final evaluation), plots, model logging (the model file and
everything handed to MLflow at the end), and other (the rest of the wall time).
"""

from __future__ import annotations

import contextlib
import os
import time

PHASES = ("start-up", "data", "store", "training", "evaluation", "plots", "model logging")


def seconds_since_process_start() -> float | None:
    """How long this process has run (Linux's /proc; None elsewhere), to 10 ms."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat, open("/proc/uptime", encoding="ascii") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return max(float(uptime.read().split()[0]) - started, 0.0)
    except (OSError, ValueError, IndexError):
        return None


class FitTimings:
    """Seconds per phase, added up as the fit goes (a phase may be entered more than once)."""

    def __init__(self):
        self.started = time.monotonic()
        before = seconds_since_process_start()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["start-up"] = before or 0.0
        self.process_started = self.started - (before or 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] += time.monotonic() - started

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def move(self, source: str, target: str, seconds: float) -> None:
        """Count `seconds` already in `source` under `target` (the trainer's evaluation time)."""
        seconds = min(seconds, self.seconds[source])
        self.seconds[source] -= seconds
        self.seconds[target] += seconds

    def split(self) -> dict[str, float]:
        """Every phase, "other" (the wall time no phase counted) and "total", in seconds."""
        total = time.monotonic() - self.process_started
        split = dict(self.seconds)
        split["other"] = max(total - sum(self.seconds.values()), 0.0)
        split["total"] = total
        return split


def timings_lines(split: dict[str, float]) -> list[str]:
    """The split as aligned lines, each phase with its share of the total."""
    total = split.get("total") or 0.0
    width = max(len(name) for name in split)
    return [f"{name:<{width}}  {seconds:7.2f} s" + (f"  {100 * seconds / total:5.1f}%" if total and name != "total"
                                                    else "")
            for name, seconds in split.items()]
