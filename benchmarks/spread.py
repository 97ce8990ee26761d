"""The figure the benchmarks' tables give for repeated measurements: the median and the range."""

from __future__ import annotations

import statistics


def spread(values, unit: str = "") -> str:
    """'median (lowest-highest)', two decimals, `unit` after the median (e.g. "x")."""
    values = list(values)
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"
