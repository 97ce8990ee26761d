"""MLflow tracking of a fit, as a trainer callback.

One `MLflowCallback` owns one MLflow run: it opens it (or reopens it on --resume), logs
params, tags and datasets once, metrics per epoch in one `log_batch` call (plus the batch
loss every `log_every` steps), and at the end the artifacts, the pyfunc model and the
final status.

Reachability: an http(s) tracking server is probed before the run is created, so a dead
server stops the fit before any training with one line. If the server goes away during
training nothing waits for it: the metrics stay in a buffer, are sent when it answers
again, and whatever could not be sent by the end is written next to the model and
reported. mlflow is imported inside the functions so `import convtrain` stays fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Iterable

from convtrain.callbacks import Callback
from convtrain.errors import TrackingError
from convtrain.processes import alive, on_this_machine, this_process
from convtrain.signals import sigterm_as_keyboard_interrupt

DEFAULT_STORE_FILE = "mlflow.db"
CHECKPOINT_TAG = "convtrain.checkpoint"
OUT_DIR_TAG = "convtrain.out_dir"
ERROR_TAG = "convtrain.error"
# the process that has the run open (convtrain/processes.py): a fit started later on the same
# machine closes the runs whose process died without closing them (kill -9, the OOM killer)
PROCESS_TAG = "convtrain.process"
ORPHAN_NOTE_TAG = "convtrain.note"
EPOCH_METRICS = (
    "train_loss", "train_cost", "train_accuracy", "train_balanced_accuracy",
    "val_loss", "val_cost", "val_accuracy", "val_balanced_accuracy",
    "learning_rate", "epoch_seconds", "images_per_second",
)
BATCH_METRIC = "batch_loss"
UNLOGGED_FILE = "unlogged-metrics.json"

# MLflow's HTTP client retries for minutes by default; a fit should not stall that long on a
# dead server when the metrics can wait in a buffer. Only applied when the user set nothing.
_HTTP_DEFAULTS = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # carriage-return spam in logs
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_MAX_METRICS_PER_BATCH = 1000
_FLUSH_SECONDS = 60.0  # long epochs still show batch losses in the dashboard this often
_RETRY_SECONDS = (5.0, 120.0)  # wait before retrying a dead server: first, at most


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow's default SQLite file in the cwd."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_STORE_FILE}"


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError (one line) if the tracking store at `uri` cannot be used."""
    if is_http(uri):
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def client_for(uri: str):
    import mlflow

    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return mlflow.MlflowClient(tracking_uri=uri)


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


def runs_table_url(base_url: str, experiment_id: str | None) -> str:
    """MLflow 3 opens in its GenAI view; this goes straight to the classic runs table."""
    base_url = base_url.rstrip("/")
    if experiment_id is None:
        return f"{base_url}/#/experiments"
    return f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def find_run_checkpoint(run_id: str, tracking_uri: str) -> str:
    """The checkpoint path recorded on run `run_id` (for `--resume RUN_ID`)."""
    check_reachable(tracking_uri)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).expanduser().is_file():
        # opening it would create an empty store just to say the run is not there
        raise TrackingError(f"--resume {run_id}: no such run; the tracking store {tracking_uri} does not exist")
    from mlflow.exceptions import MlflowException

    try:
        run = client_for(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"--resume {run_id}: no such run in {tracking_uri} ({first_line(exc)})") from None
    path = run.data.tags.get(CHECKPOINT_TAG)
    if not path:
        raise TrackingError(f"--resume {run_id}: the run records no checkpoint (tag {CHECKPOINT_TAG})")
    return path


