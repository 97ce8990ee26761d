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
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

from convtrain.errors import ConfigError, TrackingError, one_line
from convtrain.tracking.processes import this_process
from convtrain.tracking.quiet import quiet_mlflow_info
from convtrain.tracking.runs import (
    CHECKPOINT_TAG,
    ERROR_TAG,
    ORPHAN_NOTE_TAG,
    PROCESS_TAG,
    close_orphaned_runs,
    context_tags,
    max_step,
    run_tags,
)
from convtrain.tracking.sqlite_store import is_disk_full
from convtrain.tracking.store import check_reachable, client_for, ensure_experiment
from convtrain.training.callbacks import Callback
from convtrain.training.run_folder import RunFolder

EPOCH_METRICS = (
    "train_loss", "train_cost", "train_accuracy", "train_balanced_accuracy",
    "val_loss", "val_cost", "val_accuracy", "val_balanced_accuracy",
    "learning_rate", "epoch_seconds", "images_per_second",
)
BATCH_METRIC = "batch_loss"
# Logged once per epoch and never by log_restored_metrics: the last epoch the run holds.
EPOCH_STEP_METRIC = "epoch_seconds"
# What the training loop logs per epoch that describes the model (not the loop's speed or lr):
# the metrics a restored best epoch logs again as the run's latest values.
MODEL_METRICS = tuple(k for k in EPOCH_METRICS if k.startswith(("train_", "val_")))
MODEL_URI_TAG = "convtrain.model_uri"

_MAX_METRICS_PER_BATCH = 1000
_FLUSH_SECONDS = 60.0  # long epochs still show batch losses in the dashboard this often
_RETRY_SECONDS = (5.0, 120.0)  # wait before retrying a dead server: first, at most


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def _run_exists(client, run_id: str, notify: Callable[[str], None]) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        notify(f"warning: parent run {run_id} is not in this tracking store; the run is logged without a parent")
        return False
    return True

