"""MLflow's INFO chatter kept out of the user's terminal, wherever convtrain calls MLflow.

MLflow logs at INFO when it creates a store's tables and, once per logged model, "Validating
input example against model signature": lines that land in the middle of a fit's progress
output or a sweep's one-line-per-trial report. The CLI silences them by setting
MLFLOW_LOGGING_LEVEL before MLflow is imported; API fits and sweep workers go through
`quiet_mlflow_info()` around the calls that produce them. Warnings and errors still show,
and MLFLOW_LOGGING_LEVEL, when set (the user's choice, or INFO with --debug), is the level used.
"""

from __future__ import annotations

import contextlib
import logging
import os

MLFLOW_LOGGER = "mlflow"
LEVEL_VARIABLE = "MLFLOW_LOGGING_LEVEL"


def quiet_by_default(debug: bool = False) -> None:
    """For a command: MLflow at WARNING (INFO with --debug) unless the user set a level. MLflow
    reads the variable when it is imported, so this runs before anything imports it."""
    os.environ.setdefault(LEVEL_VARIABLE, "INFO" if debug else "WARNING")


def _wanted_level() -> int:
    level = logging.getLevelName(os.environ.get(LEVEL_VARIABLE, "WARNING").upper())
    return level if isinstance(level, int) else logging.WARNING


@contextlib.contextmanager
def quiet_mlflow_info():
    """Raise MLflow's loggers to WARNING for the duration (also usable as a decorator)."""
    import mlflow  # noqa: F401  -- importing it sets its loggers up, which would undo the level set below

    logger = logging.getLogger(MLFLOW_LOGGER)
    level = _wanted_level()
    if logger.getEffectiveLevel() >= level:
        yield
        return
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
