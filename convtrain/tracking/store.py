"""Where the runs go: the tracking URI, the MLflow client, experiments and the runs-table URL.

mlflow is imported inside the functions so `import convtrain` (and `convtrain --help`) stays fast.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from convtrain.errors import TrackingError
from convtrain.tracking.sqlite_store import check_existing_store, ensure_sqlite_store, sqlite_path

DEFAULT_STORE_FILE = "mlflow.db"

# MLflow's HTTP client retries for minutes by default; a fit should not stall that long on a
# dead server when the metrics can wait in a buffer. Only applied when the user set nothing.
_HTTP_DEFAULTS = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # carriage-return spam in logs
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow's default SQLite file in the cwd."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_STORE_FILE}"

def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))

# Less room than this under a SQLite store cannot hold a run's first rows, let alone its metrics.
MIN_FREE_BYTES = 1024 * 1024


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write to the file system holding `folder`."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return MIN_FREE_BYTES  # cannot be told: let the store itself answer
    return stats.f_bavail * stats.f_frsize


# SQLAlchemy's database URIs: MLflow opens them with the dialect's Python driver
_DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError (one line) if the tracking store at `uri` cannot be used."""
    if is_http(uri):
        try:
            urllib.parse.urlsplit(uri).port  # a malformed host (an unclosed [IPv6) or port
        except ValueError as exc:
            raise TrackingError(f"tracking URI {uri!r} is not a valid URL ({exc})") from None
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status >= 400:
                    raise TrackingError(f"tracking server {uri} answered HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            raise TrackingError(f"tracking server {uri} answered HTTP {exc.code}; is it an MLflow server?") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"tracking server {uri} cannot be reached ({reason}); start it, pass another "
                "--tracking-uri, or train with --no-track") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent
        if not folder.is_dir():
            raise TrackingError(f"tracking store {uri}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking store {uri}: folder {folder} is not writable")
        if free_bytes(folder) < MIN_FREE_BYTES:
            raise TrackingError(f"tracking store {uri}: the disk is full ({free_bytes(folder):,} bytes free "
                                f"in {folder}); free some space and run again")
        store = sqlite_path(uri)
        if store is not None:
            check_existing_store(store)  # a broken store is named now, before any work
    elif uri.split(":", 1)[0].split("+", 1)[0] in _DATABASE_SCHEMES:
        check_database_driver(uri)


def check_database_driver(uri: str) -> None:
    """A database URI whose SQLAlchemy dialect cannot import its Python driver is refused in one
    line (MLflow would raise ModuleNotFoundError from deep inside SQLAlchemy)."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
        shown = url.render_as_string(hide_password=True)
        dialect = url.get_dialect()
    except Exception as exc:  # an unparsable URI, an unknown dialect: SQLAlchemy's own words
        raise TrackingError(f"tracking URI {uri.split('@')[-1]!r} is not a database URL SQLAlchemy can use "
                            f"({type(exc).__name__}: {exc})") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        package = {"psycopg": "'psycopg[binary]'"}.get(missing, missing)
        hint = ""
        if url.get_backend_name() == "postgresql" and url.get_driver_name() != "psycopg2" \
                and importlib.util.find_spec("psycopg2") is not None:
            hint = f", or use the installed psycopg2 with postgresql+psycopg2://{shown.split('://', 1)[1]}"
        raise TrackingError(f"tracking store {shown}: its database driver {missing!r} is not installed; "
                            f"install it (pip install {package}){hint}") from None

def open_store(uri: str) -> None:
    """Make a local SQLite store ready to open (built atomically if new; see sqlite_store.py);
    other stores need nothing. Everything that opens a tracking URI goes through client_for."""
    store = sqlite_path(uri)
    if store is not None:
        ensure_sqlite_store(store)

def client_for(uri: str):
    import mlflow

    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    open_store(uri)
    _quiet_reraised_database_errors()
    return mlflow.MlflowClient(tracking_uri=uri)

class _DropReraisedDatabaseErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")

def _quiet_reraised_database_errors() -> None:
    """MLflow logs each SQLite OperationalError (a full disk, a locked file) with its whole
    traceback before raising it again as an MlflowException; convtrain reports that exception
    in one line, so the logged copy (up to hundreds of lines per fit) is dropped."""
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _DropReraisedDatabaseErrors) for f in logger.filters):
        logger.addFilter(_DropReraisedDatabaseErrors())

def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name`, created if missing (tolerates a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted; restore it in the UI or use another --experiment")
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id

def ensure_described_experiment(client, name: str) -> str:
    """ensure_experiment, and an experiment this call creates gets convtrain's description."""
    from convtrain.tracking.description import NOTE_TAG, experiment_description

    existed = client.get_experiment_by_name(name) is not None
    experiment_id = ensure_experiment(client, name)
    if not existed:
        try:
            client.set_experiment_tag(experiment_id, NOTE_TAG, experiment_description(name))
        except Exception:  # a description is not worth failing a fit over
            pass
    return experiment_id

def runs_table_url(base_url: str, experiment_id: str | None) -> str:
    """MLflow 3 opens in its GenAI view; this goes straight to the classic runs table."""
    base_url = base_url.rstrip("/")
    if experiment_id is None:
        return f"{base_url}/#/experiments"
    return f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
