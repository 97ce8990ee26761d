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
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

from convtrain.errors import TrackingError, one_line
from convtrain.tracking.processes import this_process
from convtrain.tracking.runs import (
    CHECKPOINT_TAG,
    ERROR_TAG,
    PROCESS_TAG,
    close_orphaned_runs,
    context_tags,
    max_step,
    run_tags,
)
from convtrain.tracking.store import check_reachable, client_for, ensure_experiment
from convtrain.training.callbacks import Callback

EPOCH_METRICS = (
    "train_loss", "train_cost", "train_accuracy", "train_balanced_accuracy",
    "val_loss", "val_cost", "val_accuracy", "val_balanced_accuracy",
    "learning_rate", "epoch_seconds", "images_per_second",
)
BATCH_METRIC = "batch_loss"
UNLOGGED_FILE = "unlogged-metrics.json"

_MAX_METRICS_PER_BATCH = 1000
_FLUSH_SECONDS = 60.0  # long epochs still show batch losses in the dashboard this often
_RETRY_SECONDS = (5.0, 120.0)  # wait before retrying a dead server: first, at most


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
                from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
                run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run = client.create_run(experiment_id, tags=run_tags, run_name=config.run_name)
        except MlflowException as exc:
            raise TrackingError(f"tracking store {tracking_uri}: {one_line(exc)}") from None
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
            raise TrackingError(f"cannot resume MLflow run {run_id} in {tracking_uri}: {one_line(exc)}") from None
        close_orphaned_runs(client, run.info.experiment_id)
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=run_tags({**(tags or {}), PROCESS_TAG: json.dumps(this_process())}))
        logged_epochs = max_step(client, run_id, "train_loss", 0)
        logged_batch = max_step(client, run_id, BATCH_METRIC, -1)
        callback = cls(client, tracking_uri, run_id, run.info.experiment_id, log_every=config.log_every,
                       notify=notify, logged_epochs=logged_epochs, logged_batch_step=logged_batch)
        # a fit killed after logging its test metrics (while logging artifacts or the model)
        # computes them again when resumed; the run must not get them twice
        callback.logged_other_steps = {key: max_step(client, run_id, key, -1) for key in run.data.metrics
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
                self.client.log_batch(self.run_id, tags=run_tags(
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
        return self._attempt(lambda: self.client.log_batch(self.run_id, tags=run_tags(tags)))

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
                            f"({one_line(exc)}); training goes on and metrics are kept until it answers")
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
                problems.append(f"artifact {path.name} not logged ({one_line(exc)}); it is at {path}")
        return problems

    def log_model(self, network_path: str | Path, input_example) -> str | None:
        """The pyfunc model (signature, input example); returns why it failed, or None."""
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        from convtrain.tracking.model import log_model

        if not self.reachable and not self._answers():
            return f"pyfunc model not logged (tracking store down); the model is at {network_path}"
        try:
            with _use_tracking_uri(self.tracking_uri):  # MLflow's Model.log reads the global URI
                log_model(self.client, self.run_id, self.experiment_id, network_path, input_example)
        except Exception as exc:
            return f"pyfunc model not logged ({one_line(exc)}); the model is at {network_path}"
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