def _check_step_free(client, run, next_epoch: int | None, config) -> None:
    """Refuse to train a run on into the step that already holds its restored model's metrics.

    A fit whose end put an earlier epoch's weights back logged that epoch's train/val metrics
    one step past its last epoch (log_restored_metrics), and MLflow cannot remove them: an
    extension (`--resume --epochs N`) would log its first new epoch at that step as a second
    value. A fit early stopping ended trains no further epoch, so it never gets here."""
    if next_epoch is None:
        return
    run_id = run.info.run_id
    logged = max_step(client, run_id, EPOCH_STEP_METRIC, -1)
    if logged < 0 or logged >= next_epoch:
        return  # a run from before epoch_seconds, or one holding that epoch already (nothing twice)
    if max_step(client, run_id, "train_loss", -1) < next_epoch:
        return
    best = run.data.metrics.get("best_epoch")
    restored = f"epoch {int(best)}'s" if best is not None else "an earlier epoch's"
    raise ConfigError(
        f"epochs: run {run_id} cannot train past epoch {next_epoch - 1}: its fit ended by putting {restored} "
        f"weights back and logged their metrics at step {next_epoch}, where epoch {next_epoch} would log a "
        f"second value; to train longer, start a new fit from its config "
        f"(convtrain fit --config {RunFolder(config.out or '.').config} --epochs {config.epochs} --out <new folder>)")


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
        self.model_id: str | None = None  # the logged model, once log_model succeeded
        self.model_name: str | None = None
        self.registered: str | None = None  # "NAME version N", once register_model succeeded
        self.latest: dict = {}  # key -> the last Metric queued, for link_model_metrics
        self._unlogged_file: Path | None = None  # metrics kept by an earlier fit of this run
        self._model_missing = False

    # ---- opening a run ---------------------------------------------------------------

    @classmethod
    @quiet_mlflow_info()  # a new store's "Creating initial MLflow database tables"
    def start(cls, config, *, tracking_uri: str, parent_run_id: str | None = None,
              tags: dict | None = None, resume_run_id: str | None = None, next_epoch: int | None = None,
              notify: Callable[[str], None] = _stderr) -> "MLflowCallback":
        """Open the run: create it (a child of `parent_run_id` if given) or reopen `resume_run_id`,
        whose fit trains on from epoch `next_epoch` (None: it trains no further epoch)."""
        check_reachable(tracking_uri)
        from mlflow.exceptions import MlflowException

        try:
            client = client_for(tracking_uri)
            if resume_run_id:
                return cls._reopen(client, tracking_uri, resume_run_id, config, tags, notify, next_epoch)
            experiment_id = ensure_described_experiment(client, config.experiment)
            close_orphaned_runs(client, experiment_id)
            run_tags = context_tags(tags)
            run_tags[PROCESS_TAG] = json.dumps(this_process())
            if parent_run_id and _run_exists(client, parent_run_id, notify):
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
    def _reopen(cls, client, tracking_uri, run_id, config, tags, notify, next_epoch) -> "MLflowCallback":
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(f"cannot resume MLflow run {run_id} in {tracking_uri}: {one_line(exc)}") from None
        _check_step_free(client, run, next_epoch, config)  # before the run is touched
        close_orphaned_runs(client, run.info.experiment_id)
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=run_tags({**(tags or {}), PROCESS_TAG: json.dumps(this_process())}))
        # epoch_seconds, not train_loss: the restored best epoch's train_loss sits one step past
        # the last epoch (log_restored_metrics); runs from before epoch_seconds existed fall back
        logged_epochs = max_step(client, run_id, EPOCH_STEP_METRIC, -1)
        if logged_epochs < 0:
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

    def restore_unlogged(self, out_dir: str | Path) -> int:
        """Queue the metrics an earlier fit of this run kept in out_dir/unlogged-metrics.json
        (the store was down or full), so they are sent before the model and the run's end.
        The file stays until they are sent. Returns how many were queued."""
        from mlflow.entities import Metric

        path = RunFolder(out_dir).unlogged
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            rows = [Metric(str(m["key"]), float(m["value"]), int(m["timestamp"]), int(m["step"]))
                    for m in saved["metrics"]] if saved.get("run_id") == self.run_id else []
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.notify(f"warning: {path} cannot be read ({one_line(exc)}); its metrics are not sent")
            return 0
        self._unlogged_file = path
        self.pending[:0] = rows
        # what they hold must not be queued a second time when the rest of the fit recomputes it
        for row in rows:
            if row.key == EPOCH_STEP_METRIC:  # not train_loss: see log_restored_metrics
                self.logged_epochs = max(self.logged_epochs, row.step)
            elif row.key == BATCH_METRIC:
                self.logged_batch_step = max(self.logged_batch_step, row.step)
            elif row.key not in EPOCH_METRICS:
                self.logged_other_steps[row.key] = max(self.logged_other_steps.get(row.key, -1), row.step)
        return len(rows)

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

    def log_restored_metrics(self, values: dict, *, last_epoch: int, best_epoch: int | None,
                             restored: bool, stopped_epoch: int | None) -> bool:
        """Make the run's latest values describe the saved model. After early stopping
        (`restored`: the best epoch's weights were put back), as MLflow's Keras autolog does: the
        per-epoch history stays, the restored epoch's train/val metrics are logged again one step
        past the last epoch, with `stopped_epoch` (0: the fit ran every epoch). `best_epoch` is
        logged in any case."""
        if best_epoch is None:
            return True
        self._queue({"best_epoch": best_epoch, **({"stopped_epoch": stopped_epoch or 0} if restored else {})},
                    last_epoch)
        again = {k: values[k] for k in MODEL_METRICS if values.get(k) is not None}
        if restored and best_epoch != last_epoch and again and not self._holds_step(last_epoch + 1):
            self._queue(again, last_epoch + 1)
        return self.flush(force=True)

    def _holds_step(self, step: int) -> bool:
        """Whether the run has train_loss at `step` already (a fit resumed after it logged its
        restored metrics and was stopped before FINISHED)."""
        try:
            return max_step(self.client, self.run_id, "train_loss", -1) >= step
        except Exception:
            return False

    def set_description(self, text: str) -> bool:
        """The Markdown shown on the run's Overview."""
        from convtrain.tracking.description import NOTE_TAG

        return self.set_tags({NOTE_TAG: text})

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
        metrics = [Metric(key, float(value), now, int(step)) for key, value in values.items()
                   if int(step) > self.logged_other_steps.get(key, -1)]
        self.pending.extend(metrics)
        for metric in metrics:  # what link_model_metrics sends again, row for row
            if metric.key != BATCH_METRIC:
                self.latest[metric.key] = metric

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
            if self._unlogged_file is not None:  # all kept metrics are in the store now
                self._unlogged_file.unlink(missing_ok=True)
                self._unlogged_file = None
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
                why = "the disk is full" if is_disk_full(exc) else one_line(exc)
                self.notify(f"warning: tracking store {self.tracking_uri} stopped answering "
                            f"({why}); training goes on and metrics are kept until it answers")
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

    @quiet_mlflow_info()  # "Validating input example against model signature", once per model
    def log_model(self, network_path: str | Path, input_example) -> str | None:
        """The pyfunc model (signature, input example), named after the run; returns why it
        failed, or None. Its id is kept in `model_id`."""
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        from convtrain.tracking.model import log_model, model_name

        self._model_missing = True
        if not self.reachable and not self._answers():
            return f"pyfunc model not logged (tracking store down); the model is at {network_path}"
        name = model_name(self.run_name)
        try:
            with _use_tracking_uri(self.tracking_uri):  # MLflow's Model.log reads the global URI
                self.model_id = log_model(self.client, self.run_id, self.experiment_id, network_path,
                                          input_example, name=name)
        except Exception as exc:
            why = "the disk is full" if is_disk_full(exc) else one_line(exc)
            return f"pyfunc model not logged ({why}); the model is at {network_path}"
        self._model_missing = False
        self.model_name = name
        self.set_tags({MODEL_URI_TAG: f"runs:/{self.run_id}/{name}"})
        return None

    def link_model_metrics(self, keys) -> str | None:
        """The final metrics (`keys`) on the logged model as well; returns why not, or None.

        Each is sent as the very row the run holds (same value, step and timestamp), now with
        the model's id: the store keeps one row, so the run's history gains no extra point."""
        from convtrain.tracking.model import link_metrics

        loop = ("learning_rate", "epoch_seconds", "images_per_second")  # the training loop's, not the model's
        rows = [self.latest[k] for k in keys if k in self.latest and k not in loop]
        if self.model_id is None or not rows:
            return None
        if self._attempt(lambda: link_metrics(self.client, self.run_id, self.model_id, rows)):
            return None
        return "the final metrics were not linked to the logged model (tracking store down)"

    def register_model(self, name: str) -> tuple[str | None, str | None]:
        """Register the logged model as a new version of `name`: ("name version N", None) or
        (None, why not)."""
        from convtrain.tracking.model import register

        if self.model_id is None:
            return None, f"model not registered as {name!r}: the pyfunc model was not logged"
        try:
            version = register(self.client, self.model_id, name, run_id=self.run_id,
                               description=f"from run {self.run_name or self.run_id}")
        except Exception as exc:
            return None, f"model not registered as {name!r} ({one_line(exc)})"
        self.registered = f"{version.name} version {version.version}"
        return self.registered, None

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
        if status == "KILLED":
            # the same words a run whose process was killed gets (runs.close_orphaned_runs)
            self.set_tags({ORPHAN_NOTE_TAG: f"stopped by an interrupt; continue it with "
                                            f"convtrain fit --resume {self.run_id}"})
        if status == "FINISHED" and (self.pending or self._model_missing):
            # FINISHED means the run holds everything; it stays open until a resume sends the rest
            if out_dir is not None:
                problems.append(f"MLflow run {self.run_id} stays open until the rest is sent: "
                                f"convtrain fit --resume {out_dir} sends it once the store answers")
            return problems
        if status == "FINISHED" and not error:
            self._clear_stale_notes()
        if not self._attempt(lambda: self._set_terminated(status)):
            problems.append(f"could not mark MLflow run {self.run_id} as {status}")
        return problems

    def _clear_stale_notes(self) -> None:
        """A resumed run that once FAILED or was KILLED and has now finished drops the tags
        that said so: they described an earlier attempt, not this run."""
        def clear():
            tags = self.client.get_run(self.run_id).data.tags
            for key in (ERROR_TAG, ORPHAN_NOTE_TAG):
                if key in tags:
                    self.client.delete_tag(self.run_id, key)
        self._attempt(clear)

    def _set_terminated(self, status: str) -> None:
        # MLflow writes two "View run" lines (emoji, GenAI-view URLs) to stdout here for
        # http stores; the CLI prints its own summary, so they are kept out of the output.
        with contextlib.redirect_stdout(io.StringIO()):
            self.client.set_terminated(self.run_id, status)

    def _save_unlogged(self, out_dir) -> Path | None:
        if out_dir is None:
            return None
        path = RunFolder(out_dir).unlogged
        rows = [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp} for m in self.pending]
        text = json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri, "metrics": rows}, indent=1)
        partial = path.with_name(f".{path.name}.partial")
        try:  # written whole or not at all: it may hold the metrics of an earlier fit too
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, path)
        except OSError:
            partial.unlink(missing_ok=True)
            return None
        self._unlogged_file = path
        return path
