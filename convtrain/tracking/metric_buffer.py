"""Metrics on their way to one MLflow run: queued, sent in batches, kept through an outage.

If the tracking store goes away during training nothing waits for it: the metrics stay in the
buffer, are sent when it answers again (probed with a short health request, at growing
intervals), and whatever could not be sent by the end is written to the run folder's
unlogged-metrics file, which the next `--resume` sends. What is pending also goes into every
checkpoint (MLflowCallback.state_dict), so a fit killed -9 during an outage loses none of it.
The buffer knows what the run already holds (on resume), so no step is logged twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from convtrain.errors import TrackingError, one_line
from convtrain.tracking.sqlite_store import is_disk_full
from convtrain.tracking.store import check_reachable, same_store

EPOCH_METRICS = (
    "train_loss", "train_cost", "train_accuracy", "train_balanced_accuracy",
    "val_loss", "val_cost", "val_accuracy", "val_balanced_accuracy",
    "learning_rate", "epoch_seconds", "images_per_second",
)
BATCH_METRIC = "batch_loss"
# Logged once per epoch and never again by a restored best epoch: the last epoch the run holds.
EPOCH_STEP_METRIC = "epoch_seconds"
# What the training loop logs per epoch that describes the model (not the loop's speed or lr):
# the metrics a restored best epoch logs again as the run's latest values.
MODEL_METRICS = tuple(k for k in EPOCH_METRICS if k.startswith(("train_", "val_")))

_MAX_METRICS_PER_BATCH = 1000
_FLUSH_SECONDS = 60.0  # long epochs still show batch losses in the dashboard this often
# Seconds since the last send before an epoch's end sends its metrics: 0, each epoch is sent at
# its end, unless `epochs_sent_together` says otherwise (see there).
_epoch_send_seconds = 0.0
_RETRY_SECONDS = (5.0, 120.0)  # wait before retrying a dead server: first, at most


@contextlib.contextmanager
def epochs_sent_together(seconds: float):
    """Within the block, an epoch's end sends the metrics that wait only if the last send is
    `seconds` old. A sweep's trials are short (digits: 50 ms epochs), and each send is a database
    transaction (about 5 ms on SQLite): their epochs go together, at most `seconds` late. What
    waits is in every checkpoint (MLflowCallback.state_dict), so a killed trial resumes with it,
    and the end of the fit sends it all."""
    global _epoch_send_seconds
    previous, _epoch_send_seconds = _epoch_send_seconds, seconds
    try:
        yield
    finally:
        _epoch_send_seconds = previous


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class MetricBuffer:
    """The metrics queued for run `run_id`, and whether its store answers."""

    def __init__(self, client, tracking_uri: str, run_id: str, *, notify: Callable[[str], None] = stderr_line,
                 logged_epochs: int = 0, logged_batch_step: int = -1, logged_other_steps: dict | None = None):
        self.client = client
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.notify = notify
        # what the run already holds (on resume), so nothing is logged twice
        self.logged_epochs = logged_epochs
        self.logged_batch_step = logged_batch_step
        self.logged_other_steps: dict[str, int] = dict(logged_other_steps or {})  # e.g. test_*: key -> last step
        self.pending: list = []
        self.latest: dict = {}  # key -> the last Metric queued (what the logged model is linked to)
        self.reachable = True
        self._retry_after = 0.0
        self._retry_wait = _RETRY_SECONDS[0]
        self._last_flush = time.monotonic()
        self._unlogged_file: Path | None = None  # metrics kept by an earlier fit of this run

    # ---- queueing -------------------------------------------------------------------

    def add(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(step)) for key, value in values.items()
                   if int(step) > self.logged_other_steps.get(key, -1)]
        self.pending.extend(metrics)
        for metric in metrics:  # what RunModel.link_metrics sends again, row for row
            if metric.key != BATCH_METRIC:
                self.latest[metric.key] = metric

    def add_batch_loss(self, step: int, loss: float) -> None:
        if step > self.logged_batch_step:
            self.add({BATCH_METRIC: loss}, step)
            if time.monotonic() - self._last_flush > _FLUSH_SECONDS:
                self.flush()

    def add_epoch(self, epoch: int, logs: dict) -> None:
        """The epoch's metrics (unless the run holds them already), sent if the store answers;
        inside `epochs_sent_together`, only once the last send is old enough."""
        if epoch > self.logged_epochs:
            self.add({k: logs[k] for k in EPOCH_METRICS if logs.get(k) is not None}, epoch)
        if time.monotonic() - self._last_flush >= _epoch_send_seconds:
            self.flush()

    # ---- sending --------------------------------------------------------------------

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

        sent = self.attempt(send)
        if sent:
            self._last_flush = time.monotonic()
            if self._unlogged_file is not None:  # all kept metrics are in the store now
                self._unlogged_file.unlink(missing_ok=True)
                self._unlogged_file = None
        return sent

    def attempt(self, action: Callable[[], object]) -> bool:
        """Run one call to the store; False if it is down (said once, then retried later)."""
        if not self.reachable and not self.answers():
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

    def answers(self) -> bool:
        """Whether the store answers: at once while it does, else a quick health probe, so a
        dead server costs one short request, not MLflow's retries."""
        if self.reachable:
            return True
        try:
            check_reachable(self.tracking_uri, timeout=2.0)
        except TrackingError:
            return False
        return True

    # ---- what an earlier fit of this run could not send -------------------------------

    def unsent_rows(self) -> list[dict]:
        """The pending metrics as plain rows: what a checkpoint and the unlogged-metrics file keep."""
        return [{"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp} for m in self.pending]

    def take_back(self, rows, source: str) -> int:
        """Queue the rows (unsent_rows() of an earlier fit of this run, read from `source`) ahead
        of anything new, without what the store holds by now (they may have got through after
        they were saved) or what is queued already; returns how many were queued."""
        from mlflow.entities import Metric

        try:
            metrics = [Metric(str(m["key"]), float(m["value"]), int(m["timestamp"]), int(m["step"])) for m in rows]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.notify(f"warning: {source} holds unreadable metrics ({one_line(exc)}); they are not sent")
            return 0
        held = self._held_steps({m.key for m in metrics})
        queued = {(m.key, m.step) for m in self.pending}
        metrics = [m for m in metrics if m.step > held.get(m.key, -1) and (m.key, m.step) not in queued]
        self.pending[:0] = metrics
        # what they hold must not be queued a second time when the rest of the fit recomputes it
        for row in metrics:
            if row.key == EPOCH_STEP_METRIC:  # not train_loss: see TrackedRun.log_restored_metrics
                self.logged_epochs = max(self.logged_epochs, row.step)
            elif row.key == BATCH_METRIC:
                self.logged_batch_step = max(self.logged_batch_step, row.step)
            elif row.key not in EPOCH_METRICS:
                self.logged_other_steps[row.key] = max(self.logged_other_steps.get(row.key, -1), row.step)
        return len(metrics)

    def _held_steps(self, keys) -> dict[str, int]:
        """The last step the run holds of each key; the store sends a key's rows in step order,
        so what it holds of them is a prefix. Nothing is known to be held if it does not answer."""
        from convtrain.tracking.runs import max_step

        try:
            return {key: max_step(self.client, self.run_id, key, -1) for key in keys}
        except Exception:
            return {}

    def restore_unlogged(self, path: Path) -> int:
        """Queue the metrics an earlier fit of this run kept in `path` (the store was down or
        full when it ended), so they are sent before the model and the run's end. The file stays
        until they are sent. Returns how many were queued."""
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            rows = saved["metrics"] if saved.get("run_id") == self.run_id else []
            stored = saved.get("tracking_uri")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.notify(f"warning: {path} cannot be read ({one_line(exc)}); its metrics are not sent")
            return 0
        if rows and stored is not None and not same_store(str(stored), self.tracking_uri):
            # the file's URI is data: metrics kept for another store are not sent to this one
            self.notify(f"warning: {path} holds metrics for another tracking store, not "
                        f"{self.tracking_uri}; they are not sent")
            return 0
        self._unlogged_file = path
        return self.take_back(rows, str(path))

    def save_unlogged(self, path: Path) -> Path | None:
        """Write what is still pending to `path`, whole or not at all (it may hold the metrics of
        an earlier fit too); None if it could not be written."""
        text = json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri, "metrics": self.unsent_rows()},
                          indent=1)
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, path)
        except OSError:
            partial.unlink(missing_ok=True)
            return None
        self._unlogged_file = path
        return path
