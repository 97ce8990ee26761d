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


def one_line(error: BaseException | str) -> str:
    """An error's message as one line: its first non-blank line with whitespace folded (library
    errors such as MLflow's can carry a whole traceback below it), or the type's name if empty."""
    text = error if isinstance(error, str) else str(error)
    for line in text.splitlines():
        # SQLAlchemy puts a note about its session before the database's own error
        if line.strip() and not line.lstrip().startswith("(raised as a result of Query-invoked autoflush"):
            return " ".join(line.split())
    return "" if isinstance(error, str) else type(error).__name__


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 epoch', '12 epochs', '2 batches' (nouns="batches"): a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control and format characters (escape sequences,
    carriage returns, bidirectional overrides) shown as Python escapes, e.g. '\\x1b'."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def out_of_memory(error: MemoryError) -> str:
    """The one line a MemoryError that escaped every size check becomes, in the CLI and in each
    sweep worker it starts."""
    return (f"out of memory ({one_line(str(error)) or 'an allocation failed'}); try a smaller batch, "
            "network or --limit")


def did_you_mean(value, choices) -> str:
    """' (did you mean 'x'?)' for the choice closest to a misspelt `value`, else ''."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
