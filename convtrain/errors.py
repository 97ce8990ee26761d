"""The exceptions convtrain raises for problems a user can fix.

Every one of them carries a single-line message that names the bad value (a file, a
flag, a layer) and what was expected. The CLI prints that line and exits non-zero
without a traceback; anything else escaping is a bug and keeps its traceback.
"""


class ConvtrainError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 1


class ConfigError(ConvtrainError, ValueError):
    """A configuration value, flag or config file is invalid."""

    exit_code = 2


class DataError(ConvtrainError):
    """A data set is missing, corrupt, hostile or inconsistent."""


class ArchitectureError(ConfigError):
    """A network architecture is impossible for the given input shape."""


class CheckpointError(ConvtrainError):
    """A checkpoint or saved model is missing, truncated or does not fit the network."""


class TrackingError(ConvtrainError):
    """The MLflow tracking server cannot be reached or refused a request."""


class TrainingDiverged(ConvtrainError):
    """The loss became NaN or infinite; carries where it happened and the last good checkpoint."""

    def __init__(self, message, *, epoch=None, batch=None, checkpoint=None):
        super().__init__(message)
        self.epoch = epoch
        self.batch = batch
        self.checkpoint = checkpoint


class TrainingInterrupted(ConvtrainError):
    """The fit was stopped by SIGINT/SIGTERM after writing a checkpoint."""

    exit_code = 130

    def __init__(self, message, *, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint
