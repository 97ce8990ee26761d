"""MLflow tracking of the training loop: the trainer callback that forwards its events to a
TrackedRun (tracking/tracked_run.py).

Epoch metrics go to the run's MetricBuffer at each epoch's end, the batch loss every
`log_every` updates, each new checkpoint's path becomes the run's checkpoint tag, and the run's
identity and its unsent metrics go into the checkpoint, so a resumed fit continues the same
run with nothing lost. Opening, describing and ending the run are the run's jobs; buffering
and retrying are the buffer's.
"""

from __future__ import annotations

from convtrain.errors import TrackingError
from convtrain.tracking.tracked_run import TrackedRun
from convtrain.training.callbacks import Callback

UNSENT_KEY = "unsent_metrics"  # in this callback's state: the metrics the store had not taken


class MLflowCallback(Callback):
    """Logs the training loop of one fit to its TrackedRun."""

    key = "mlflow"

    def __init__(self, run: TrackedRun, log_every: int = 10):
        self.run = run
        self.log_every = log_every

    @property
    def run_name(self) -> str | None:  # what the progress output calls a resumed run
        return self.run.run_name

    def on_batch_end(self, trainer, step, logs):
        if step % self.log_every == 0 and "loss" in logs:
            self.run.metrics.add_batch_loss(step, logs["loss"])

    def on_epoch_end(self, trainer, epoch, logs):
        self.run.metrics.add_epoch(epoch, logs)

    def on_checkpoint(self, trainer, path):
        self.run.tag_checkpoint(path)

    def state_dict(self):
        # Metrics the store has not taken are written with each checkpoint, so a fit killed
        # (even with kill -9) during an outage resumes with them instead of losing them.
        unsent = self.run.metrics.unsent_rows()
        return {**self.run.state_dict(), **({UNSENT_KEY: unsent} if unsent else {})}

    def load_state_dict(self, state):
        if state.get("run_id") and state["run_id"] != self.run.run_id:
            raise TrackingError(f"the checkpoint belongs to MLflow run {state['run_id']}, not {self.run.run_id}")
        if state.get(UNSENT_KEY):
            self.run.metrics.take_back(state[UNSENT_KEY], "the checkpoint")