def close_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose fit ran on this machine and has
    died without closing them; returns their ids. (A run whose process cannot be checked, on
    another machine or from before this tag existed, is left as it is.)"""
    from mlflow.exceptions import MlflowException

    closed = []
    try:
        runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000)
    except MlflowException:
        return closed
    for run in runs:
        try:
            owner = json.loads(run.data.tags.get(PROCESS_TAG, ""))
        except ValueError:
            continue
        if not isinstance(owner, dict) or not on_this_machine(owner) or alive(owner):
            continue
        try:
            client.set_tag(run.info.run_id, ORPHAN_NOTE_TAG,
                           "its process ended without closing the run (killed); continue it with "
                           f"convtrain fit --resume {run.info.run_id}")
            with contextlib.redirect_stdout(io.StringIO()):
                client.set_terminated(run.info.run_id, "KILLED")
        except MlflowException:
            continue
        closed.append(run.info.run_id)
    return closed


def context_tags(extra: dict | None = None) -> dict[str, str]:
    """Version, build, host and git tags for a new run."""
    import convtrain

    tags = {"convtrain.version": convtrain.__version__, "convtrain.host": socket.gethostname()}
    try:
        for key, value in convtrain.build_info().items():
            if key == "blas":
                value = blas_summary(value)
            tags[f"convtrain.build.{key}"] = value if isinstance(value, str) else json.dumps(value)
    except Exception as exc:  # a missing or broken extension must not stop tracking
        tags["convtrain.build.error"] = first_line(exc)
    commit = _git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags.setdefault("mlflow.source.name", "convtrain")
    tags.setdefault("mlflow.source.type", "LOCAL")
    user = os.environ.get("USER") or os.environ.get("USERNAME")
    if user:
        tags.setdefault("mlflow.user", user)
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return {k: str(v)[:5000] for k, v in tags.items()}


def blas_summary(libraries: list[dict]) -> str:
    """'openblas 0.3.31 (pthreads, 2 threads); ...' from build_info()['blas']."""
    parts = []
    for lib in libraries:
        details = ", ".join(str(d) for d in (lib.get("threading_layer"), f"{lib.get('num_threads')} threads") if d)
        parts.append(f"{lib.get('name')} {lib.get('version')} ({details})")
    return "; ".join(parts) or "none found"


def _git_commit(folder: Path) -> str | None:
    import subprocess

    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=3)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class MLflowCallback(Callback):
    """Logs one fit to one MLflow run; see the module docstring for the failure behaviour."""

    key = "mlflow"

    def __init__(self, client, tracking_uri: str, run_id: str, experiment_id: str, *,
                 log_every: int = 10, notify: Callable[[str], None] = _stderr,
                 logged_epochs: int = 0, logged_batch_step: int = -1):
        self.client = client
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.log_every = log_every
        self.notify = notify
        # what the run already holds (on resume), so nothing is logged twice
        self.logged_epochs = logged_epochs
        self.logged_batch_step = logged_batch_step
        self.logged_other_steps: dict[str, int] = {}  # e.g. test_*: key -> last step held
        self.pending: list = []
        self.reachable = True
        self._retry_after = 0.0
        self._retry_wait = _RETRY_SECONDS[0]
        self._last_flush = time.monotonic()
        self._checkpoint_tagged: str | None = None
        self.run_name: str | None = None

    # ---- opening a run ---------------------------------------------------------------

    @classmethod
    def start(cls, config, *, tracking_uri: str, parent_run_id: str | None = None,
              tags: dict | None = None, resume_run_id: str | None = None,
              notify: Callable[[str], None] = _stderr) -> "MLflowCallback":
        """Open the run: create it (a child of `parent_run_id` if given) or reopen `resume_run_id`."""
        check_reachable(tracking_uri)
        from mlflow.exceptions import MlflowException

        try:
            client = client_for(tracking_uri)
            if resume_run_id:
                return cls._reopen(client, tracking_uri, resume_run_id, config, tags, notify)
            experiment_id = ensure_experiment(client, config.experiment)
            close_orphaned_runs(client, experiment_id)
            run_tags = context_tags(tags)
            run_tags[PROCESS_TAG] = json.dumps(this_process())
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(experiment_id, tags=run_tags, run_name=config.run_name)
        except MlflowException as exc:
            raise TrackingError(f"tracking store {tracking_uri}: {first_line(exc)}") from None
        callback = cls(client, tracking_uri, run.info.run_id, experiment_id,
                       log_every=config.log_every, notify=notify)
        callback.run_name = run.info.run_name
        return callback

    @classmethod
    def _reopen(cls, client, tracking_uri, run_id, config, tags, notify) -> "MLflowCallback":
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(f"cannot resume MLflow run {run_id} in {tracking_uri}: {first_line(exc)}") from None
        close_orphaned_runs(client, run.info.experiment_id)
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=_run_tags({**(tags or {}), PROCESS_TAG: json.dumps(this_process())}))
        logged_epochs = _max_step(client, run_id, "train_loss", 0)
        logged_batch = _max_step(client, run_id, BATCH_METRIC, -1)
        callback = cls(client, tracking_uri, run_id, run.info.experiment_id, log_every=config.log_every,
                       notify=notify, logged_epochs=logged_epochs, logged_batch_step=logged_batch)
        # a fit killed after logging its test metrics (while logging artifacts or the model)
        # computes them again when resumed; the run must not get them twice
        callback.logged_other_steps = {key: _max_step(client, run_id, key, -1) for key in run.data.metrics
                                       if key not in EPOCH_METRICS and key != BATCH_METRIC}
        callback.run_name = run.info.run_name
        return callback

    # ---- what is logged once -----------------------------------------------------------

    def log_config(self, config, resumed: bool = False) -> None:
        """The flattened config as params; on resume, params that now differ become tags."""
        from mlflow.entities import Param

        params = config.flat_params()
        if resumed:
            logged = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
            params = {k: v for k, v in params.items() if k not in logged}
            if changed:
                self.client.log_batch(self.run_id, tags=_run_tags(
                    {f"convtrain.resumed.{k}": v for k, v in changed.items()}))
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_datasets(self, splits, source_path: str | None = None) -> None:
        """Train / validation / test arrays as MLflow dataset inputs (name, digest, shape)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source = str(Path(source_path).resolve()) if source_path else None
        inputs = []
        for context, x, y in (("training", splits.x_train, splits.y_train),
                              ("validation", splits.x_val, splits.y_val),
                              ("test", splits.x_test, splits.y_test)):
            if x is None or len(x) == 0:
                continue
            with warnings.catch_warnings():
                # a local path matches MLflow's file-source class twice; either reading is right
                warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
                dataset = mlflow.data.from_numpy(x, targets=y, source=source, name=f"{splits.name}-{context}")
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        if not inputs:
            return
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException:
            # Parallel sweep workers logging the same data set race to insert its row
            # (UNIQUE constraint on SQLite); the second attempt finds the row and links it.
            time.sleep(0.2)
            self.client.log_inputs(self.run_id, datasets=inputs)

    def has_datasets(self) -> bool:
        """Whether the run already links dataset inputs (a resumed run may not, if its fit was
        killed right after its epoch-0 checkpoint)."""
        inputs = self.client.get_run(self.run_id).inputs
        return bool(inputs and inputs.dataset_inputs)

    def set_tags(self, tags: dict) -> bool:
        return self._attempt(lambda: self.client.log_batch(self.run_id, tags=_run_tags(tags)))

    # ---- trainer hooks ----------------------------------------------------------------

    def on_batch_end(self, trainer, step, logs):
        if step % self.log_every == 0 and step > self.logged_batch_step and "loss" in logs:
            self._queue({BATCH_METRIC: logs["loss"]}, step)
            if time.monotonic() - self._last_flush > _FLUSH_SECONDS:
                self.flush()

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch > self.logged_epochs:  # a resumed run may already hold this epoch
            self._queue({k: logs[k] for k in EPOCH_METRICS if logs.get(k) is not None}, epoch)
        self.flush()

    def log_final_metrics(self, values: dict, step: int) -> bool:
        """Metrics of the finished model (test_*), at the last epoch's step; sent at once."""
        self._queue(values, step)
        return self.flush(force=True)

    def on_checkpoint(self, trainer, path):
        path = str(Path(path).resolve())
        if path != self._checkpoint_tagged and self.set_tags({CHECKPOINT_TAG: path}):
            self._checkpoint_tagged = path

    def state_dict(self):
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri}

    def load_state_dict(self, state):
        if state.get("run_id") and state["run_id"] != self.run_id:
            raise TrackingError(f"the checkpoint belongs to MLflow run {state['run_id']}, not {self.run_id}")

    # ---- sending, buffering, retrying -------------------------------------------------------

    def _queue(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now, int(step)) for key, value in values.items()
                            if int(step) > self.logged_other_steps.get(key, -1))

    def flush(self, *, force: bool = False) -> bool:
        """Send the buffered metrics; False (and kept) if the store did not take them."""
        if not self.pending:
            return True
        if not force and not self.reachable and time.monotonic() < self._retry_after:
            return False
        batch = list(self.pending)

        def send():
            for start in range(0, len(batch), _MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=batch[start:start + _MAX_METRICS_PER_BATCH])
                del self.pending[:min(_MAX_METRICS_PER_BATCH, len(batch) - start)]

        sent = self._attempt(send)
        if sent:
            self._last_flush = time.monotonic()
        return sent

    def _attempt(self, action: Callable[[], object]) -> bool:
        if not self.reachable and not self._answers():
            self._retry_wait = min(self._retry_wait * 2, _RETRY_SECONDS[1])
            self._retry_after = time.monotonic() + self._retry_wait
            return False
        try:
            action()
        except Exception as exc:  # any store failure: keep training, keep the data
            if self.reachable:
                self.notify(f"warning: tracking store {self.tracking_uri} stopped answering "
                            f"({first_line(exc)}); training goes on and metrics are kept until it answers")
            else:
                self._retry_wait = min(self._retry_wait * 2, _RETRY_SECONDS[1])
            self.reachable = False
            self._retry_after = time.monotonic() + self._retry_wait
            return False
        if not self.reachable:
            self.notify(f"tracking store {self.tracking_uri} answers again; buffered metrics were logged")
            self.reachable = True
            self._retry_wait = _RETRY_SECONDS[0]
        return True

    def _answers(self) -> bool:
        """A quick health probe, so a dead server costs one short request, not MLflow's retries."""
        try:
            check_reachable(self.tracking_uri, timeout=2.0)
        except TrackingError:
            return False
        return True

    # ---- the end of the run -------------------------------------------------------------

    def log_artifacts(self, files: Iterable[tuple[str | Path, str | None]]) -> list[str]:
        """Log (local file, artifact folder) pairs; returns one line per file the store refused."""
        problems = []
        for path, folder in files:
            path = Path(path)
            if not path.exists():
                continue
            if not self.reachable and not self._answers():
                problems.append(f"artifact {path.name} not logged (tracking store down); it is at {path}")
                continue
            try:
                self.client.log_artifact(self.run_id, str(path), folder)
            except Exception as exc:
                problems.append(f"artifact {path.name} not logged ({first_line(exc)}); it is at {path}")
        return problems

    def log_model(self, network_path: str | Path, input_example) -> str | None:
        """The pyfunc model (signature, input example); returns why it failed, or None."""
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        from convtrain.pyfunc import log_model

        if not self.reachable and not self._answers():
            return f"pyfunc model not logged (tracking store down); the model is at {network_path}"
        try:
            with _use_tracking_uri(self.tracking_uri):  # MLflow's Model.log reads the global URI
                log_model(self.client, self.run_id, self.experiment_id, network_path, input_example)
        except Exception as exc:
            return f"pyfunc model not logged ({first_line(exc)}); the model is at {network_path}"
        return None

    def finish(self, status: str, *, error: str | None = None, out_dir: str | Path | None = None) -> list[str]:
        """Flush, record the error if any, set the status; returns problems worth telling the user."""
        problems = []
        self.flush(force=True)
        if self.pending:
            where = self._save_unlogged(out_dir)
            problems.append(f"{len(self.pending)} metric values could not be logged to {self.tracking_uri}"
                            + (f"; they are saved in {where}" if where else ""))
        if error:
            self.set_tags({ERROR_TAG: error[:5000]})
        if not self._attempt(lambda: self._set_terminated(status)):
            problems.append(f"could not mark MLflow run {self.run_id} as {status}")
        return problems

    def _set_terminated(self, status: str) -> None:
        # MLflow writes two "View run" lines (emoji, GenAI-view URLs) to stdout here for
        # http stores; the CLI prints its own summary, so they are kept out of the output.
        with contextlib.redirect_stdout(io.StringIO()):
            self.client.set_terminated(self.run_id, status)

    def _save_unlogged(self, out_dir) -> Path | None:
        if out_dir is None:
            return None
        path = Path(out_dir) / UNLOGGED_FILE
        rows = [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp} for m in self.pending]
        try:
            path.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri,
                                        "metrics": rows}, indent=1), encoding="utf-8")
        except OSError:
            return None
        return path


def _run_tags(tags: dict):
    from mlflow.entities import RunTag

    return [RunTag(str(k), str(v)[:5000]) for k, v in tags.items()]


def _max_step(client, run_id: str, key: str, default: int) -> int:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=default)


# ---- the dashboard -------------------------------------------------------------------------------

def serve_ui(*, tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000,
             experiment: str = "convtrain", echo: Callable[[str], None] = print,
             startup_seconds: float = 60.0) -> int:
    """Run `mlflow server` on the fits' store until Ctrl-C; print the runs-table URL once it answers.

    An http(s) store already is a server: its URL is printed and nothing is started.
    Returns the server's exit code (0 after Ctrl-C).
    """
    import subprocess

    uri = resolve_tracking_uri(tracking_uri)
    if is_http(uri):
        check_reachable(uri)
        echo(runs_table_url(uri, _experiment_id(uri, experiment)))
        return 0
    check_reachable(uri)
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise TrackingError(f"port {port} on {host} is already in use; pass another --port")
    # one worker process is plenty for a dashboard on your own machine (MLflow's default is 4)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    # Looked up before the server starts: opening a new SQLite store creates its tables, which
    # must not race with the server doing the same.
    experiment_id = _experiment_id(uri, experiment)
    server = None
    # SIGTERM is turned into KeyboardInterrupt from here on, so `kill` also stops the server.
    with sigterm_as_keyboard_interrupt():
        try:
            # Its own process group: `mlflow server` starts uvicorn as a child, and both must
            # stop. Its log goes to stderr, so stdout holds just the lines printed below.
            server = subprocess.Popen(command, start_new_session=True, env=server_environment(),
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


def _experiment_id(uri: str, name: str) -> str | None:
    try:
        experiment = client_for(uri).get_experiment_by_name(name)
    except Exception:
        return None
    return experiment.experiment_id if experiment is not None else None
